"""Source benchmark: the products of a reduced simulated night against the simulator truth.

    python benchmarks/sources.py --raw DIR --reduced DIR [--date 20181108]

Reads ``spectrum_*`` and ``multi_*`` files of the point-source exposures (standards and the
science target) and prints a Markdown table: position, FWHM and refraction-track errors,
and the flux-calibrated spectrum against the true F_lambda (with the response the pipeline
derived from the night's standard), plus the continuity of the joined spectrum and the
extended target's continuum against the true light on the IFU and in total.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
from astropy.io import fits
from scipy.ndimage import median_filter

from panacea import instrument
from panacea.simulate import night as simnight
from panacea.simulate import spectra as simspectra
from panacea.simulate.night import ExposurePlan, dar_offsets
from panacea.simulate.truth import load_night, truth_dir
from panacea.source import sky_line_mask

EDGE = 60  # grid points at each end left out (partial coverage, response edges)


def _plan(night: dict, obsid: int, exp: int) -> ExposurePlan:
    p = next(e for e in night["exposures"] if e["obsid"] == obsid and e["exp"] == exp)
    return ExposurePlan(**p)


def _true_flambda(raw: Path, date: str, kind: str, wave: np.ndarray) -> np.ndarray:
    name = "science.txt" if kind == "science" else "standard.txt"
    w, f = np.loadtxt(truth_dir(raw, date) / "spectra" / name, unpack=True)
    return np.interp(wave, w, f)


def measure(raw: Path, reduced: Path, date: str) -> tuple[list, list]:
    night = load_night(raw, date)
    rows = []
    for p in night["exposures"]:
        if p["kind"] not in ("standard", "science"):
            continue
        plan = ExposurePlan(**p)
        for ch in instrument.channels().values():
            if plan.kind == "standard" and plan.source_slot != ch.ifuslot:
                continue
            hits = list(reduced.rglob(f"spectrum_{date}_{plan.obsid:07d}_exp{plan.exp:02d}_"
                                      f"{ch.name}.fits"))
            if not hits:
                rows.append((ch.name, plan, None))
                continue
            with fits.open(hits[0]) as hdul:
                spec, head = hdul[0].data.astype(float), hdul[0].header
            multi = hits[0].parent / hits[0].name.replace("spectrum_", "multi_")
            with fits.open(multi) as hdul:
                adr = hdul["ADR"].data.astype(float)
            wave = spec[0]
            ref = float(head["SOURCEW"])
            tdx, tdy = dar_offsets(plan, np.array([ref]))
            pos_err = np.hypot(head["SOURCEX"] - plan.source_xy[0] - tdx[0],
                               head["SOURCEY"] - plan.source_xy[1] - tdy[0])
            true_fwhm = plan.seeing * (ref / 5000.0) ** -0.2
            # refraction track relative to the reference wavelength
            adx, ady = dar_offsets(plan, adr[0])
            track_err = np.max(np.hypot(adr[1] - (adx - tdx[0]), adr[2] - (ady - tdy[0])))
            flam = _true_flambda(raw, date, plan.kind, wave)
            good = (spec[3] > 0) & ~sky_line_mask(spec[2][None, :], 1.05)
            good[:EDGE] = good[-EDGE:] = False
            ratio = spec[1][good] / flam[good]
            smooth = median_filter(spec[1] / flam, 21)[good]
            rows.append((ch.name, plan, {
                "pos": pos_err, "fwhm": head["SEEING"] / true_fwhm - 1, "track": track_err,
                "median": np.median(ratio) - 1, "rms": np.std(ratio),
                "rms_smooth": np.std(smooth), "fluxcal": head["FLUXCAL"],
                "dartrack": head.get("DARTRACK", "")}))
    joins = []
    for path in sorted(reduced.rglob(f"joined_{date}_*.fits")):
        # mismatch of each channel with its blue neighbour in their overlap (the join
        # divides it out; it is the inverse of the scale written in the header)
        head = fits.getheader(path)
        present = sorted(set(np.asarray(fits.getdata(path, 1)["channel"]).tolist()))
        names = ("uv", "orange", "red", "farred")
        jumps = {f"{names[a]}→{names[b]}": 1 / head[f"SCL_{names[b].upper()[:4]}"] - 1
                 for a, b in itertools.pairwise(present)}
        joins.append((path.name, jumps))
    return rows, joins


def extended(raw: Path, reduced: Path, date: str) -> list:
    """The extended target's continuum (its lines and sky lines masked) against the truth:
    median of F_lambda over the true light on the IFU and over the true total, per
    channel, and the source cards that say how the pipeline treated it."""
    night = load_night(raw, date)
    rows = []
    for p in night["exposures"]:
        if p["kind"] != "extended":
            continue
        plan = ExposurePlan(**p)
        on_ifu = float(simnight.extended_profile(plan).sum())  # arcsec^2
        total = 2 * np.pi * simnight.EXTENDED_SCALE**2 * simnight.EXTENDED_RATIO
        lines = np.array([w for w, _ in simspectra.EXTENDED_LINES]) * (1 + simnight.EXTENDED_Z)
        for ch in instrument.channels().values():
            hits = list(reduced.rglob(f"spectrum_{date}_{plan.obsid:07d}_exp{plan.exp:02d}_"
                                      f"{ch.name}.fits"))
            if not hits:
                continue
            with fits.open(hits[0]) as hdul:
                spec, head = hdul[0].data.astype(float), hdul[0].header
            wave = spec[0]
            good = (spec[3] > 0) & ~sky_line_mask(spec[2][None, :], 1.05)
            good &= np.min(np.abs(wave[:, None] - lines[None, :]), axis=1) > 20.0
            good[:EDGE] = good[-EDGE:] = False
            ratio = np.median(spec[1][good] / simspectra.ab_to_flambda(simnight.EXTENDED_AB,
                                                                      wave[good]))
            rel_err = np.median(spec[3][good] / np.abs(spec[1][good]))
            rows.append((ch.name, plan, ratio / on_ifu, ratio / total, rel_err, head))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--raw", required=True)
    p.add_argument("--reduced", required=True)
    p.add_argument("--date", default="20181108")
    args = p.parse_args(argv)
    rows, joins = measure(Path(args.raw), Path(args.reduced), args.date)
    print("| channel | exposure | kind | position error (\") | FWHM error (%) | track error "
          "(\") | track | F_λ median ratio − 1 (%) | RMS of ratio (%) | RMS, 21-px median "
          "(%) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, plan, m in rows:
        tag = f"obs {plan.obsid} exp {plan.exp}"
        if m is None:
            print(f"| {name} | {tag} | {plan.kind} | not found | | | | | | |")
            continue
        print(f"| {name} | {tag} | {plan.kind} | {m['pos']:.3f} | {100 * m['fwhm']:+.1f} | "
              f"{m['track']:.3f} | {m['dartrack']} | {100 * m['median']:+.2f} | "
              f"{100 * m['rms']:.2f} | {100 * m['rms_smooth']:.2f} |")
    print("\n| joined spectrum: channel mismatch in the overlap | uv→orange | orange→red | "
          "red→farred |\n|---|---|---|---|")
    for name, jumps in joins:
        cells = [f"{100 * jumps[k]:+.2f} %" if k in jumps else "" for k in
                 ("uv→orange", "orange→red", "red→farred")]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\n| channel | extended target | F / true light on the IFU | F / true total | "
          "median error / F | SRCEXT | PSFBETA | PSFOUT | PSFXTRP | NSKYFIB |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    for name, plan, r_ifu, r_tot, rel, h in extended(Path(args.raw), Path(args.reduced),
                                                     args.date):
        print(f"| {name} | obs {plan.obsid} exp {plan.exp} | {r_ifu:.3f} | {r_tot:.3f} | "
              f"{rel:.3f} | {h.get('SRCEXT', '')} | {h.get('PSFBETA', '')} | "
              f"{h.get('PSFOUT', '')} | {h.get('PSFXTRP', '')} | {h.get('NSKYFIB', '')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
