"""Cost of the night QA report against the night's reduction, and the README's report
pictures.

    python benchmarks/report.py [--out /tmp/qa_bench] [--reuse] [--repeat 3] [--images images]

Simulates the demo night (unless ``--reuse`` finds it), reduces it once through the command
line (which ends with the report) and times that, then rebuilds the report ``--repeat`` times
with :func:`panacea.qa.report.write_night_report` and prints the fastest and median time and
their share of the reduction's wall time. With ``--images`` it copies a few plots there and
takes a screenshot of the report with headless Chromium (Debian's chromium-driver).
"""

from __future__ import annotations

import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from simulated import night_parser, simulated_night

from panacea.cli import main as cli_main
from panacea.qa.report import write_night_report

PICTURES = ("wave_orange.png", "sky_0000012_exp01_red.png", "ifu_0000012_exp01_uv.png",
            "trace_farred.png")


def screenshot(page: Path, png: Path, height: int = 1500) -> Path:
    """A PNG of ``page`` as headless Chromium renders it (1280 px wide)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu",
                f"--window-size=1280,{height}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts,
                              service=Service(executable_path=shutil.which("chromedriver")))
    try:
        driver.get(page.as_uri())
        driver.save_screenshot(str(png))
    finally:
        driver.quit()
    return png


def main(argv=None) -> int:
    p = night_parser(__doc__, "reuse the simulated night and its reduction when present")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--images", default=None, help="folder for the README pictures")
    args = p.parse_args(argv)
    out = simulated_night(args)
    reduced = out / "reduced"
    log = out / "reduce_seconds.txt"
    if not (args.reuse and log.exists()):
        t0 = time.perf_counter()
        rc = cli_main(["-d", args.date, "-s", args.channels, "--baseraw", str(out),
                       "--output", str(reduced)])
        log.write_text(f"{time.perf_counter() - t0:.2f}\n")
        print(f"night reduced (exit {rc}) in {float(log.read_text()):.1f} s, report included")
    night = float(log.read_text())
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        report = write_night_report(reduced, args.date)
        times.append(time.perf_counter() - t0)
    nplots = len(list((report.parent / "qa").glob("*.png")))
    best, med = min(times), statistics.median(times)
    print(f"report of {args.channels} ({nplots} plots): fastest {best:.2f} s, median "
          f"{med:.2f} s of {args.repeat}; night reduction {night:.1f} s -> "
          f"{100 * best / night:.1f} % / {100 * med / night:.1f} %")
    if args.images:
        images = Path(args.images)
        images.mkdir(exist_ok=True)
        for name in PICTURES:
            src = report.parent / "qa" / name
            if src.exists():
                shutil.copy(src, images / f"qa_{name}")
        screenshot(report, images / "qa_report.png")
        print(f"pictures in {images}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
