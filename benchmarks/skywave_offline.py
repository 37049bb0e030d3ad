"""Sky-line refinement rerun offline on reduced randomized nights, against the truth.

    python benchmarks/skywave_offline.py [--out /tmp/robustness] [--nights 10]
                                         [--channels uv,orange,red,farred] [--list]

For every on-sky exposure and channel of the nights that ``benchmarks/robustness.py``
reduced (``{out}/seedNN/reduced``), :func:`panacea.skywave.measure_sky_shift` is run again,
with the code of this checkout, on the stored extracted spectra (the ``unrectified_spectra``
extension of the ``multi_*`` file; variance Poisson + 45 e^2, about what the optimal
extraction gives a faint sky) and the night's bundle (arc solution, dead fibers, WAVERMS). The
zero point is the median over live fibers and columns 50..ncol-50 of the wavelength error in
px against the exposure's true wavelengths (``truth/{date}/exp_*``). Printed per channel:
median and worst over the nights of each night's worst exposure (the robustness metric), the
same over the 180 s and 900 s frames, how many frames were corrected and how many ended worse
than the arcs alone (by more than 0.02 px), and the RMS of the pulls
(measured - true) / error. A change of the measurement or of its rules is judged here in a
minute instead of re-reducing ten nights. ``--list`` prints every exposure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from astropy.io import fits

from panacea.calbundle import bundle_path, read_bundle
from panacea.simulate.truth import load_channel, truth_dir
from panacea.skywave import measure_sky_shift

sys.path.insert(0, str(Path(__file__).parent))
from robustness import EDGE, MULTI  # a sibling script

READ_VARIANCE = 45.0  # e^2 per extracted column


def night_rows(base: Path, date: str, channel: str) -> list[dict]:
    """One row per on-sky exposure of one reduced night and channel."""
    path = bundle_path(base / "reduced", date, channel)
    if not path.is_file():
        return []
    b = read_bundle(path, verify=False)
    wave, dead = b["wavelength"].astype(float), b["dead"].astype(bool)
    arc_rms = float(b.meta.get("WAVERMS") or 0.0)
    live = ~load_channel(base, date, channel).dead
    ncol = wave.shape[1]
    rows = []
    for multi in sorted((base / "reduced").rglob(f"multi_{date}_*_{channel}.fits")):
        m = MULTI.search(multi.name)
        if m is None:
            continue
        tpath = truth_dir(base, date) / f"exp_{m.group(2)}_{m.group(3)}_{channel}.fits"
        if not tpath.is_file():
            continue
        with fits.open(multi) as hdul:
            flux = hdul["unrectified_spectra"].data.astype(float)
            header = hdul[0].header
        with fits.open(tpath) as hdul:
            if "WAVELENGTH" not in [h.name for h in hdul]:
                continue
            true_wave = hdul["WAVELENGTH"].data.astype(float)
        result = measure_sky_shift(flux, np.clip(flux, 0, None) + READ_VARIANCE, wave, ~dead,
                                   arc_rms=arc_rms)
        err = ((wave - true_wave) / np.gradient(true_wave, axis=1))[live][:, EDGE:-EDGE]
        offsets = result.offsets(ncol)[EDGE:-EDGE] if result.method != "none" else 0.0
        if result.method != "none":
            measured, error = float(np.median(offsets)), result.error
        elif result.rejected:
            measured, error = result.rejected[0], result.rejected[1]
        else:
            measured, error = np.nan, np.nan
        rows.append({"exposure": f"{m.group(2)}_{m.group(3)}",
                     "object": str(header.get("OBJECT", "")),
                     "exptime": float(header.get("EXPTIME", 0.0)),
                     "method": result.method, "measured": measured, "error": error,
                     "before": float(np.median(err)),
                     "after": float(np.median(err - offsets))})
    return rows


def summarize(channel: str, nights: dict[int, list[dict]]) -> str:
    """One line of figures for a channel."""
    rows = [r for rr in nights.values() for r in rr]
    if not rows:
        return f"{channel:7s} no reduced night"
    worst = [max(abs(r["after"]) for r in rr) for rr in nights.values() if rr]
    short = [abs(r["after"]) for r in rows if r["exptime"] <= 200]
    long = [abs(r["after"]) for r in rows if r["exptime"] > 200]
    pulls = np.array([(r["measured"] - r["before"]) / r["error"] for r in rows
                      if np.isfinite(r["measured"])])
    applied = sum(r["method"] != "none" for r in rows)
    worse = sum(abs(r["after"]) > abs(r["before"]) + 0.02 for r in rows)

    def pair(v):
        return f"{np.median(v):.3f}/{np.max(v):.3f}" if v else "-"
    return (f"{channel:7s} night {pair(worst)}  180 s {pair(short)}  900 s {pair(long)}  "
            f"corrected {applied}/{len(rows)}  worse {worse}  "
            f"pull RMS {np.sqrt(np.mean(pulls**2)):.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/robustness"))
    parser.add_argument("--nights", type=int, default=10)
    parser.add_argument("--date", default="20181108")
    parser.add_argument("--channels", default="uv,orange,red,farred")
    parser.add_argument("--list", action="store_true", help="print every exposure")
    args = parser.parse_args(argv)
    print("zero point |median| px: median/max; night = worst exposure of each night")
    for channel in args.channels.split(","):
        nights = {}
        for seed in range(1, args.nights + 1):
            base = args.out / f"seed{seed:02d}"
            nights[seed] = night_rows(base, args.date, channel) if base.is_dir() else []
            if args.list:
                for r in nights[seed]:
                    print(f"  {channel} seed {seed:2d} {r['exposure']} {r['object'][:15]:15s} "
                          f"{r['exptime']:4.0f} s {r['method']:5s} measured "
                          f"{r['measured']:+.3f} +- {r['error']:.3f} true {r['before']:+.3f}"
                          f" after {r['after']:+.3f}")
        print(summarize(channel, nights), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
