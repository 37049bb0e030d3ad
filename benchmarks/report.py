"""Cost of the night QA report against the night's reduction, and the README's report
pictures.

    python benchmarks/report.py [--out /tmp/qa_bench] [--reuse] [--repeat 3] [--images images]

Simulates the demo night (unless ``--reuse`` finds it), reduces it through the command line
twice, with the report (each channel task draws its channel's plots, the night draws the
rest) and without it (the runner's two report hooks disabled), and prints both nights' wall
and CPU time (this process and its workers). Then it rebuilds the whole report ``--repeat``
times with :func:`panacea.qa.report.write_night_report` (``reuse=False``: every channel
recomputed in this one process) and its night-level part alone (channel fragments reused),
and prints the fastest and median wall and CPU times. With ``--images`` it copies a few
plots there and takes a screenshot of the report with headless Chromium (Debian's chromium-driver).
"""

from __future__ import annotations

import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from simulated import night_parser, simulated_night

from panacea.cli import main as cli_main
from panacea.ops import runner
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


def _cpu() -> float:
    """CPU seconds of this process and its finished children (the pool's workers)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def reduce_night(args, raw: Path, output: Path, report: bool) -> tuple[float, float]:
    """Wall and CPU seconds of one reduction of the night (with or without the report)."""
    shutil.rmtree(output, ignore_errors=True)
    hooks = runner._night_report, runner._channel_report
    if not report:
        runner._night_report = runner._channel_report = lambda *a, **k: None
    try:
        t0, c0 = time.perf_counter(), _cpu()
        rc = cli_main(["-d", args.date, "-s", args.channels, "--baseraw", str(raw),
                       "--output", str(output)])
        wall, cpu = time.perf_counter() - t0, _cpu() - c0
    finally:
        runner._night_report, runner._channel_report = hooks
    print(f"night {'with' if report else 'without'} the report (exit {rc}): {wall:.1f} s "
          f"wall, {cpu:.1f} s CPU")
    return wall, cpu


def _timed(fn, repeat: int) -> tuple[list[float], list[float]]:
    walls, cpus = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return walls, cpus


def main(argv=None) -> int:
    p = night_parser(__doc__, "reuse the simulated night and its reductions when present")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--images", default=None, help="folder for the README pictures")
    args = p.parse_args(argv)
    out = simulated_night(args)
    reduced = out / "reduced"
    log = out / "reduce_seconds.txt"
    if not (args.reuse and log.exists()):
        w0, c0 = reduce_night(args, out, out / "reduced_noqa", report=False)
        w1, c1 = reduce_night(args, out, reduced, report=True)
        log.write_text(f"{w1:.2f} {c1:.2f} {w0:.2f} {c0:.2f}\n")
    w1, c1, w0, c0 = (float(x) for x in log.read_text().split())
    print(f"the report adds {w1 - w0:.1f} s wall ({100 * (w1 - w0) / w1:.1f} % of the "
          f"night), {c1 - c0:.1f} s CPU ({100 * (c1 - c0) / c1:.1f} %)")
    for label, reuse in (("whole report, one process", False),
                         ("night-level part (fragments reused)", True)):
        walls, cpus = _timed(lambda r=reuse: write_night_report(reduced, args.date, reuse=r),
                             args.repeat)
        print(f"{label}: wall fastest {min(walls):.2f} s, median "
              f"{statistics.median(walls):.2f} s; CPU fastest {min(cpus):.2f} s "
              f"(night with the report: {w1:.1f} s wall)")
    report = reduced / "NIGHTS" / args.date / "report.html"
    nplots = len(list((report.parent / "qa").glob("*.png")))
    print(f"{nplots} plots")
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
