"""Command line: ``panacea-lrs2``.

``panacea-lrs2 -d YYYYMMDD -s uv,orange ...`` reduces a night (the interface LRS2 users know);
``panacea-lrs2 simulate ...`` writes a simulated night; ``panacea-lrs2 inventory ...`` lists
what a night holds. Only argument parsing and logging set-up live here.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import __version__

log = logging.getLogger("panacea")

SUBCOMMANDS = ("simulate", "inventory", "config", "report")


def _date(text: str) -> str:
    from .errors import UsageError
    from .validate import parse_date

    try:
        return parse_date(text)
    except UsageError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def reduce_parser() -> argparse.ArgumentParser:
    """Parser of the classic reduction call."""
    p = argparse.ArgumentParser(
        prog="panacea-lrs2",
        description="Reduce LRS2 (HET) data of one night: calibrations, then every science "
        "exposure. Other commands: 'panacea-lrs2 simulate -h' writes a simulated night with "
        "its truth, 'panacea-lrs2 inventory -h' lists what a night holds, 'panacea-lrs2 "
        "report -h' rebuilds a night's QA report.",
    )
    p.add_argument("-d", "--date", type=_date, default=None, help="night, YYYYMMDD")
    p.add_argument("-s", "--sides", default="uv,orange,red,farred",
                   help="channels to reduce, comma separated (default: all four)")
    p.add_argument("-o", "--object", default=None,
                   help="reduce only observations whose OBJECT contains this text")
    p.add_argument("--baseraw", default=None,
                   help="archive root holding {date}/lrs2/lrs2NNNNNNN.tar (default from the "
                        "configuration: archive.baseraw)")
    p.add_argument("--output", default=None,
                   help="product tree root (default from the configuration: ./LRS2)")
    p.add_argument("-uf", "--use_flat", action="store_true",
                   help="trace and flat-field with internal (LDLS) flats, not twilights")
    p.add_argument("-cf", "--correct_ftf", action="store_true",
                   help="re-derive the fiber-to-fiber correction from each frame's sky")
    p.add_argument("-cw", "--central_wave", type=float, default=None,
                   help="central wavelength (A) of the collapsed image")
    p.add_argument("-wb", "--wavelength_bin", type=float, default=None,
                   help="half-width (A) of the collapse window (default 10)")
    p.add_argument("-re", "--reduce_eng", action="store_true", help="treat eng frames as science")
    p.add_argument("-rf", "--reduce_flt", action="store_true", help="treat flt frames as science")
    p.add_argument("-rd", "--reduce_drk", action="store_true", help="treat drk frames as science")
    p.add_argument("--source_x", type=float, default=None, help="force source IFU x (arcsec)")
    p.add_argument("--source_y", type=float, default=None, help="force source IFU y (arcsec)")
    p.add_argument("--standard_star_date", type=_date, default=None,
                   help="night of the standard star to use for the response")
    p.add_argument("--standard_star_obsid", type=int, default=None,
                   help="observation number of the standard star to use")
    p.add_argument("--standards-dir", default=None,
                   help="folder of standard reference spectra m{name}.dat.txt")
    p.add_argument("--response-dir", default=None,
                   help="folder of response_{channel}.fits files to use when the night has "
                        "no usable standard star")
    p.add_argument("--no-default-response", action="store_true",
                   help="without a standard or --response-dir, leave spectra in "
                        "electron/s/cm2/Angstrom instead of using the bundled response")
    p.add_argument("--cubes", default=None,
                   help="cubes to write: none, all, or a comma-separated list of obs, sky, "
                        "skysub (default from the configuration: skysub)")
    add_ops_options(p)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"panacea-lrs2 {__version__}")
    return p


def add_ops_options(p: argparse.ArgumentParser) -> None:
    """Options of the night runner: nights, reruns, lock, configuration, executors."""
    g = p.add_argument_group("operations (docs/operations.md)")
    g.add_argument("--dates", default=None,
                   help="nights to reduce: a range FIRST:LAST (YYYYMMDD:YYYYMMDD) and/or a "
                        "comma-separated list")
    g.add_argument("--new", action="store_true",
                   help="reduce the nights of the archive not yet reduced, changed since, or "
                        "incomplete (from {output}/ledger.sqlite)")
    g.add_argument("--force", action="store_true",
                   help="rebuild every product even when it is up to date")
    g.add_argument("--wait", action="store_true",
                   help="wait for another run on the same night and output (else exit 3)")
    g.add_argument("--config", default=None,
                   help="YAML file overriding the bundled configuration key by key")
    g.add_argument("--jobs", type=int, default=None,
                   help="worker processes (default: executor.jobs, 0 = one per core)")
    g.add_argument("--scheduler", default=None,
                   help="run the tasks on the Dask scheduler at this address ('local' starts "
                        "a LocalCluster of --jobs workers)")
    g.add_argument("--slurm", action="store_true",
                   help="run the tasks on Slurm through dask-jobqueue (queue, account, "
                        "walltime, cores, memory from the configuration's executor.slurm)")


def config_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="panacea-lrs2 config",
                                description="Print the effective configuration (YAML).")
    p.add_argument("--config", default=None, help="YAML file overriding the bundled one")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def simulate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="panacea-lrs2 simulate",
        description="Write a simulated LRS2 night in the archive layout, with its truth.",
    )
    p.add_argument("--date", type=_date, required=True, help="night, YYYYMMDD")
    p.add_argument("--out", required=True, help="archive root to write (baseraw)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--channels", default="uv,orange,red,farred", help="channels to simulate")
    p.add_argument("--n-bias", type=int, default=10, help="number of biases (default 10)")
    p.add_argument("--n-twilight", type=int, default=3, help="twilight flats (default 3)")
    p.add_argument("--n-science", type=int, default=2, help="science exposures (default 2)")
    p.add_argument("--no-extended", action="store_true",
                   help="leave out the extended emission-line target")
    p.add_argument("--compress", action="store_true", help="write .tar.gz tarballs")
    p.add_argument("--randomize", action="store_true",
                   help="draw the night's nuisances (distortions, flexure, line spread, PSF, "
                        "standards, atmosphere) from the seed instead of the fixed defaults")
    p.add_argument("--workers", type=int, default=None, help="processes (default: cores)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def inventory_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="panacea-lrs2 inventory",
                                description="List the observations of one night.")
    p.add_argument("-d", "--date", type=_date, required=True, help="night, YYYYMMDD")
    p.add_argument("--baseraw", required=True, help="archive root")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="panacea-lrs2 report",
                                description="Rebuild a night's QA report (metrics.json, plots, "
                                "HTML) from the products under --output; --table writes the "
                                "metrics of every night in the tree as one CSV.")
    p.add_argument("-d", "--date", type=_date, required=True, help="night, YYYYMMDD")
    p.add_argument("--output", default="LRS2", help="product tree root (default ./LRS2)")
    p.add_argument("--table", default=None, metavar="CSV",
                   help="also write the metrics of all nights to this CSV file")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def run_report(args: argparse.Namespace) -> int:
    from .qa.metrics import find_products, metrics_table
    from .qa.report import write_night_report

    if not Path(args.output).is_dir():
        log.error("report: product tree %s does not exist", args.output)
        return 2
    if not any(find_products(args.output, args.date)):
        log.error("report: no calibration bundle (CALS/cal_%s_*.fits) and no multi_%s_* "
                  "product under %s", args.date, args.date, args.output)
        return 2
    print(write_night_report(args.output, args.date))
    if args.table:
        rows = metrics_table(args.output, args.table)
        print(f"{len(rows)} metric rows of all nights in {args.table}")
    return 0


def setup_logging(verbose: bool) -> None:
    """Configure logging once, for the command line only."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        # full timestamps in logs kept by cron; the time of day on a terminal
        datefmt="%H:%M:%S" if sys.stderr.isatty() else "%Y-%m-%dT%H:%M:%S",
    )


def run_simulate(args: argparse.Namespace) -> int:
    from .instrument import parse_channels
    from .simulate import NightConfig, simulate_night

    cfg = NightConfig(
        date=args.date,
        seed=args.seed,
        channels=tuple(c.name for c in parse_channels(args.channels)),
        n_bias=args.n_bias,
        n_twilight=args.n_twilight,
        n_science=args.n_science,
        extended=not args.no_extended,
        compress=args.compress,
        randomize=args.randomize,
    )
    summary = simulate_night(cfg, args.out, workers=args.workers)
    print(f"simulated night {args.date}: {summary['files']} raw files in "
          f"{summary['seconds']:.1f} s under {Path(args.out) / args.date}; truth in "
          f"{Path(args.out) / 'truth' / args.date}")
    return 0


def run_inventory(date: str, baseraw: str) -> int:
    from .archive import Archive
    from .inventory import format_inventory

    with Archive(baseraw).night(date) as night:
        print(format_inventory(night))
    return 0


def run_config(args: argparse.Namespace) -> int:
    from .ops import config

    sys.stdout.write(config.dump(config.load(args.config)))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from .errors import PanaceaError
    from .ops.summary import EXIT_INTERNAL, EXIT_USAGE

    verbose = "-v" in argv or "--verbose" in argv
    try:
        return _main(argv)
    except PanaceaError as err:
        log.error("%s", err)
        return EXIT_USAGE
    except KeyboardInterrupt:
        log.error("interrupted; products written so far are complete, the rest is redone "
                  "by the next run")
        return 130
    except Exception as err:  # a bug: say so briefly, the traceback only with -v
        log.error("internal error: %s: %s. This is a bug in panacea-lrs2; please report it "
                  "with the command line%s", type(err).__name__, err,
                  "" if verbose else " and the output of the same run with -v")
        if verbose:
            log.exception("traceback")
        return EXIT_INTERNAL


def _main(argv: list[str]) -> int:
    if argv and argv[0] == "simulate":
        args = simulate_parser().parse_args(argv[1:])
        setup_logging(args.verbose)
        return run_simulate(args)
    if argv and argv[0] == "inventory":
        args = inventory_parser().parse_args(argv[1:])
        setup_logging(args.verbose)
        return run_inventory(args.date, args.baseraw)
    if argv and argv[0] == "report":
        args = report_parser().parse_args(argv[1:])
        setup_logging(args.verbose)
        return run_report(args)
    if argv and argv[0] == "config":
        args = config_parser().parse_args(argv[1:])
        setup_logging(args.verbose)
        return run_config(args)
    parser = reduce_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    from .allocator import keep_freed_memory
    from .ops.cli_config import run_config_from_args
    from .ops.console import ConsoleProgress
    from .ops.runner import run_nights

    run = run_config_from_args(args, parser)
    keep_freed_memory()  # frame-sized arrays reused, not page-faulted in again
    progress = ConsoleProgress(len(run.dates), len(run.channels))
    try:
        return run_nights(run, progress)
    finally:
        progress.close()


if __name__ == "__main__":
    sys.exit(main())
