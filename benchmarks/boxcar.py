"""Boxcar extraction benchmark: the calibration's pattern of many frames on one trace.

    python benchmarks/boxcar.py [--out benchmarks/out] [--reuse] [--frames 11]

For every channel of the simulated night, one on-sky frame as read (its variance and
mask) is extracted ``--frames`` times on
the truth's trace (the calibration extracts 11 frames per channel), with the aperture
rebuilt on every call (``boxcar(image, trace)``) and built once (``aperture`` then
``boxcar(image, ap)``). Prints a Markdown table of CPU seconds per channel and checks that
both give identical sums. One process, one core.
"""

from __future__ import annotations

import time

import numpy as np

from panacea import instrument
from panacea.archive import Archive
from panacea.ccd import read_channel
from panacea.extract import aperture, boxcar
from panacea.simulate.truth import load_channel
from simulated import night_parser, simulated_night


def main() -> None:
    p = night_parser(__doc__, "reuse a simulated night in --out")
    p.add_argument("--frames", type=int, default=11, help="frames extracted per channel")
    p.add_argument("--half-width", type=float, default=3.0, help="aperture half-width (rows)")
    args = p.parse_args()
    raw = simulated_night(args)
    night = Archive(raw).night(args.date)
    exposure = night.exposures(ftype="sci")[0]
    print(f"{args.frames} boxcar extractions of {exposure.name} per channel "
          f"(half-width {args.half_width} rows), CPU s\n")
    print("| channel | rebuilt every call | aperture once | of which the aperture | identical |")
    print("|---|---|---|---|---|")
    for name in args.channels.split(","):
        ch = instrument.get_channel(name)
        truth = load_channel(raw, args.date, name)
        frame = read_channel(night, exposure, ch)
        image = frame.image
        boxcar(image[:, :8], truth.trace[:, :8], args.half_width, frame.variance[:, :8],
               frame.mask[:, :8] > 0)  # compiled before timing
        t0 = time.process_time()
        for _ in range(args.frames):
            old = boxcar(image, truth.trace, args.half_width, frame.variance, frame.mask > 0)
        t1 = time.process_time()
        ap = aperture(truth.trace, args.half_width, image.shape)
        t2 = time.process_time()
        for _ in range(args.frames):
            new = boxcar(image, ap, variance=frame.variance, mask=frame.mask > 0)
        t3 = time.process_time()
        same = np.array_equal(old[0], new[0]) and np.array_equal(old[1], new[1])
        print(f"| {name} | {t1 - t0:.3f} | {t3 - t1:.3f} | {t2 - t1:.3f} | {same} |")


if __name__ == "__main__":
    main()
