"""Science benchmark: every science exposure of a simulated night to ``multi`` files, against
the simulator's truth, on one core.

    python benchmarks/science.py [--date 20181108] [--seed 1] [--out benchmarks/out] [--reuse]
                                 [--repeat 5]

Prints Markdown tables: extraction, sky subtraction and cosmic-ray accuracy per channel, the
comparison of the sky and cosmic-ray methods, and time per stage and file size of one
exposure of one channel from raw frame to ``multi`` file (calibration bundle already built).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one core, as the target says

import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from scipy.ndimage import median_filter  # noqa: E402

from panacea import instrument  # noqa: E402
from panacea.allocator import keep_freed_memory  # noqa: E402
from panacea.archive import Archive  # noqa: E402
from panacea.calbundle import bundle_path  # noqa: E402
from panacea.calibration import CalibrationOptions, StageTimer  # noqa: E402
from panacea.cosmics import detect_cosmics  # noqa: E402
from panacea.pipeline import calibration_for, write_exposure  # noqa: E402
from panacea.science import ChannelCalibration, ScienceOptions, reduce_exposure  # noqa: E402
from panacea.simulate.truth import load_channel, load_exposure, load_night  # noqa: E402
from simulated import night_parser, simulated_night  # noqa: E402

EDGE = 100  # columns at each end left out of the statistics (partial coverage)


def charge_estimate(image: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Cosmic-ray charge (e-) of the truth's pixels: the pixel minus the median of the clean
    pixels within +-3 columns of the same row."""
    r, c = np.nonzero(truth)
    cols = np.clip(c[:, None] + np.arange(-3, 4)[None, :], 0, image.shape[1] - 1)
    near = np.where(truth[r[:, None], cols], np.nan, image[r[:, None], cols])
    with np.errstate(all="ignore"):
        model = np.nanmedian(near, axis=1)
    charge = np.zeros(image.shape)
    charge[r, c] = image[r, c] - np.nan_to_num(model)
    return charge


def cosmic_stats(found: np.ndarray, truth: np.ndarray, image: np.ndarray, var: np.ndarray
                 ) -> tuple[float, float]:
    """Fraction of >5-sigma cosmic-ray pixels flagged, fraction of clean pixels flagged."""
    strong = truth & (charge_estimate(image, truth) > 5 * np.sqrt(np.maximum(var, 1e-3)))
    return float(found[strong].mean()), float(found[~truth].mean())


def accuracy(sf, parts: dict, channel_truth) -> dict[str, float]:
    """Extraction and sky-subtraction errors of one processed frame against the truth."""
    live = ~channel_truth.dead
    cols = slice(EDGE, sf.flux.shape[1] - EDGE)
    true = (parts["sky"] + parts.get("source", 0.0))[:, cols]
    flux, var = sf.flux[:, cols], sf.variance[:, cols]
    ok = live[:, None] & (sf.frac[:, cols] > 0.9) & (var > 0)
    pull = (flux - true)[ok] / np.sqrt(var[ok])
    out = {"flux_bias_pct": 100 * (flux[ok].sum() / true[ok].sum() - 1),
           "flux_bias_err": 100 * np.sqrt(var[ok].sum()) / true[ok].sum(),
           "pull_rms": float(np.std(pull))}
    # sky fibers (less than 1 % object light), continuum and sky-line pixels
    sky_true = parts["sky"][:, cols]
    src = parts.get("source", np.zeros_like(parts["sky"]))[:, cols]
    skyf = live & np.all(src < 0.01 * np.maximum(sky_true, 1e-9), axis=1)
    # the residual of the sky alone: the (< 1 %) object light these fibers do hold is taken
    # out with its true value
    r = flux - sf.sky.sky[:, cols] - src
    z = np.where(var > 0, r / np.sqrt(np.where(var > 0, var, 1)), 0)
    run = median_filter(sky_true, size=(1, 51))
    line = sky_true > 1.2 * run
    sel = skyf[:, None] & ok
    cont, lin = sel & ~line, sel & line
    out["n_sky_fibers"] = int(skyf.sum())
    out["cont_rms"] = float(np.sqrt(np.mean(z[cont] ** 2)))
    out["cont_mean_pct"] = float(100 * r[cont].sum() / sky_true[cont].sum())
    # photon and read noise of that mean (the sky model's own error, fitted to these same
    # fibers, is left out)
    out["cont_mean_err"] = float(100 * np.sqrt(var[cont].sum()) / sky_true[cont].sum())
    out["line_rms"] = float(np.sqrt(np.mean(z[lin] ** 2))) if lin.any() else float("nan")
    out["line_mean_pct"] = (float(100 * r[lin].sum() / (sky_true - run)[lin].sum())
                            if lin.any() else float("nan"))
    out["line_mean_err"] = (float(100 * np.sqrt(var[lin].sum()) / (sky_true - run)[lin].sum())
                            if lin.any() else float("nan"))
    return out


def main(argv=None) -> int:
    parser = night_parser(__doc__, "reuse a simulated night and bundles")
    parser.add_argument("--repeat", type=int, default=5,
                        help="reductions timed per exposure; the table gives the fastest\n"
                             "(a shared machine's noise only adds) and the median")
    args = parser.parse_args(argv)
    keep_freed_memory()  # as panacea-lrs2 does
    out = simulated_night(args)
    night_truth = load_night(out, args.date)
    plans = {(e["obsid"], e["exp"]): e for e in night_truth["exposures"]}
    archive = Archive(out)
    night = archive.night(args.date)
    science = list(night.exposures(ftype="sci"))
    reduced = out / "reduced"
    rows, methods, times = [], [], []
    for ch in instrument.parse_channels(args.channels):
        bundle = calibration_for(archive, args.date, ch, CalibrationOptions(), reduced)
        cal = ChannelCalibration.from_bundle(bundle, str(bundle_path(reduced, args.date,
                                                                     ch.name)))
        ctruth = load_channel(out, args.date, ch.name)
        exposures = [e for e in science if e.has_channel(ch)]
        conditions: dict = {}
        # warm-up; products without cubes, flux scale from the guider only (no response)
        write_exposure(night, exposures[0], cal, reduced, ScienceOptions(), (None, "none"),
                       conditions, cubes=False)
        for e in exposures:
            parts = load_exposure(out, args.date, e.obsid, e.exp, ch.name)
            runs = []
            for _ in range(max(args.repeat, 1)):
                timer = StageTimer()
                t0 = time.perf_counter()
                path = write_exposure(night, e, cal, reduced, ScienceOptions(), (None, "none"),
                                      conditions, timer=timer, cubes=False).paths[0]
                runs.append((time.perf_counter() - t0, timer))
            total, timer = min(runs, key=lambda run: run[0])
            times.append((ch.name, e.name, timer, total, np.median([r[0] for r in runs]),
                          path.stat().st_size / 1e6))
            sf = reduce_exposure(night, e, cal).frame  # final sky (after any refit)
            acc = accuracy(sf, parts, ctruth)
            truth_cr = parts["cosmic"].astype(bool)
            det, false = cosmic_stats(sf.cosmics, truth_cr, sf.flattened, sf.pixel_variance)
            acc["cr_detect_pct"], acc["cr_false_pct"] = 100 * det, 100 * false
            rows.append((ch.name, e.name, plans[(e.obsid, e.exp)]["kind"], acc))
        # method comparison on the first science exposure of the channel
        e = next((x for x in exposures if plans[(x.obsid, x.exp)]["kind"] == "science"),
                 exposures[0])
        parts = load_exposure(out, args.date, e.obsid, e.exp, ch.name)
        tmpl = accuracy(reduce_exposure(night, e, cal, ScienceOptions(sky_method="template"))
                        .frame, parts, ctruth)
        sf = reduce_exposure(night, e, cal).frame
        cr = {}
        for method in ("fiber", "lacosmic"):
            t0 = time.perf_counter()
            mask = detect_cosmics(sf.flattened, sf.pixel_variance, sf.pixel_mask,
                                  method=method)
            cr[method] = (*cosmic_stats(mask, parts["cosmic"].astype(bool), sf.flattened,
                                        sf.pixel_variance), time.perf_counter() - t0)
        methods.append((ch.name, e.name, accuracy(sf, parts, ctruth), tmpl, cr))
    archive.close()
    _print(rows, methods, times)
    return 0


def _print(rows, methods, times) -> None:
    print("\n### Science exposures against simulator truth\n")
    print("(± is the photon and read noise of the mean alone)\n")
    print("| channel | exposure | kind | flux bias (%) | pull RMS | sky fibers | continuum "
          "RMS/σ | continuum mean (% of sky) | line RMS/σ | line mean (% of line) | CR >5σ "
          "found (%) | clean flagged (%) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, ename, kind, a in rows:
        print(f"| {name} | {ename} | {kind} | {a['flux_bias_pct']:+.3f} ± "
              f"{a['flux_bias_err']:.3f} | {a['pull_rms']:.3f} | {a['n_sky_fibers']} | "
              f"{a['cont_rms']:.3f} | {a['cont_mean_pct']:+.3f} ± {a['cont_mean_err']:.3f} | "
              f"{a['line_rms']:.3f} | {a['line_mean_pct']:+.3f} ± {a['line_mean_err']:.3f} | "
              f"{a['cr_detect_pct']:.2f} | {a['cr_false_pct']:.4f} |")
    print("\n### Methods compared (first science exposure of each channel)\n")
    print("| channel | sky spline: cont RMS/σ, mean % / line RMS/σ, mean % | sky template: same |"
          " CR fiber: found %, false %, s | CR lacosmic: found %, false %, s |")
    print("|---|---|---|---|---|")
    for name, _, spl, tmpl, cr in methods:
        def sky(a):
            return (f"{a['cont_rms']:.2f}, {a['cont_mean_pct']:+.2f} / {a['line_rms']:.2f}, "
                    f"{a['line_mean_pct']:+.2f}")

        def c(t):
            return f"{100 * t[0]:.2f}, {100 * t[1]:.4f}, {t[2]:.2f}"
        print(f"| {name} | {sky(spl)} | {sky(tmpl)} | {c(cr['fiber'])} | {c(cr['lacosmic'])} |")
    stages = list(times[0][2].seconds)
    print("\n### Time (s, one core) per stage, raw frame to multi file, and file size\n")
    print("(stages of the fastest of the timed runs; 'median' is the median total)\n")
    print("| channel | exposure | " + " | ".join(stages) + " | total | median | size (MB) |")
    print("|---|---|" + "---|" * (len(stages) + 3))
    for name, ename, timer, total, median, size in times:
        cells = " | ".join(f"{timer.seconds.get(s, 0):.2f}" for s in stages)
        print(f"| {name} | {ename} | {cells} | {total:.2f} | {median:.2f} | {size:.1f} |")


if __name__ == "__main__":
    sys.exit(main())
