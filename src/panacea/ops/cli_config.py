"""The command line turned into a :class:`~panacea.ops.config.RunConfig`.

Precedence: the bundled ``config.yaml``, then ``--config FILE``, then the options given on
the command line. The pipeline sees only the result.
"""

from __future__ import annotations

import argparse
import datetime as dt
from dataclasses import replace

from ..errors import UsageError
from ..validate import check_output_root, parse_channels, parse_date
from . import config
from .config import ConfigError, FluxSettings, RunConfig, Selection
from .ledger import Ledger, new_nights


def parse_dates(text: str) -> tuple[str, ...]:
    """Nights of ``--dates``: ``FIRST:LAST`` ranges (inclusive) and single nights, comma
    separated, in order and without repeats.

    Raises
    ------
    ConfigError
        A night that is not a real calendar date, or a range that ends before it starts.
    """
    out: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        first, _, last = part.partition(":")
        start, end = _day(first), _day(last or first)
        if end < start:
            raise ConfigError(f"--dates: range {part} ends before it starts")
        day = start
        while day <= end:
            name = day.strftime("%Y%m%d")
            if name not in out:
                out.append(name)
            day += dt.timedelta(days=1)
    if not out:
        raise ConfigError("--dates: no night given")
    return tuple(out)


def _day(text: str) -> dt.date:
    try:
        return dt.datetime.strptime(parse_date(text), "%Y%m%d").date()
    except UsageError as err:
        raise ConfigError(f"--dates: {err}") from None


def settings_from_args(args: argparse.Namespace) -> dict:
    """The effective configuration: bundled, ``--config``, then the command-line options."""
    settings = config.load(getattr(args, "config", None))
    cli: dict = {"archive": {}, "calibration": {}, "science": {}, "flux": {}, "executor": {}}
    if args.baseraw is not None:
        cli["archive"]["baseraw"] = str(args.baseraw)
    if args.output is not None:
        cli["archive"]["output"] = str(args.output)
    if args.use_flat:
        cli["calibration"]["use_flat"] = True
    if args.correct_ftf:
        cli["science"]["correct_ftf"] = True
    if args.central_wave is not None:
        cli["science"]["central_wave"] = float(args.central_wave)
    if getattr(args, "cubes", None) is not None:
        cli["science"]["cubes"] = args.cubes
    if args.wavelength_bin is not None:
        cli["science"]["wavelength_bin"] = float(args.wavelength_bin)
    kinds = list(settings["science"]["kinds"])
    for flag, kind in (("reduce_eng", "eng"), ("reduce_flt", "flt"), ("reduce_drk", "drk")):
        if getattr(args, flag) and kind not in kinds:
            kinds.append(kind)
    cli["science"]["kinds"] = kinds
    if args.standards_dir is not None:
        cli["flux"]["standards_dir"] = str(args.standards_dir)
    if args.response_dir is not None:
        cli["flux"]["response_dir"] = str(args.response_dir)
    if args.no_default_response:
        cli["flux"]["default_response"] = False
    if getattr(args, "jobs", None) is not None:
        if args.jobs < 0:
            raise ConfigError(f"--jobs must be 0 (one per core) or more, got {args.jobs}")
        cli["executor"]["jobs"] = args.jobs
    if getattr(args, "scheduler", None):
        cli["executor"]["engine"] = "dask"
        if args.scheduler != "local":
            cli["executor"]["scheduler"] = args.scheduler
    if getattr(args, "slurm", False):
        if getattr(args, "scheduler", None):
            raise ConfigError("give --scheduler or --slurm, not both")
        cli["executor"]["engine"] = "slurm"
    return config.merge(settings, cli, source="command line")


def run_config_from_args(args: argparse.Namespace,
                         parser: argparse.ArgumentParser | None = None) -> RunConfig:
    """The :class:`RunConfig` of a parsed ``panacea-lrs2`` command line.

    Raises
    ------
    ConfigError
        No night asked for, or a bad configuration or option (exit code 2).
    """
    settings = settings_from_args(args)
    chosen = [x for x in (args.date, args.dates, args.new or None) if x is not None]
    if len(chosen) != 1:
        raise ConfigError("give exactly one of -d DATE, --dates FIRST:LAST[,...] or --new")
    channels = tuple(parse_channels(args.sides))  # usage errors before any work
    run = config.build(settings, (), channels, force=args.force, wait=args.wait)
    check_output_root(run.output)
    run = replace(
        run,
        science=replace(run.science, source_x=args.source_x, source_y=args.source_y),
        selection=Selection(kinds=run.selection.kinds, object=args.object),
        flux=FluxSettings(standard_star_date=args.standard_star_date,
                          standard_star_obsid=args.standard_star_obsid,
                          standards_dir=run.flux.standards_dir,
                          response_dir=run.flux.response_dir,
                          default_response=run.flux.default_response),
    )
    if args.date is not None:
        dates: tuple[str, ...] = (args.date,)
    elif args.dates is not None:
        dates = parse_dates(args.dates)
    else:
        with Ledger(run.output / "ledger.sqlite", run.config_hash) as ledger:
            dates = tuple(new_nights(ledger, run.baseraw, run.config_hash))
    return replace(run, dates=dates)
