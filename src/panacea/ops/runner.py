"""The night runner: every requested night under its lock, with its log file, summary and
ledger; the channels of a night run as tasks on the configured engine.

Task graph of a night: one task per channel (calibration, then the standards' response,
then science per exposure: a channel's steps depend on each other), then the joins per
observation once every channel is done. Tasks take only picklable values (the
:class:`RunConfig`, the date, the channel name) and write their products atomically, so any
engine gives the products of the serial run. On Dask and Slurm the channels of every night
are submitted at once; locally one night runs at a time (its workers log to its file).
"""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path

from .. import pipeline
from ..io_utils import remove_stale_parts
from .config import RunConfig
from .executors import DaskEngine, Inline, LocalPool, handle_record, make_engine
from .ledger import Ledger, raw_stamp
from .lock import LockHeld, NightLock
from .summary import EXIT_INTERNAL, EXIT_LOCKED, EXIT_USAGE, NightSummary, Outcome, night_folder

log = logging.getLogger(__name__)


def ledger_path(output: str | Path) -> Path:
    """``{output}/ledger.sqlite``."""
    return Path(output) / "ledger.sqlite"


def run_nights(run: RunConfig, progress: Progress | None = None) -> int:
    """Reduce every night of ``run``; return the worst exit code of them.

    ``progress`` (optional) is told when a channel of a night is done and when a night is.
    """
    if not run.dates:
        log.info("no night to reduce")
        return 0
    if run.executor.engine in ("dask", "slurm"):
        with DaskEngine(run.executor) as engine:
            nights = [_Night(run, date, progress) for date in run.dates]
            for night in nights:
                night.start(engine)
            codes = [night.finish() for night in nights]
            return max(codes)
    worst = 0
    for date in run.dates:
        night = _Night(run, date, progress)
        with make_engine(run.executor, len(run.channels)) as engine:
            night.start(engine)
            code = night.finish()
        worst = max(worst, code)
    return worst


class Progress:
    """What the runner tells about its progress (the CLI shows it; this one is silent)."""

    def channel_done(self, date: str, channel: str) -> None:
        """A channel of night ``date`` is done."""

    def night_done(self, date: str, code: int, summary: NightSummary) -> None:
        """Night ``date`` is done with exit code ``code``."""


def run_night(run: RunConfig, date: str) -> tuple[int, NightSummary | None]:
    """One night on the configured local engine; its exit code and summary (None when
    another run held the lock)."""
    night = _Night(run, date)
    with make_engine(run.executor, len(run.channels)) as engine:
        night.start(engine)
        code = night.finish()
    return code, night.summary if night.locked else None


class _Night:
    """One night's run: lock and log file, tasks submitted, then joined and summarised."""

    def __init__(self, run: RunConfig, date: str, progress: Progress | None = None):
        self.run = run
        self.progress = progress if progress is not None else Progress()
        self.date = date
        self.summary = NightSummary(date, run.output)
        self.lock = NightLock(run.output, date, wait=run.wait)
        self.locked = False
        self.handler: logging.Handler | None = None
        self.futures: list = []
        self.archive = None
        self.science: list = []
        self.t0 = time.perf_counter()
        self.crashed = False
        self.inline = False

    def start(self, engine) -> None:
        """Take the lock, index the night and submit its channel tasks (run at once on the
        inline engine, in the same process and archive)."""
        try:
            self.lock.acquire()
        except LockHeld as err:
            log.error("%s", err)
            return
        self.locked = True
        self.t0 = time.perf_counter()
        remove_stale_parts(self.run.output, time.time())  # of earlier, killed runs
        if self.run.night_log:
            self.handler = _night_log(self.run, self.date)
        self.archive = pipeline.open_night(self.run, self.date, self.summary)
        if self.archive is None:
            return
        self.science = pipeline._announce(self.run, self.archive.night(self.date))
        self.inline = isinstance(engine, Inline)
        if self.inline:  # serial: share this process's archive index
            for ch in self.run.channels:
                self.futures.append(engine.submit(_inline_task, self.run, self.archive,
                                                  self.date, ch))
                self.progress.channel_done(self.date, ch)
        else:
            if isinstance(engine, LocalPool):
                _preload_qa()  # forked local workers inherit the plotting modules
            task = channel_task if isinstance(engine, LocalPool) else logged_channel_task
            self.futures = [engine.submit(task, self.run, self.date, ch)
                            for ch in self.run.channels]

    def finish(self) -> int:
        """Collect the channels (in channel order), join, write summary and ledger."""
        if not self.locked:
            return EXIT_LOCKED
        try:
            if self.archive is not None:
                joins: dict = {}
                for channel, future in zip(self.run.channels, self.futures):
                    try:
                        outcomes, found, *records = future.result()
                    except Exception as err:  # a bug in a task: the other channels go on
                        log.error("%s %s: internal error: %s: %s (a bug in panacea-lrs2; "
                                  "please report it)", self.date, channel,
                                  type(err).__name__, err, exc_info=log.isEnabledFor(10))
                        self.crashed = True
                        self.summary.add("calibration", "failed", channel=channel,
                                         reason=f"internal error: {type(err).__name__}: {err}")
                        continue
                    if records:  # a Dask or Slurm worker's log lines, for the night log
                        _replay(records[0])
                    if not self.inline:
                        self.progress.channel_done(self.date, channel)
                    self.summary.outcomes.extend(outcomes)
                    for obsid, value in found.items():
                        joins.setdefault(obsid, value)
                pipeline.join_night(self.run, self.archive.night(self.date), self.science,
                                    joins, self.summary)
                self.archive.close()
                with Ledger(ledger_path(self.run.output), self.run.config_hash) as ledger:
                    ledger.night_done(self.date, raw_stamp(self.run.baseraw, self.date),
                                      self.summary.exit_code())
            self.summary.write()
            if self.archive is not None:
                _night_report(self.run.output, self.date, self.summary)
            log.info("%s in %.1f s; summary %s", self.summary.last_line(),
                     time.perf_counter() - self.t0, self.summary.path)
        finally:
            if self.handler is not None:
                logger = logging.getLogger("panacea")
                logger.removeHandler(self.handler)
                logger.setLevel(self.handler.previous_level)
                self.handler.close()
            self.lock.release()
        if self.summary.nodata:
            # one night asked for by name that holds nothing is a usage error; in a range of
            # nights, empty ones are normal
            code = EXIT_USAGE if len(self.run.dates) == 1 else 0
        else:
            code = EXIT_INTERNAL if self.crashed else self.summary.exit_code()
        self.progress.night_done(self.date, code, self.summary)
        return code


def _report_due(root: Path, date: str, summary: NightSummary) -> bool:
    """The QA report is (re)drawn when this run wrote something or the night has none."""
    return bool(summary.counts().get("written")) or not (
        night_folder(root, date) / "report.html").exists()


def _night_report(root: Path, date: str, summary: NightSummary) -> None:
    """The night's QA report from its products, rebuilt when this run wrote anything or it
    is missing (a failure is logged, never fatal: the products are already safe)."""
    if not _report_due(root, date, summary):
        return
    if importlib.util.find_spec("matplotlib") is None:  # the optional "plot" extra
        log.warning("night %s: no QA report without matplotlib (pip install "
                    "'panacea-lrs2[plot]', then panacea-lrs2 report -d %s)", date, date)
        return
    from ..qa.report import write_night_report

    try:
        write_night_report(root, date)
    except (OSError, ValueError, KeyError) as err:
        log.error("night %s: QA report failed: %s", date, err)


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
    handler.previous_level = logger.level  # type: ignore[attr-defined]
    if logger.getEffectiveLevel() > logging.INFO:  # the night log keeps INFO lines
        logger.setLevel(logging.INFO)
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
        return _inline_task(run, archive, date, channel)
    finally:
        archive.close()


class _Collector(logging.Handler):
    """Keeps a task's log records as plain dicts (picklable, message already formatted)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        d = dict(record.__dict__)
        d["msg"], d["args"], d["exc_info"] = record.getMessage(), None, None
        if record.exc_info and not record.exc_text:
            d["exc_text"] = logging.Formatter().formatException(record.exc_info)
        self.records.append(d)


def logged_channel_task(run: RunConfig, date: str,
                        channel: str) -> tuple[list[Outcome], dict, list[dict]]:
    """:func:`channel_task` on a Dask or Slurm worker, whose log lines would otherwise stay
    in the worker's own output: its panacea records (INFO and above) are returned with the
    result and replayed by the runner into the night's log and the console."""
    collector = _Collector()
    logger = logging.getLogger("panacea")
    level = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(collector)
    try:
        outcomes, joins = channel_task(run, date, channel)
    finally:
        logger.removeHandler(collector)
        logger.setLevel(level)
    return outcomes, joins, collector.records


def _replay(records: list[dict]) -> None:
    """Hand a worker's log records to this process's loggers (their times kept)."""
    for d in records:
        handle_record(logging.makeLogRecord(d))


def _inline_task(run: RunConfig, archive, date: str, channel: str) -> tuple[list, dict]:
    summary = NightSummary(date, run.output)
    with Ledger(ledger_path(run.output), run.config_hash) as ledger:
        joins = pipeline.reduce_channel(run, archive, date, channel, summary, ledger)
    if _report_due(run.output, date, summary):
        _channel_report(run.output, date, channel)
    return summary.outcomes, joins


def _preload_qa() -> None:
    """Import matplotlib and the QA modules here, before the local pool forks, so that
    each worker does not import them again (~1 s of CPU each) for its channel's plots."""
    if importlib.util.find_spec("matplotlib") is None:
        return
    from ..qa import channel_report  # noqa: F401  (and through it the metrics, plots)
    from ..qa.plots import _pyplot

    _pyplot()


def _channel_report(root: Path, date: str, channel: str) -> None:
    """The channel's part of the night report (metrics fragment and plots), drawn here in
    the task that reduced it so the channels' plots run in parallel; kept as it is when its
    products did not change (and the runner calls it only when the channel wrote something
    or the night has no report yet, as for the night's report). A failure is logged, never
    fatal: the night report redoes the channel."""
    if importlib.util.find_spec("matplotlib") is None:  # _night_report says what to do
        return
    from ..qa.channel_report import write_channel_qa

    try:
        write_channel_qa(root, date, channel)
    except (OSError, ValueError, KeyError) as err:
        log.error("night %s %s: QA of the channel failed: %s", date, channel, err)
