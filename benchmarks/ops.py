"""Operations benchmark: the whole night serial against --jobs 2, a rerun, a killed run
resumed, and a range of nights locally and on Slurm.

    python benchmarks/ops.py [--date 20181108] [--out benchmarks/out] [--reuse]
                             [--nights 5] [--slurm | --local-slurm] [--skip-range]
                             [--skip-night]

Runs ``panacea-lrs2`` as a user would (a subprocess) and samples the memory of its whole
process tree (workers included) every 0.1 s: RSS summed (counts the pages forked workers
share with the parent once per process) and PSS summed (counts shared pages once).
``--local-slurm`` starts a single-node Slurm cluster on this machine for the range
(slurm-wlm and munge from the distribution, as the Slurm test does:
tests/slurm_localhost.py; root needed); the Slurm jobs are not children of the command, so
their CPU time and memory are not in that row.

Prints a Markdown table: wall time, CPU time (user + system of the tree), peak memory of
the tree, products written or rewritten.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from simulated import night_parser, simulated_night

CLI = [sys.executable, "-m", "panacea.cli"]


def run(argv: list[str], kill_after: float | None = None) -> dict:
    """Run the CLI; wall, CPU, peak tree RSS and exit code (killed after ``kill_after`` s)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([*CLI, *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    top = psutil.Process(proc.pid)
    peak = peak_pss = 0
    cpu: dict[int, float] = {}
    while proc.poll() is None:
        try:
            tree = [top, *top.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        rss = pss = 0
        for p in tree:
            try:
                mem = p.memory_full_info()  # PSS: pages shared by forked workers once
                rss += mem.rss
                pss += mem.pss
                t = p.cpu_times()
                cpu[p.pid] = t.user + t.system
            except psutil.NoSuchProcess:
                pass
        peak = max(peak, rss)
        peak_pss = max(peak_pss, pss)
        if kill_after is not None and time.perf_counter() - t0 > kill_after:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            break
        time.sleep(0.1)
    return {"wall": time.perf_counter() - t0, "cpu": sum(cpu.values()),
            "rss_gb": peak / 1e9, "pss_gb": peak_pss / 1e9, "code": proc.returncode}


def mtimes(root: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*.fits")}


def counts(out: Path, date: str) -> dict:
    path = out / "NIGHTS" / date / "summary.json"
    return json.loads(path.read_text())["counts"] if path.is_file() else {}


def same_products(a: Path, b: Path) -> str:
    """Whether every FITS file under ``a`` is in ``b`` with identical data and headers (the
    cards that hold times and checksums aside): a note for the table."""
    from astropy.io import fits

    files = sorted(a.rglob("*.fits"))
    bad = []
    for p in files:
        q = b / p.relative_to(a)
        if not q.is_file():
            bad.append(f"{q.name} missing")
            continue
        diff = fits.FITSDiff(str(p), str(q), ignore_keywords=[
            "DATE*", "CHECKSUM", "DATASUM", "PROCDATE", "*TIME*"], rtol=0.0, atol=0.0)
        if not diff.identical:
            bad.append(q.name)
    if bad:
        return f"{len(bad)} of {len(files)} products differ from serial: {', '.join(bad[:5])}"
    return f"products identical to serial ({len(files)} FITS files, every HDU compared)"


def row(name: str, r: dict, note: str = "") -> str:
    return (f"| {name} | {r['wall']:.1f} | {r['cpu']:.1f} | {r['rss_gb']:.2f} | "
            f"{r['pss_gb']:.2f} | {r['code']} | {note} |")


def range_archive(raw: Path, date: str, n: int, dest: Path) -> list[str]:
    """``n`` nights holding the same raw files (links), from ``date`` on, and the archive's
    standards folder."""
    dates = [time.strftime("%Y%m%d", time.gmtime(
        time.mktime(time.strptime(date, "%Y%m%d")) + 86400 * (i + 0.5))) for i in range(n)]
    for d in dates:
        for src in (raw / date).rglob("*"):
            if src.is_file():
                link = dest / d / src.relative_to(raw / date)
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.exists():
                    link.symlink_to(src.resolve())
    standards = dest / "standards"  # the standards' reference spectra, shared by the nights
    if (raw / "standards").is_dir() and not standards.exists():
        standards.symlink_to((raw / "standards").resolve())
    return dates


def _local_slurm(root: Path):
    """A running single-node Slurm cluster (tests/slurm_localhost.py), SLURM_CONF set."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from slurm_localhost import LocalSlurm, install

    reason = install()
    if reason is not None:
        sys.exit(f"no Slurm cluster: {reason}")
    cluster = LocalSlurm(root, memory_mb=8000)
    cluster.start()
    return cluster


def main() -> None:
    p = night_parser(__doc__, "reuse a simulated night in --out")
    p.add_argument("--nights", type=int, default=5, help="nights of the range benchmark")
    p.add_argument("--slurm", action="store_true",
                   help="also the range through Slurm (needs a cluster; see tests/"
                        "slurm_localhost.py for a single-node one)")
    p.add_argument("--local-slurm", action="store_true",
                   help="--slurm on a single-node cluster started here for the range "
                        "(tests/slurm_localhost.py; needs root)")
    p.add_argument("--skip-range", action="store_true")
    p.add_argument("--skip-night", action="store_true",
                   help="only the range (no serial/--jobs 2/rerun/resume rows)")
    args = p.parse_args()
    raw = simulated_night(args)
    work = Path(args.out) / "ops"
    shutil.rmtree(work, ignore_errors=True)
    base = ["-d", args.date, "-s", args.channels, "--baseraw", str(raw)]
    rows = []
    if not args.skip_night:
        serial = run([*base, "--output", str(work / "serial"), "--jobs", "1"])
        rows.append(row("night, serial (--jobs 1)", serial, str(counts(work / "serial",
                                                                         args.date))))
        par = run([*base, "--output", str(work / "jobs2"), "--jobs", "2"])
        rows.append(row("night, --jobs 2", par, f"speed-up {serial['wall'] / par['wall']:.2f}x; "
                        + same_products(work / "serial", work / "jobs2")))
        before = mtimes(work / "jobs2")
        again = run([*base, "--output", str(work / "jobs2"), "--jobs", "2"])
        after = mtimes(work / "jobs2")
        rewritten = sum(after[k] != before.get(k) for k in after)
        rows.append(row("rerun, nothing changed", again, f"{rewritten} of {len(after)} files "
                                                         "rewritten"))
        run([*base, "--output", str(work / "killed"), "--jobs", "2"],
            kill_after=0.6 * par["wall"])
        kept = mtimes(work / "killed")
        resumed = run([*base, "--output", str(work / "killed"), "--jobs", "2"])
        c = counts(work / "killed", args.date)
        rows.append(row(f"killed at {0.6 * par['wall']:.0f} s, then rerun", resumed,
                        f"{len(kept)} files survived the kill; rerun: {c.get('written', 0)} "
                        f"written, {c.get('up-to-date', 0)} up to date"))
    if not args.skip_range:
        dates = range_archive(raw, args.date, args.nights, work / "range_raw")
        cfg = work / "windows0.yaml"
        cfg.write_text("calibration: {windows: {bias: 0, twi: 0, flt: 0, arc: 0}}\n")
        slurm_cfg = work / "slurm.yaml"
        slurm_cfg.write_text(cfg.read_text() + (
            "executor:\n  slurm: {queue: debug, cores: 1, memory: 3GB, jobs: 2, "
            f"walltime: '01:00:00', log_directory: {work / 'slurm_jobs'}}}\n"))
        rng = ["--dates", f"{dates[0]}:{dates[-1]}", "-s", args.channels, "--baseraw",
               str(work / "range_raw")]
        local = run([*rng, "--config", str(cfg), "--output", str(work / "range_local"),
                     "--jobs", "2"])
        rows.append(row(f"{args.nights}-night range, --jobs 2", local,
                        f"{3600 * args.nights / local['wall']:.0f} nights/hour"))
        if args.slurm or args.local_slurm:
            cluster = _local_slurm(work / "slurm") if args.local_slurm else None
            try:
                conf = ["--config", str(slurm_cfg if args.local_slurm else cfg)]
                slurm = run([*rng, *conf, "--output", str(work / "range_slurm"), "--slurm"])
            finally:
                if cluster is not None:
                    cluster.stop()
            where = "a single-node cluster here, 2 jobs of 1 core" if cluster else "--slurm"
            rows.append(row(f"{args.nights}-night range, --slurm ({where})", slurm,
                            f"{3600 * args.nights / slurm['wall']:.0f} nights/hour"))
    print(f"\nnight {args.date}, channels {args.channels}, {os.cpu_count()} cores\n")
    print("| run | wall (s) | CPU (s) | peak RSS of the tree (GB) | peak PSS of the tree (GB) "
          "| exit | notes |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
