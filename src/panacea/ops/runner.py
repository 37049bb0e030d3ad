"""The night runner: every requested night under its lock, with its log file, summary and
ledger; the work of a night runs as a graph of tasks on the configured engine.

Task graph of a night (:mod:`.tasks`): per channel, the calibration; once it is done, the
channel's response from the night's standards; once that is done, one science task per
exposure whose products are not up to date (the ledger is asked here, so up-to-date items
cost no task); once a channel's science is done, its QA. The joins per observation and the
night's report follow when every channel is done. Ready tasks go to the engine longest
expected remaining path first (:mod:`.graph`), so the workers stay busy to the end. Tasks
take only picklable values and write their products atomically, so any engine gives the
products of the serial run; outcomes are put in a fixed order (channel, step, exposure)
whatever order the tasks finish in. On Dask and Slurm the tasks of every night are in one
graph; locally one night runs at a time (its workers log to its file).
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import time
from pathlib import Path

from .. import pipeline
from ..io_utils import remove_stale_parts
from . import tasks
from .config import RunConfig
from .executors import DaskEngine, limit_threads, make_engine, preload_compiled
from .graph import Scheduler
from .ledger import Ledger, raw_stamp
from .lock import LockHeld, NightLock
from .summary import EXIT_INTERNAL, EXIT_LOCKED, EXIT_USAGE, NightSummary, Outcome, night_folder

log = logging.getLogger(__name__)

#: CPU seconds of each step of a channel (measured on the default night, per task): the
#: scheduler's priorities, the expected remaining path of a task (its own and its
#: successors'), so that calibrations start first and the short science tasks fill the end.
STEP_SECONDS = {"calibration": 9.0, "response": 3.0, "science": 2.5, "qa": 2.5}
#: Place of each step in the summary's fixed order of outcomes.
_STEPS = ("calibration", "response", "science", "qa")


def run_nights(run: RunConfig, progress: Progress | None = None) -> int:
    """Reduce every night of ``run``; return the worst exit code of them.

    ``progress`` (optional) is told when a channel of a night is done and when a night is.
    """
    if not run.dates:
        log.info("no night to reduce")
        return 0
    limit_threads()  # here and in every worker (products equal whatever the engine)
    if run.executor.engine in ("dask", "slurm"):
        with DaskEngine(run.executor) as engine:
            scheduler = Scheduler(engine)
            nights = [_Night(run, date, progress, index=i) for i, date in enumerate(run.dates)]
            for night in nights:
                night.start(scheduler)
            scheduler.run()
            return max(night.code for night in nights)
    worst = 0
    for date in run.dates:
        code, _ = _run_local(run, date, progress)
        worst = max(worst, code)
    return worst


def _run_local(run: RunConfig, date: str,
               progress: Progress | None = None) -> tuple[int, _Night]:
    limit_threads()
    night = _Night(run, date, progress)
    with make_engine(run.executor, 3 * len(run.channels)) as engine:
        scheduler = Scheduler(engine)
        night.start(scheduler)
        scheduler.run()
    return night.code, night


class Progress:
    """What the runner tells about its progress (the CLI shows it; this one is silent)."""

    def channel_done(self, date: str, channel: str) -> None:
        """A channel of night ``date`` is done."""

    def night_done(self, date: str, code: int, summary: NightSummary) -> None:
        """Night ``date`` is done with exit code ``code``."""


def run_night(run: RunConfig, date: str) -> tuple[int, NightSummary | None]:
    """One night on the configured local engine; its exit code and summary (None when
    another run held the lock)."""
    code, night = _run_local(run, date)
    return code, night.summary if night.locked else None


class _Night:
    """One night's run: lock and log file, its task graph, then joined and summarised
    (:meth:`finish`, called when its last task is done)."""

    def __init__(self, run: RunConfig, date: str, progress: Progress | None = None,
                 index: int = 0):
        self.run = run
        self.progress = progress if progress is not None else Progress()
        self.date = date
        self.index = index
        self.summary = NightSummary(date, run.output)
        self.lock = NightLock(run.output, date, wait=run.wait)
        self.locked = False
        self.handler: logging.Handler | None = None
        self.archive = None
        self.ledger: Ledger | None = None
        self.science: list = []
        self.t0 = time.perf_counter()
        self.crashed = False
        self.code: int | None = None
        self.scheduler: Scheduler | None = None
        self.pending = 0  # tasks submitted and not done
        self.open: dict[str, int] = {}  # channel -> its tasks not done
        self.parts: list[tuple[tuple, list[Outcome]]] = []  # (order, outcomes)
        self.joins: dict[int, dict[tuple, tuple]] = {}  # obsid -> {order: (header, unit)}
        self.stamps: dict = {}
        self.conditions: dict = {}  # guider conditions per exposure, read once
        self.qa: set[str] = set()  # channels whose QA was considered
        self.prefetched = False  # guider reads queued ahead of the science tasks
        self.joined: list[Outcome] | None = None  # outcomes of the joins, once done
        self.finished = False  # finish() has begun: queued background jobs are void

    # ----------------------------------------------------------------- the graph

    def start(self, scheduler: Scheduler) -> None:
        """Take the lock, index the night and make its calibration tasks ready (the night
        finishes at once when there is nothing to run)."""
        self.scheduler = scheduler
        try:
            self.lock.acquire()
        except LockHeld as err:
            log.error("%s", err)
            self.code = self.finish()
            return
        self.locked = True
        self.t0 = time.perf_counter()
        remove_stale_parts(self.run.output, time.time())  # of earlier, killed runs
        if self.run.night_log:
            self.handler = _night_log(self.run, self.date)
        self.archive = pipeline.open_night(self.run, self.date, self.summary)
        if self.archive is not None:
            self.science = pipeline._announce(self.run, self.archive.night(self.date))
            self.ledger = Ledger(tasks.ledger_path(self.run.output), self.run.config_hash)
            if scheduler.engine.slots > 1 and not isinstance(scheduler.engine, DaskEngine):
                _preload_qa()  # forked local workers inherit the plotting modules
                preload_compiled()  # and the numba functions' machine code
            # the objects made so far (modules, the archive index) are left out of the
            # cyclic garbage collector's full passes: each pass would otherwise walk ~0.2
            # million of them (~0.1 s), and in forked workers write to their pages, which
            # then stop being shared with this process
            gc.freeze()
            for channel in self.run.channels:
                self.open[channel] = 0
                self._add("calibration", channel, tasks.calibration_task,
                          (self.run, self.date, channel), self._calibrated)
        if not self.pending:
            self.code = self.finish()

    def _order(self, step: str, channel: str, exposure: int = 0) -> tuple:
        """The task's priority (expected remaining path, longest first) and its place in
        the summary (channel, step, exposure)."""
        steps = _STEPS[_STEPS.index(step):]
        remaining = sum(STEP_SECONDS[s] for s in steps)
        return (-remaining, self.index, self.run.channels.index(channel),
                _STEPS.index(step), exposure)

    def _add(self, step: str, channel: str, fn, args: tuple, then, exposure: int = 0) -> None:
        """Make a task ready; ``then(channel, order, value)`` takes its result."""
        order = self._order(step, channel, exposure)
        self.pending += 1
        self.open[channel] += 1

        def done(value) -> None:
            then(channel, order, value)
            self._settle(channel)

        def failed(err: BaseException) -> None:
            self._crashed(step, channel, order, err, exposure)
            self._settle(channel)

        self.scheduler.add(order, fn, args, done, failed)

    def _settle(self, channel: str) -> None:
        """A task of ``channel`` is done: the channel's QA or end, the night's end."""
        self.open[channel] -= 1
        self.pending -= 1
        if self.open[channel] == 0:
            self._channel_finished(channel)
        if self.pending == 0:
            self.code = self.finish()

    def _record(self, order: tuple, outcomes: list[Outcome]) -> list[Outcome]:
        self.parts.append((order[2:], outcomes))
        return outcomes

    def _calibrated(self, channel: str, order: tuple, value) -> None:
        outcomes, cal_fp = value
        self._record(order, outcomes)
        if not self.prefetched and any(o.status == "written" for o in outcomes):
            # a new calibration: the science will be reduced, so read the guider frames
            # now, while the workers compute, not in _responded while a worker waits
            self.prefetched = True
            night = self.archive.night(self.date)
            for exposure in self.science:
                self.scheduler.background(
                    lambda e=exposure: None if self.finished
                    else pipeline.guider(self.conditions, night, e))
        if cal_fp is not None:
            # the standards' guider conditions read so far go along (a copy: the
            # background jobs may still add to the runner's)
            self._add("response", channel, tasks.response_task,
                      (self.run, self.date, channel, cal_fp, dict(self.conditions)),
                      lambda ch, o, v: self._responded(ch, o, v, cal_fp))

    def _responded(self, channel: str, order: tuple, value, cal_fp: str) -> None:
        outcomes, found = value
        self._record(order, outcomes)
        if found is None:
            return
        local = NightSummary(self.date, self.run.output)
        self._record(self._order("science", channel, -1), local.outcomes)
        for i, exposure in enumerate(self.science):
            if not exposure.amps_of(channel):  # an arm that did not observe: no error;
                # one amplifier of two is, and the frame reader says which and where
                continue
            if exposure.name in found.done:
                if found.done[exposure.name] is not None:
                    self._join(exposure.obsid, order, found.done[exposure.name])
                continue
            item = {"channel": channel, "exposure": exposure.name,
                    "obsid": exposure.obsid, "exp": exposure.exp}
            try:
                key, fp = pipeline.science_fingerprint(self.run, exposure, channel, cal_fp,
                                                       found.ident, self.stamps)
            except OSError as err:
                local.add("science", "failed", reason=f"raw file unreadable: {err}",
                          file=pipeline._error_file(err), **item)
                continue
            kept = None if self.run.force else self.ledger.current(key, fp)
            if kept is not None:
                log.info("%s %s: products up to date", exposure.name, channel)
                self.ledger.record(key, fp, local.add("science", "up-to-date", products=kept,
                                                      **item))
                continue
            obsid = exposure.obsid
            # the guider frames are read here once per exposure, not once per channel
            night = self.archive.night(self.date)
            conditions = {(night.date, exposure.name): pipeline.guider(self.conditions, night,
                                                                       exposure)}
            self._add("science", channel, tasks.science_task,
                      (self.run, self.date, channel, exposure.name, cal_fp, found.response,
                       key, fp, conditions),
                      lambda ch, o, v, obsid=obsid: self._reduced(o, v, obsid), exposure=i)

    def _reduced(self, order: tuple, value, obsid: int) -> None:
        outcomes, join = value
        self._record(order, outcomes)
        if join is not None:
            self._join(obsid, order, join)

    def _join(self, obsid: int, order: tuple, value: tuple) -> None:
        self.joins.setdefault(obsid, {})[order[2:]] = value

    def _channel_finished(self, channel: str) -> None:
        """The channel's science is done: its QA (once), then progress; once every
        channel's science is done, the joins run here while the QA tasks run."""
        if channel not in self.qa:
            self.qa.add(channel)
            if len(self.qa) == len(self.run.channels):
                self.scheduler.background(self._join_in_background)
            done = NightSummary(self.date, self.run.output)
            done.outcomes = [o for _, outs in self.parts for o in outs
                             if getattr(o, "channel", None) == channel]
            if _report_due(self.run.output, self.date, done):
                self._add("qa", channel, qa_task, (self.run.output, self.date, channel),
                          lambda ch, o, v: None)
                return
        self.progress.channel_done(self.date, channel)

    def _crashed(self, step: str, channel: str, order: tuple, err: BaseException,
                 exposure: int) -> None:
        """A bug in a task: logged with a hint, recorded, the other tasks go on."""
        what = (f"{self.science[exposure].name} {channel}"
                if step == "science" else f"{self.date} {channel}")
        log.error("%s: internal error: %s: %s (a bug in panacea-lrs2; please report it)",
                  what, type(err).__name__, err, exc_info=log.isEnabledFor(10))
        self.crashed = True
        reason = f"internal error: {type(err).__name__}: {err}"
        local = NightSummary(self.date, self.run.output)
        if step == "science":
            e = self.science[exposure]
            local.add("science", "failed", channel=channel, exposure=e.name, obsid=e.obsid,
                      exp=e.exp, reason=reason)
        elif step in ("calibration", "response"):
            local.add(step, "failed", channel=channel, reason=reason)
        self._record(order, local.outcomes)

    def _outcomes(self) -> list[Outcome]:
        """The tasks' outcomes in the summary's fixed order."""
        return [o for _, outcomes in sorted(self.parts, key=lambda part: part[0])
                for o in outcomes]

    def _join_observations(self) -> None:
        """Combine the exposures and join the channels of every observation (all science
        tasks are done; the QA tasks, which do not read the joined files, may run)."""
        local = NightSummary(self.date, self.run.output)
        local.outcomes = self._outcomes()
        first = len(local.outcomes)
        joins = {obsid: found[min(found)] for obsid, found in self.joins.items()}
        pipeline.join_night(self.run, self.archive.night(self.date), self.science, joins,
                            local)
        self.joined = local.outcomes[first:]

    def _join_in_background(self) -> None:
        """The joins, unless the night has already finished (and joined) meanwhile: a
        queued job may outlive its night when the last channel needs no QA task."""
        if not self.finished and self.joined is None:
            self._join_observations()

    # ----------------------------------------------------------------- the end

    def finish(self) -> int:
        """Join, write summary and ledger (once every task of the night is done)."""
        self.finished = True
        if not self.locked:
            return EXIT_LOCKED
        try:
            if self.archive is not None:
                if self.joined is None:  # no task ran, or a channel's science crashed
                    self._join_observations()
                self.summary.outcomes.extend(self._outcomes())
                self.summary.outcomes.extend(self.joined)
                self.archive.close()
                self.ledger.night_done(self.date, raw_stamp(self.run.baseraw, self.date),
                                       self.summary.exit_code())
                self.ledger.close()
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
            gc.unfreeze()  # what this night left behind is collectable again
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
        "%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s",
        "%Y-%m-%dT%H:%M:%S"))
    logger = logging.getLogger("panacea")
    handler.setLevel(logging.DEBUG if logger.getEffectiveLevel() <= logging.DEBUG
                     else logging.INFO)
    handler.previous_level = logger.level  # type: ignore[attr-defined]
    if logger.getEffectiveLevel() > logging.INFO:  # the night log keeps INFO lines
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return handler


def qa_task(root: str | Path, date: str, channel: str) -> None:
    """The channel's QA task (:func:`_channel_report`, looked up when it runs)."""
    _channel_report(Path(root), date, channel)


def _preload_qa() -> None:
    """Import matplotlib and the QA modules here, before the local pool forks, so that
    each worker does not import them again (~1 s of CPU each) for its channel's plots."""
    if importlib.util.find_spec("matplotlib") is None:
        return
    from ..qa import channel_report  # noqa: F401  (and through it the metrics, plots)
    from ..qa.plots import warm_up

    warm_up()  # fonts loaded, the figures kept per process made and drawn once


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
