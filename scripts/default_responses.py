"""Make the bundled default responses (``src/panacea/data/response_{channel}.fits``).

    python scripts/default_responses.py --reduced DIR --date YYYYMMDD

Copies the responses that ``panacea-lrs2`` derived from a night's standard star
(``DIR/CALS/response_{date}_{channel}.fits``) into the package data, where the pipeline
uses them for nights without a usable standard. The files shipped today come from the
simulated demo night 20181108 (seed 1, FEIGE_34); replace them with responses from real
standards before reducing real data.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from panacea import instrument
from panacea.fluxcal import read_response, response_filename, write_response

DATA = Path(__file__).resolve().parents[1] / "src" / "panacea" / "data"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--reduced", required=True, help="product root holding CALS/")
    p.add_argument("--date", required=True)
    args = p.parse_args(argv)
    for ch in instrument.channels().values():
        src = Path(args.reduced) / "CALS" / f"response_{args.date}_{ch.name}.fits"
        if not src.exists():
            print(f"{ch.name}: no {src}; skipped")
            continue
        wave, resp = read_response(src)
        out = write_response(DATA / response_filename(ch.name), wave, resp,
                             {"ORIGIN": f"standard of {args.date}"[:60]})
        print(f"{ch.name}: {src} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
