"""Robustness benchmark: randomized simulated nights reduced with the pipeline's own entry
points, every metric against the simulator's truth, median and worst night per channel.

    python benchmarks/robustness.py [--nights 10] [--channels uv,orange,red,farred]
                                    [--out /tmp/robustness] [--reuse] [--write]

Night ``i`` (1..N) is ``simulate --randomize --seed i``: its nuisances (wavelength ripples,
arcs with missing, unlisted and blended lines, spectral flexure of every on-sky exposure,
line-spread changes, AMPNAME convention, scattered light, and whatever the other nuisance
sections draw) come from the seed. Each channel is calibrated and its on-sky exposures are
reduced (calibration_for, reduce_exposure). A metric is a function of one reduced night and
channel (:class:`NightChannel`) returning named numbers; add yours to :data:`METRICS`
(point-source flux, seeing, response shape...). ``--write`` writes the table to
benchmarks/ROBUSTNESS.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits

from panacea import instrument
from panacea.archive import Archive
from panacea.calbundle import bundle_path
from panacea.calibration import CalibrationOptions
from panacea.pipeline import calibration_for
from panacea.science import ChannelCalibration, ExposureResult, reduce_exposure
from panacea.simulate import NightConfig, simulate_night
from panacea.simulate.truth import ChannelTruth, load_channel, load_night, truth_dir

EDGE = 50  # columns at each end left out of the wavelength statistics


@dataclass
class NightChannel:
    """One randomized night and channel, reduced, with its truth."""

    seed: int
    date: str
    channel: str
    baseraw: Path
    truth: ChannelTruth
    night: dict  # night.json
    cal: ChannelCalibration
    bundle: object
    #: (exposure plan from night.json, result, exposure truth wavelength (280, ncol))
    exposures: list = field(default_factory=list)


def calibration_wavelength(nc: NightChannel) -> dict[str, float]:
    """RMS (px) over live fibers and columns of the calibration wavelengths against truth."""
    t = nc.truth
    d = ((nc.cal.wave - t.wavelength) / t.dispersion)[~t.dead][:, EDGE:-EDGE]
    return {"cal wavelength RMS (px)": float(np.sqrt(np.mean(d**2)))}


def science_zero_point(nc: NightChannel) -> dict[str, float]:
    """Largest |median wavelength error| (px) of the night's on-sky exposures after the sky
    refinement, and the same before it (the arcs' wavelengths)."""
    after, before = [], []
    for _, res, true_wave in nc.exposures:
        disp = np.gradient(true_wave, axis=1)
        live = ~nc.truth.dead
        wave = res.frame.wave if res.frame.wave is not None else nc.cal.wave
        after.append(abs(np.median(((wave - true_wave) / disp)[live][:, EDGE:-EDGE])))
        before.append(abs(np.median(((nc.cal.wave - true_wave) / disp)[live][:, EDGE:-EDGE])))
    return {"science zero point after (px)": float(max(after)),
            "science zero point before (px)": float(max(before))}


def trace_rms(nc: NightChannel) -> dict[str, float]:
    """RMS (px) of the calibration traces against truth, live fibers."""
    live = ~nc.truth.dead
    d = nc.cal.trace[live] - nc.truth.trace[live]
    return {"trace RMS (px)": float(np.sqrt(np.mean(d**2)))}


def sky_chi(nc: NightChannel) -> dict[str, float]:
    """Mean sky-fiber chi2/dof (SKYCHI2) of the night's on-sky exposures."""
    return {"sky chi2/dof": float(np.mean([r.header["SKYCHI2"] for _, r, _ in nc.exposures]))}


#: Metric functions applied to every night and channel; each returns {name: value}.
METRICS: list[Callable[[NightChannel], dict[str, float]]] = [
    calibration_wavelength, science_zero_point, trace_rms, sky_chi]
#: Metrics whose worst night is the smallest value (all others: the largest).
WORST_IS_LOW: set[str] = set()


def reduce_channel(seed: int, date: str, baseraw: Path, channel: str) -> NightChannel:
    """Calibrate one channel of a simulated night and reduce its on-sky exposures."""
    ch = instrument.get_channel(channel)
    archive = Archive(baseraw)
    night = archive.night(date)
    reduced = baseraw / "reduced"
    bundle = calibration_for(archive, date, ch, CalibrationOptions(), reduced)
    cal = ChannelCalibration.from_bundle(bundle, str(bundle_path(reduced, date, ch.name)))
    truth = load_channel(baseraw, date, ch.name)
    plans = {(e["obsid"], e["exp"]): e for e in load_night(baseraw, date)["exposures"]}
    nc = NightChannel(seed, date, channel, baseraw, truth, load_night(baseraw, date), cal,
                      bundle)
    for e in night.exposures(ftype="sci"):
        if not e.has_channel(ch):
            continue
        res: ExposureResult = reduce_exposure(night, e, cal)
        path = truth_dir(baseraw, date) / f"exp_{e.obsid:07d}_{e.exp:02d}_{ch.name}.fits"
        with fits.open(path) as hdul:
            names = [h.name for h in hdul]
            wave = (hdul["WAVELENGTH"].data.astype(float) if "WAVELENGTH" in names
                    else truth.wavelength)
        nc.exposures.append((plans[(e.obsid, e.exp)], res, wave))
    archive.close()
    return nc


def run(nights: int, channels: list[str], out: Path, date: str, reuse: bool
        ) -> dict[str, dict[str, list[float]]]:
    """Simulate (unless reused) and reduce the nights; values[channel][metric] per night."""
    values: dict[str, dict[str, list[float]]] = {c: {} for c in channels}
    for seed in range(1, nights + 1):
        base = out / f"seed{seed:02d}"
        if not (reuse and (base / date / "lrs2").is_dir()):
            t0 = time.perf_counter()
            simulate_night(NightConfig(date=date, seed=seed, channels=tuple(channels),
                                       randomize=True, extended=False), base, workers=1)
            print(f"night {seed}: simulated in {time.perf_counter() - t0:.0f} s", flush=True)
        for c in channels:
            t0 = time.perf_counter()
            nc = reduce_channel(seed, date, base, c)
            for metric in METRICS:
                for name, v in metric(nc).items():
                    values[c].setdefault(name, []).append(v)
            print(f"night {seed} {c}: reduced in {time.perf_counter() - t0:.0f} s; "
                  + ", ".join(f"{k} {v[-1]:.4f}" for k, v in values[c].items()), flush=True)
    return values


def table(values: dict[str, dict[str, list[float]]]) -> str:
    """Markdown: per channel and metric, the median and the worst night (and which)."""
    lines = ["| channel | metric | nights | median | worst (seed) |", "|---|---|---|---|---|"]
    for c, metrics in values.items():
        for name, v in metrics.items():
            a = np.asarray(v)
            worst = int(np.argmin(a) if name in WORST_IS_LOW else np.argmax(a))
            lines.append(f"| {c} | {name} | {a.size} | {np.median(a):.4f} | "
                         f"{a[worst]:.4f} ({worst + 1}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--nights", type=int, default=10, help="randomized nights, seeds 1..N")
    p.add_argument("--channels", default="uv,orange,red,farred")
    p.add_argument("--date", default="20181108")
    p.add_argument("--out", default="/tmp/robustness")
    p.add_argument("--reuse", action="store_true", help="reuse simulated nights found in --out")
    p.add_argument("--write", action="store_true", help="write benchmarks/ROBUSTNESS.md")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    channels = [instrument.get_channel(c).name for c in args.channels.split(",")]
    t0 = time.perf_counter()
    values = run(args.nights, channels, Path(args.out), args.date, args.reuse)
    text = table(values)
    print(text)
    if args.write:
        head = (f"# Robustness on randomized nights\n\nWritten by `python benchmarks/"
                f"robustness.py --nights {args.nights} --channels {','.join(channels)} "
                f"--write` ({time.perf_counter() - t0:.0f} s, {os.cpu_count()} cores). "
                "Zero points: the largest of the night's on-sky exposures.\n\n")
        (Path(__file__).parent / "ROBUSTNESS.md").write_text(head + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
