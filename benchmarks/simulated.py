"""What the benchmarks that start from a simulated night share: their command line and the
night itself (simulated unless ``--reuse`` finds one)."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from panacea.simulate import NightConfig, simulate_night


def night_parser(description: str, reuse_help: str) -> argparse.ArgumentParser:
    """``--date``, ``--seed``, ``--out``, ``--channels``, ``--reuse`` and ``-v``."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--date", default="20181108")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default="benchmarks/out")
    p.add_argument("--channels", default="uv,orange,red,farred")
    p.add_argument("--reuse", action="store_true", help=reuse_help)
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def simulated_night(args: argparse.Namespace) -> Path:
    """Set the log level and return the output folder, simulating the night into it unless
    ``--reuse`` is given and a night is there."""
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    out = Path(args.out)
    if not (args.reuse and (out / args.date / "lrs2").is_dir()):
        t0 = time.perf_counter()
        simulate_night(NightConfig(date=args.date, seed=args.seed), out)
        print(f"simulated night {args.date} (seed {args.seed}) in "
              f"{time.perf_counter() - t0:.1f} s")
    return out
