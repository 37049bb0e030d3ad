"""The night runner: every requested night under its lock, with its log file, summary and
ledger, and the channels of a night run as tasks on a local process pool.

Task graph of a night: one task per channel (calibration, then the standards' response,
then science per exposure; a channel's steps depend on each other), then the joins per
observation once every channel is done. Tasks take only picklable values (the
:class:`RunConfig`, the date, the channel name) and write their products atomically, so any
engine gives the products of the serial run.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from .. import pipeline
from .config import RunConfig
from .ledger import Ledger, raw_stamp
from .lock import LockHeld, NightLock
from .summary import EXIT_LOCKED, EXIT_USAGE, NightSummary, Outcome, night_folder

log = logging.getLogger(__name__)


def ledger_path(output: str | Path) -> Path:
    """``{output}/ledger.sqlite``."""
    return Path(output) / "ledger.sqlite"


def run_nights(run: RunConfig, progress=None) -> int:
    """Reduce every night of ``run``; return the worst exit code of them.

    ``progress`` (optional) is called with (date, summary) after each night (the CLI's
    progress display).
    """
    worst = 0
    for date in run.dates:
        code, summary = run_night(run, date)
        if summary is not None and summary.nodata:
            # one night asked for by name that holds nothing is a usage error; in a range
            # of nights, empty ones are normal
            code = EXIT_USAGE if len(run.dates) == 1 else 0
        worst = max(worst, code)
        if progress is not None:
            progress(date, code)
    return worst


def run_night(run: RunConfig, date: str) -> tuple[int, NightSummary | None]:
    """One night: lock, per-night log file, tasks, joins, ``summary.json``, ledger.

    Returns the night's exit code and its summary (None when the lock was held).
    """
    try:
        lock = NightLock(run.output, date, wait=run.wait)
        lock.acquire()
    except LockHeld as err:
        log.error("%s", err)
        return EXIT_LOCKED, None
    handler = _night_log(run, date) if run.night_log else None
    summary = NightSummary(date, run.output)
    t0 = time.perf_counter()
    try:
        ledger = Ledger(ledger_path(run.output), run.config_hash)
        try:
            if run.executor.jobs > 1 and len(run.channels) > 1:
                _parallel_night(run, date, summary)
            else:
                pipeline.reduce_night(run, date, summary, ledger)
            if summary.error is None:
                ledger.night_done(date, raw_stamp(run.baseraw, date), summary.exit_code())
        finally:
            ledger.close()
        summary.write()
        log.info("%s in %.1f s; summary %s", summary.last_line(), time.perf_counter() - t0,
                 summary.path)
    finally:
        if handler is not None:
            logging.getLogger("panacea").removeHandler(handler)
            handler.close()
        lock.release()
    return summary.exit_code(), summary


def _night_log(run: RunConfig, date: str) -> logging.Handler:
    """A file handler on ``{output}/NIGHTS/{date}/panacea_{date}.log`` (appended)."""
    path = night_folder(run.output, date) / f"panacea_{date}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S"))
    logger = logging.getLogger("panacea")
    handler.setLevel(logging.DEBUG if logger.getEffectiveLevel() <= logging.DEBUG
                     else logging.INFO)
    logger.addHandler(handler)
    return handler


def channel_task(run: RunConfig, date: str, channel: str) -> tuple[list[Outcome], dict]:
    """One channel of one night in a worker: its outcomes and the observations to join.

    A pure function of picklable values: opens its own archive and ledger connection.
    """
    summary = NightSummary(date, run.output)
    archive = pipeline.open_night(run, date, summary)
    if archive is None:
        return summary.outcomes, {}
    try:
        with Ledger(ledger_path(run.output), run.config_hash) as ledger:
            joins = pipeline.reduce_channel(run, archive, date, channel, summary, ledger)
    finally:
        archive.close()
    return summary.outcomes, joins


def _parallel_night(run: RunConfig, date: str, summary: NightSummary) -> None:
    """The channels of a night as tasks on a process pool, then the joins here."""
    archive = pipeline.open_night(run, date, summary)
    if archive is None:
        return
    try:
        night = archive.night(date)
        science = pipeline._announce(run, night)
        joins: dict = {}
        workers = min(run.executor.jobs, len(run.channels))
        with ProcessPoolExecutor(workers, initializer=_worker_init) as pool:
            futures = [pool.submit(channel_task, run, date, ch) for ch in run.channels]
            for future in futures:  # in channel order: summary and joins as in serial
                outcomes, found = future.result()
                summary.outcomes.extend(outcomes)
                for obsid, value in found.items():
                    joins.setdefault(obsid, value)
        pipeline.join_night(run, night, science, joins, summary)
    finally:
        archive.close()


def _worker_init() -> None:
    """Worker set-up: keep freed memory for reuse, as the CLI does in the main process."""
    from ..allocator import keep_freed_memory

    keep_freed_memory()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
