"""Flux and PSF figures of a reduced randomized night against the simulator's truth.

Plain functions for the robustness benchmark (``benchmarks/robustness.py`` gathers them over
nights); each takes the simulated archive root (holding ``truth/{date}``), the product tree
of its reduction and the date, and returns figures per channel:

* :func:`point_source_figures`: for every science point-source exposure, the median of
  F_pipeline / F_true (``flux_ratio``) and the measured over the true seeing at SOURCEW
  (``seeing_ratio``), with the PSF the pipeline chose and the true one.
* :func:`shape_figures`: the 21-pixel running median of F_pipeline / F_true of the science
  target, normalised by its median: RMS and largest deviation more than 30 A from the
  channel's ends (``shape_rms``, ``shape_max``), leaving out the pixels the pipeline flags
  as saturated telluric absorption (standard's transmission < ``MIN_TELLURIC``), and the
  maximum that photon noise alone gives (``shape_noise_max``, :func:`noise_floor`).
* :func:`response_figures`: the night's derived response against the true one (normalised
  RMS and largest deviation beyond 30 A from the ends, outside telluric bands).

    python benchmarks/robust_flux.py --raw DIR --reduced DIR --date YYYYMMDD
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from astropy.io import fits
from numpy.lib.stride_tricks import sliding_window_view

from panacea import instrument
from panacea.fluxcal import MIN_TELLURIC, telluric_bands
from panacea.simulate.night import ExposurePlan
from panacea.simulate.truth import load_channel, load_night, truth_dir

END_MARGIN = 30.0  # Angstrom from a channel's ends left out of the shape figures
RUN = 21  # pixels of the running median
NOISE_DRAWS = 7  # noise realisations of the shape maximum's noise floor


def _science_plans(night: dict) -> list[ExposurePlan]:
    return [ExposurePlan(**p) for p in night["exposures"] if p["kind"] == "science"]


def _spectrum(reduced: Path, date: str, plan: ExposurePlan, channel: str):
    hits = list(reduced.rglob(f"spectrum_{date}_{plan.obsid:07d}_exp{plan.exp:02d}_"
                              f"{channel}.fits"))
    if not hits:
        return None, None
    with fits.open(hits[0]) as hdul:
        return hdul[0].data.astype(float), hdul[0].header.copy()


def _true_flambda(raw: Path, date: str, wave: np.ndarray) -> np.ndarray:
    w, f = np.loadtxt(truth_dir(raw, date) / "spectra" / "science.txt", unpack=True)
    return np.interp(wave, w, f)


def _saturated(reduced: Path, date: str, channel: str, wave: np.ndarray) -> np.ndarray:
    """Pixels the pipeline leaves uncorrected for saturated telluric absorption."""
    path = Path(reduced) / "CALS" / f"response_{date}_{channel}.fits"
    if not path.is_file():
        return np.zeros(wave.size, bool)
    with fits.open(path) as hdul:
        if "TELLURIC" not in hdul:
            return np.zeros(wave.size, bool)
        rw = hdul[0].data[0]
        t = hdul["TELLURIC"].data.astype(float)
    return np.interp(wave, rw, t) < MIN_TELLURIC


def _far(wave: np.ndarray) -> np.ndarray:
    return (wave > wave[0] + END_MARGIN) & (wave < wave[-1] - END_MARGIN)


def point_source_figures(raw: str | Path, reduced: str | Path, date: str) -> dict:
    """Per channel, the worst (largest deviation from 1) flux and seeing ratios over the
    night's science exposures, and the PSF used against the truth."""
    raw, reduced = Path(raw), Path(reduced)
    night = load_night(raw, date)
    out: dict = {}
    for ch in instrument.channels().values():
        flux, seeing, psf = [], [], []
        for plan in _science_plans(night):
            spec, head = _spectrum(reduced, date, plan, ch.name)
            if spec is None:
                continue
            wave = spec[0]
            good = (spec[3] > 0) & _far(wave) & ~_saturated(reduced, date, ch.name, wave)
            flux.append(float(np.median(spec[1][good] / _true_flambda(raw, date, wave)[good])))
            ref = float(head["SOURCEW"])
            seeing.append(float(head["SEEING"]) / (plan.seeing * (ref / 5000.0) ** -0.2))
            psf.append(f"{head.get('PSFMODEL', '?')} {head.get('PSFBETA', '')} (true "
                       f"{plan.psf_model} {plan.psf_beta:.2f})")
        if flux:
            k = int(np.argmax(np.abs(np.array(flux) - 1)))
            j = int(np.argmax(np.abs(np.array(seeing) - 1)))
            out[ch.name] = {"flux_ratio": flux[k], "seeing_ratio": seeing[j], "psf": psf[k]}
    return out


def running_median(values: np.ndarray, size: int = RUN) -> np.ndarray:
    """Running median over ``size`` pixels that ignores NaN (left-out pixels); NaN where
    fewer than half the window's pixels are finite. The ends are padded with the end
    values. (scipy's ``median_filter`` does not skip NaN: beside a flagged band its windows
    returned values that no pixel held, e.g. +2.9 % beside the O2 A band where the
    finite pixels' median was +1.1 %.)"""
    half = size // 2
    win = sliding_window_view(np.pad(np.asarray(values, float), half, mode="edge"), size)
    finite = np.isfinite(win).sum(axis=1)
    out = np.full(finite.size, np.nan)
    ok = finite > half
    out[ok] = np.nanmedian(win[ok], axis=1)
    return out


def shape_errors(ratio: np.ndarray, wave: np.ndarray, use: np.ndarray) -> tuple[float, float]:
    """RMS and largest |deviation| of the running median of ``ratio`` (over the ``use``
    pixels, normalised by its median) more than :data:`END_MARGIN` from the ends."""
    run = running_median(np.where(use, ratio, np.nan))
    sel = use & _far(wave) & np.isfinite(run)
    dev = run[sel] / np.median(run[sel]) - 1
    return float(np.sqrt(np.mean(dev**2))), float(np.max(np.abs(dev)))


def shape_figures(raw: str | Path, reduced: str | Path, date: str) -> dict:
    """Per channel, the worst running-median shape RMS and maximum of the science target."""
    raw, reduced = Path(raw), Path(reduced)
    night = load_night(raw, date)
    out: dict = {}
    for ch in instrument.channels().values():
        rms, worst, floor = [], [], []
        for plan in _science_plans(night):
            spec, _ = _spectrum(reduced, date, plan, ch.name)
            if spec is None:
                continue
            wave = spec[0]
            use = (spec[3] > 0) & ~_saturated(reduced, date, ch.name, wave)
            truth = _true_flambda(raw, date, wave)
            r, m = shape_errors(spec[1] / truth, wave, use)
            rms.append(r)
            worst.append(m)
            floor.append(noise_floor(spec[3] / truth, wave, use, seed=plan.exp))
        if rms:
            out[ch.name] = {"shape_rms": max(rms), "shape_max": max(worst),
                            "shape_noise_max": max(floor)}
    return out


def noise_floor(rel_err: np.ndarray, wave: np.ndarray, use: np.ndarray, n: int = NOISE_DRAWS,
                seed: int = 0) -> float:
    """What photon noise alone makes of the shape maximum: the median over ``n`` draws of
    the largest deviation of the running median of ``1 + rel_err * N(0, 1)`` (``rel_err``:
    the pipeline's error of F over the true F) more than :data:`END_MARGIN` from the ends.
    A shape maximum near this is noise, not a feature."""
    rng = np.random.default_rng(seed)
    draws = [shape_errors(1 + rel_err * rng.standard_normal(rel_err.size), wave, use)[1]
             for _ in range(n)]
    return float(np.median(draws))


def response_figures(raw: str | Path, reduced: str | Path, date: str) -> dict:
    """Per channel, the derived response's shape against the true one (outside the telluric
    bands, which the true response does not hold)."""
    raw, reduced = Path(raw), Path(reduced)
    out: dict = {}
    for ch in instrument.channels().values():
        path = reduced / "CALS" / f"response_{date}_{ch.name}.fits"
        if not path.is_file() or not (truth_dir(raw, date) / f"channel_{ch.name}.fits").is_file():
            continue
        wave, resp = fits.getdata(path).astype(float)
        truth = load_channel(raw, date, ch.name).response
        ratio = resp / np.interp(wave, truth[0], truth[1])
        use = np.ones(wave.size, bool)
        for b in telluric_bands():
            use &= ~((wave >= b.lo) & (wave <= b.hi))
        r, m = shape_errors(ratio, wave, use)
        out[ch.name] = {"response_rms": r, "response_max": m}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--raw", required=True)
    p.add_argument("--reduced", required=True)
    p.add_argument("--date", required=True)
    args = p.parse_args(argv)
    figures = {"point_source": point_source_figures(args.raw, args.reduced, args.date),
               "shape": shape_figures(args.raw, args.reduced, args.date),
               "response": response_figures(args.raw, args.reduced, args.date)}
    sys.stdout.write(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
