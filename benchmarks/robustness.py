"""Robustness benchmark: randomized simulated nights reduced once each with the pipeline's
command line, every metric read from the products against the simulator's truth, median and
worst night per channel next to issue 12's targets.

    python benchmarks/robustness.py [--nights 10] [--channels uv,orange,red,farred]
                                    [--out /tmp/robustness] [--reuse] [--measure-only]
                                    [--write]

Night ``i`` (1..N) is ``simulate --randomize --seed i``: its nuisances (wavelength ripples,
arcs with missing, unlisted and blended lines, spectral flexure of every on-sky exposure,
line-spread changes, AMPNAME convention, scattered light, PSF shape and seeing, source
position, standards with stellar lines, telluric absorption...) come from the seed. The night
is reduced once with ``panacea-lrs2 -d DATE -s CHANNELS --baseraw RAW --output RAW/reduced
--jobs 2 --cubes none`` (:func:`panacea.cli.main`); every metric then reads the product tree:

* the calibration bundles (``CALS/cal_*``): wavelength and trace against the truth;
* the ``multi_*`` files of every on-sky exposure: the science wavelengths are the bundle's
  arc solution moved by the sky-line offset written in their header (WSHIFT, WSTRETCH and the
  Legendre curve WSLEGn, :func:`panacea.skywave.apply_shift`), and SKYCHI2;
* the ``spectrum_*`` files and ``CALS/response_*`` (``robust_flux.py``): point-source flux
  and seeing, science and response shape.

A metric is a function of one reduced night and channel (:class:`NightChannel`) returning
named numbers; :data:`METRICS` lists them and :data:`TARGETS` their targets. Each night's
figures are cached in ``{out}/seedNN/metrics.json`` (the table can be written from the nights
done so far with ``--measure-only``). ``--write`` writes benchmarks/ROBUSTNESS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits

from panacea import instrument
from panacea.calbundle import bundle_path, read_bundle
from panacea.simulate import NightConfig, simulate_night
from panacea.simulate.truth import ChannelTruth, load_channel, truth_dir
from panacea.skywave import SkyShift, apply_shift

sys.path.insert(0, str(Path(__file__).parent))
import robust_flux  # a sibling module of this script

EDGE = 50  # columns at each end left out of the wavelength statistics
DONE = ".reduced"  # marker written in a night's directory once its reduction has finished
MULTI = re.compile(r"multi_(\d{8})_(\d{7})_exp(\d{2})_([a-z]+)\.fits$")


@dataclass
class NightChannel:
    """One randomized night and channel, reduced, with its truth."""

    seed: int
    date: str
    channel: str
    baseraw: Path
    reduced: Path
    truth: ChannelTruth
    wave: np.ndarray  # the calibration bundle's wavelengths (280, ncol), Angstrom
    trace: np.ndarray  # the bundle's traces (280, ncol), px
    #: per on-sky exposure: (multi primary header, science wavelengths (280, ncol), truth
    #: wavelengths of that exposure (280, ncol))
    exposures: list = field(default_factory=list)
    #: robust_flux figures of this channel (empty when the night has none)
    flux: dict = field(default_factory=dict)


def science_wavelength(wave: np.ndarray, header: fits.Header) -> np.ndarray:
    """The wavelengths (A) the pipeline gave an exposure's fibers: the arc solution ``wave``
    moved by the sky-line offset its header records."""
    coeffs = tuple(float(header[f"WSLEG{i}"]) for i in range(8) if f"WSLEG{i}" in header)
    ws = SkyShift(shift=float(header.get("WSHIFT", 0.0)),
                  stretch=float(header.get("WSTRETCH", 0.0)),
                  method=str(header.get("WSHIFTM", "none")), coeffs=coeffs)
    return apply_shift(wave, ws)


def calibration_wavelength(nc: NightChannel) -> dict[str, float]:
    """RMS (px) over live fibers and columns of the calibration wavelengths against truth."""
    t = nc.truth
    d = ((nc.wave - t.wavelength) / t.dispersion)[~t.dead][:, EDGE:-EDGE]
    return {"cal wavelength RMS (px)": float(np.sqrt(np.mean(d**2)))}


def science_zero_point(nc: NightChannel) -> dict[str, float]:
    """Largest |median wavelength error| (px) of the night's on-sky exposures after the sky
    refinement, and the same before it (the arcs' wavelengths)."""
    after, before = [], []
    live = ~nc.truth.dead
    for _, wave, true_wave in nc.exposures:
        disp = np.gradient(true_wave, axis=1)
        after.append(abs(np.median(((wave - true_wave) / disp)[live][:, EDGE:-EDGE])))
        before.append(abs(np.median(((nc.wave - true_wave) / disp)[live][:, EDGE:-EDGE])))
    if not after:
        return {}
    return {"science zero point after (px)": float(max(after)),
            "science zero point before (px)": float(max(before))}


def trace_rms(nc: NightChannel) -> dict[str, float]:
    """RMS (px) of the calibration traces against truth, live fibers."""
    live = ~nc.truth.dead
    d = nc.trace[live] - nc.truth.trace[live]
    return {"trace RMS (px)": float(np.sqrt(np.mean(d**2)))}


def sky_chi(nc: NightChannel) -> dict[str, float]:
    """Mean sky-fiber chi2/dof (SKYCHI2) of the night's on-sky exposures."""
    if not nc.exposures:
        return {}
    return {"sky chi2/dof": float(np.mean([h["SKYCHI2"] for h, _, _ in nc.exposures]))}


def flux_figures(nc: NightChannel) -> dict[str, float]:
    """Point-source flux and seeing (the night's worst science exposure), |ratio - 1| in %,
    and the science and response shapes in % (``robust_flux.py``)."""
    f = nc.flux
    out: dict[str, float] = {}
    if "flux_ratio" in f:
        out["point-source flux abs(F/F_true - 1) (%)"] = 100 * abs(f["flux_ratio"] - 1)
        out["seeing abs(s/s_true - 1) (%)"] = 100 * abs(f["seeing_ratio"] - 1)
    if "response_rms" in f:
        out["response shape RMS (%)"] = 100 * f["response_rms"]
        out["response shape max >30 A from ends (%)"] = 100 * f["response_max"]
    if "shape_rms" in f:
        out["science shape RMS (%)"] = 100 * f["shape_rms"]
        out["science shape max >30 A from ends (%)"] = 100 * f["shape_max"]
    if "shape_noise_max" in f:
        out["science shape max, noise alone (%)"] = 100 * f["shape_noise_max"]
    return out


#: Metric functions applied to every night and channel; each returns {name: value}.
METRICS: list[Callable[[NightChannel], dict[str, float]]] = [
    calibration_wavelength, science_zero_point, trace_rms, sky_chi, flux_figures]
#: Metrics whose worst night is the smallest value (all others: the largest).
WORST_IS_LOW: set[str] = set()

_ZP = {"uv": (0.04, 0.08), "orange": (0.04, 0.08), "red": (0.02, 0.04),
       "farred": (0.02, 0.04)}
#: Issue 12's targets: metric -> {channel: (median, worst)} ("*": every channel); metrics
#: without a number must not get worse than the single-night figures (README).
TARGETS: dict[str, dict[str, tuple[float, float]]] = {
    "cal wavelength RMS (px)": {"*": (0.015, 0.03)},
    "science zero point after (px)": _ZP,
    "point-source flux abs(F/F_true - 1) (%)": {"*": (2.0, 3.0)},
    "seeing abs(s/s_true - 1) (%)": {"*": (5.0, 8.0)},
    "response shape RMS (%)": {"*": (1.0, 1.5)},
    "response shape max >30 A from ends (%)": {"*": (2.0, 2.0)},
    "science shape RMS (%)": {"*": (1.0, 1.5)},
    "science shape max >30 A from ends (%)": {"*": (2.0, 2.0)},
}


def target(name: str, channel: str) -> tuple[float, float] | None:
    t = TARGETS.get(name, {})
    return t.get(channel, t.get("*"))


def simulate(seed: int, date: str, base: Path, channels: list[str]) -> None:
    """Write randomized night ``seed`` under ``base``."""
    simulate_night(NightConfig(date=date, seed=seed, channels=tuple(channels),
                               randomize=True, extended=False), base, workers=2)


def reduce_night(date: str, base: Path, channels: list[str], jobs: int) -> int:
    """Reduce the night with the command line (in a child process, so that one night's
    logging set-up and memory do not carry over); its exit code."""
    cmd = [sys.executable, "-c", "import sys; from panacea.cli import main; "
           "sys.exit(main(sys.argv[1:]))", "-d", date, "-s", ",".join(channels),
           "--baseraw", str(base), "--output", str(base / "reduced"), "--jobs", str(jobs),
           "--cubes", "none"]
    with open(base / "reduce.log", "w") as log:
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False).returncode


def load_night_channel(seed: int, date: str, base: Path, channel: str,
                       flux: dict) -> NightChannel | None:
    """The products of one reduced channel with its truth (None: no calibration bundle)."""
    reduced = base / "reduced"
    path = bundle_path(reduced, date, channel)
    if not path.is_file():
        return None
    b = read_bundle(path, verify=False)
    truth = load_channel(base, date, channel)
    nc = NightChannel(seed, date, channel, base, reduced, truth,
                      b["wavelength"].astype(float), b["trace"].astype(float))
    for multi in sorted(reduced.rglob(f"multi_{date}_*_{channel}.fits")):
        m = MULTI.search(multi.name)
        if m is None:
            continue
        header = fits.getheader(multi, 0)
        tpath = truth_dir(base, date) / f"exp_{m.group(2)}_{m.group(3)}_{channel}.fits"
        true_wave = truth.wavelength
        if tpath.is_file():
            with fits.open(tpath) as hdul:
                if "WAVELENGTH" in [h.name for h in hdul]:
                    true_wave = hdul["WAVELENGTH"].data.astype(float)
        nc.exposures.append((header, science_wavelength(nc.wave, header), true_wave))
    nc.flux = flux.get(channel, {})
    return nc


def measure(seed: int, date: str, base: Path, channels: list[str]) -> dict:
    """Every metric of one reduced night: {channel: {metric: value}} and the run's facts."""
    flux: dict[str, dict] = {}
    for figures in (robust_flux.point_source_figures(base, base / "reduced", date),
                    robust_flux.shape_figures(base, base / "reduced", date),
                    robust_flux.response_figures(base, base / "reduced", date)):
        for c, f in figures.items():
            flux.setdefault(c, {}).update(f)
    out: dict = {"seed": seed, "channels": {}, "psf": {}}
    for c in channels:
        nc = load_night_channel(seed, date, base, c, flux)
        if nc is None:
            continue
        values: dict[str, float] = {}
        for metric in METRICS:
            values.update(metric(nc))
        out["channels"][c] = values
        out["psf"][c] = flux.get(c, {}).get("psf", "")
        out.setdefault("exposures", {})[c] = len(nc.exposures)
    summary = base / "reduced" / "NIGHTS" / date / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        out["summary"] = {k: s[k] for k in ("status", "counts", "exit_code") if k in s}
    return out


def run(nights: int, channels: list[str], out: Path, date: str, reuse: bool,
        measure_only: bool, jobs: int) -> list[dict]:
    """Simulate, reduce and measure the nights one after another (each night's figures
    cached in ``seedNN/metrics.json``); with ``measure_only`` only nights already reduced."""
    results = []
    for seed in range(1, nights + 1):
        base = out / f"seed{seed:02d}"
        cache = base / "metrics.json"
        if reuse and cache.is_file():
            results.append(json.loads(cache.read_text()))
            continue
        if not (base / DONE).is_file():
            if measure_only:
                continue
            t0 = time.perf_counter()
            if not (reuse and (base / date / "lrs2").is_dir() and (base / "truth").is_dir()):
                simulate(seed, date, base, channels)
            t1 = time.perf_counter()
            rc = reduce_night(date, base, channels, jobs)
            t2 = time.perf_counter()
            (base / DONE).write_text(json.dumps({"simulate_s": round(t1 - t0, 1),
                                                 "reduce_s": round(t2 - t1, 1), "rc": rc}))
            print(f"night {seed}: simulated in {t1 - t0:.0f} s, reduced in {t2 - t1:.0f} s "
                  f"(exit {rc})", flush=True)
        res = measure(seed, date, base, channels)
        try:
            res["run"] = json.loads((base / DONE).read_text())
        except ValueError:
            res["run"] = {}
        cache.write_text(json.dumps(res, indent=1))
        for c, values in res["channels"].items():
            print(f"night {seed} {c}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()),
                  flush=True)
        results.append(res)
    return results


def gather(results: list[dict], channels: list[str]) -> dict[str, dict[str, list]]:
    """values[channel][metric] = [(seed, value), ...]."""
    values: dict[str, dict[str, list]] = {c: {} for c in channels}
    for res in results:
        for c, metrics in res["channels"].items():
            if c not in values:
                continue
            for name, v in metrics.items():
                values[c].setdefault(name, []).append((res["seed"], v))
    return values


def table(values: dict[str, dict[str, list]]) -> str:
    """Markdown: per channel and metric, the median and the worst night (and which), the
    target and whether both are met."""
    lines = ["| channel | metric | nights | median | worst (seed) | target median / worst "
             "| met |", "|---|---|---|---|---|---|---|"]
    order = list(TARGETS) + ["science shape max, noise alone (%)",
                             "science zero point before (px)", "trace RMS (px)", "sky chi2/dof"]
    for c, metrics in values.items():
        for name in sorted(metrics, key=lambda n: order.index(n) if n in order else 99):
            seeds, a = zip(*metrics[name])
            a = np.asarray(a, float)
            k = int(np.argmin(a) if name in WORST_IS_LOW else np.argmax(a))
            t = target(name, c)
            med = float(np.median(a))
            met = "" if t is None else ("yes" if med <= t[0] and a[k] <= t[1] else "no")
            ts = "" if t is None else f"{t[0]:g} / {t[1]:g}"
            lines.append(f"| {c} | {name} | {a.size} | {med:.4f} | {a[k]:.4f} ({seeds[k]}) | "
                         f"{ts} | {met} |")
    return "\n".join(lines)


HOW = """How measured: night ``i`` is ``panacea-lrs2 simulate --randomize --seed i --no-extended``
(date {date}, all four channels; the nuisances of issue 12 drawn per seed). Each night is
reduced once with the command line (``panacea-lrs2 -d {date} -s {chans} --baseraw RAW
--output RAW/reduced --jobs {jobs} --cubes none``) and every figure is read from its products
against the simulator's truth. Calibration wavelength RMS and trace RMS: the bundle
(``CALS/cal_*``) over live fibers (wavelength: columns {edge}..ncol-{edge}). Science zero
point: the largest |median wavelength error| (px) among the night's on-sky exposures
(standards and sky frames included), the science wavelengths being the bundle's solution
moved by the sky-line offset of each ``multi_*`` header (WSHIFT/WSTRETCH/WSLEGn); "before" is
the arcs' solution alone. Sky chi2/dof: mean SKYCHI2 of the on-sky exposures. Point-source
flux: median over the channel (beyond 30 A from its ends, outside saturated telluric bands)
of F_pipeline / F_true of the science target's ``spectrum_*``; seeing: SEEING over the true
FWHM at SOURCEW; both the night's worst science exposure, as abs(ratio - 1). Shapes: the
21-pixel running median of F_pipeline / F_true (science) or of the derived response over
the true one (``CALS/response_*``, outside telluric bands), normalised by its median: RMS
and largest deviation more than 30 A from the channel's ends (the running median skips
left-out pixels); "noise alone" is that maximum for the truth times 1 + the pipeline's
relative error times Gaussian noise (median of 7 draws): a shape maximum near it is photon
noise, not a feature. Worst: the largest value over
the nights. Targets: issue 12 (metrics without a target: nothing may get worse than today's
single-night figures in README.md)."""


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                               text=True, cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def document(results: list[dict], channels: list[str], text: str, args) -> str:
    """benchmarks/ROBUSTNESS.md."""
    n = len(results)
    psf = []
    for res in results:
        run = res.get("run", {})
        p = next(iter(v for v in res.get("psf", {}).values() if v), "")
        nexp = sum(res.get("exposures", {}).values())
        counts = res.get("summary", {}).get("counts", {})
        psf.append(f"| {res['seed']} | {run.get('simulate_s', '')} | {run.get('reduce_s', '')} "
                   f"| {nexp} | {counts.get('written', '')} / {counts.get('failed', '')} "
                   f"| {run.get('rc', '')} | {p} |")
    return (f"# Robustness on randomized nights\n\n"
            f"`python benchmarks/robustness.py --nights {args.nights} --channels "
            f"{','.join(channels)} --write`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
            f", commit {commit()}, {os.cpu_count()} shared cores. **{n} of {args.nights} "
            f"nights** measured (seeds {', '.join(str(r['seed']) for r in results)}).\n\n"
            + HOW.format(date=args.date, chans=",".join(channels), jobs=args.jobs, edge=EDGE)
            + "\n\n" + text + "\n\nPer night: simulation and reduction time (s, 2 shared "
            "cores; the reduction holds the four channels' calibrations, every on-sky "
            "exposure-channel and the QA report), on-sky exposure-channels measured, products "
            "written / failed (summary.json), the reduction's exit code, and the PSF of the "
            "worst point-source exposure (pipeline's choice with beta, true with beta).\n\n"
            "| seed | simulate (s) | reduce (s) | exposure-channels | written / failed | exit "
            "| PSF |\n|---|---|---|---|---|---|---|\n" + "\n".join(psf) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--nights", type=int, default=10, help="randomized nights, seeds 1..N")
    p.add_argument("--channels", default="uv,orange,red,farred")
    p.add_argument("--date", default="20181108")
    p.add_argument("--out", default="/tmp/robustness")
    p.add_argument("--jobs", type=int, default=2, help="--jobs of the reduction")
    p.add_argument("--reuse", action="store_true",
                   help="reuse simulated nights, reductions and metrics found in --out")
    p.add_argument("--measure-only", action="store_true",
                   help="only the nights already reduced in --out (a partial table)")
    p.add_argument("--write", action="store_true", help="write benchmarks/ROBUSTNESS.md")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    channels = [instrument.get_channel(c).name for c in args.channels.split(",")]
    results = run(args.nights, channels, Path(args.out), args.date, args.reuse,
                  args.measure_only, args.jobs)
    text = table(gather(results, channels))
    print(f"{len(results)} nights\n{text}")
    if args.write:
        (Path(__file__).parent / "ROBUSTNESS.md").write_text(
            document(results, channels, text, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
