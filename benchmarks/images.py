"""Make the README's pictures from a simulated night (run after benchmarks/run.py).

    python benchmarks/images.py [--out benchmarks/out] [--date 20181108]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from panacea.archive import Archive
from panacea.calbundle import bundle_path, read_bundle
from panacea.ccd import read_channel
from panacea import instrument
from panacea.products import MULTI_LAYOUT, read_product
from panacea.qa import plot_frame, plot_multi_summary, plot_residual_maps
from panacea.simulate.truth import load_channel


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/out")
    p.add_argument("--date", default="20181108")
    p.add_argument("--images", default="images")
    p.add_argument("--demo", default="LRS2/demo/reduced", help="reduced product tree")
    args = p.parse_args(argv)
    images = Path(args.images)
    images.mkdir(exist_ok=True)
    night = Archive(args.out).night(args.date)
    sci = night.exposures(ftype="sci", channel="uv")
    target = next(e for e in sci if e.program)
    frame = read_channel(night, target, "uv")
    plot_frame(frame.image, images / "sim_uv_science.png",
               f"simulated uv science frame {target.name}", zoom=(slice(1040, 1140),
                                                                  slice(1380, 1560)))
    cal = Path(args.out) / "reduced"
    for ch in ("uv", "farred"):
        path = bundle_path(cal, args.date, ch)
        if not path.exists():
            continue
        b = read_bundle(path)
        t = load_channel(args.out, args.date, ch)
        live = ~t.dead
        maps = {
            "trace - truth (px)": np.where(live[:, None], b["trace"] - t.trace, np.nan),
            "wavelength - truth (px)": np.where(
                live[:, None], (b["wavelength"] - t.wavelength) / t.dispersion, np.nan),
        }
        plot_residual_maps(maps, images / f"calibration_residuals_{ch}.png", "px",
                           f"{ch}: calibration against simulator truth")
    demo = Path(args.demo)
    multi = demo / "HET18-2-100" / f"multi_{args.date}_0000012_exp01_orange.fits"
    if multi.exists():
        arrays, header = read_product(MULTI_LAYOUT, multi)
        plot_multi_summary(arrays, instrument.get_channel("orange").grid,
                           images / "multi_orange_science.png",
                           f"{multi.name} ({header.get('BUNIT', '')})")
    joined = demo / "HET18-2-100" / f"joined_{args.date}_0000012.fits"
    if joined.exists():
        from astropy.table import Table

        from panacea.qa import plot_joined
        from panacea.simulate.truth import truth_dir

        t = Table.read(joined)
        data = {"wave": np.asarray(t["wavelength"]), "flux": np.asarray(t["flux"]),
                "error": np.asarray(t["error"]), "channel": np.asarray(t["channel"])}
        raw = demo.parent / "raw"
        truth_file = truth_dir(raw, args.date) / "spectra" / "science.txt"
        truth = np.loadtxt(truth_file, unpack=True) if truth_file.exists() else None
        plot_joined(data, images / "joined_science.png",
                    f"{joined.name}: two exposures combined, four channels joined",
                    str(t["flux"].unit), truth)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
