"""The tasks of a night, each a pure function of picklable values (the run configuration,
the date, names, fingerprints and the small response arrays) that opens its own archive
and ledger connection and writes its products atomically, so the local pool, Dask and
Slurm give the products of the serial run.

Per channel: :func:`calibration_task`, then :func:`response_task` (the night's standards),
then one :func:`science_task` per exposure; the runner submits each once its inputs are
done (:mod:`.runner`). Each returns the outcomes for the night's summary and its result.
"""

from __future__ import annotations

from pathlib import Path

from .. import pipeline
from .ledger import Ledger
from .summary import NightSummary, Outcome


def ledger_path(output: str | Path) -> Path:
    """``{output}/ledger.sqlite``."""
    return Path(output) / "ledger.sqlite"


def _archive(run, date: str):
    """The archive with night ``date`` indexed (None when unreadable: the runner, which
    indexed it first, has recorded why)."""
    return pipeline.open_night(run, date, NightSummary(date, run.output))


def calibration_task(run, date: str, channel: str) -> tuple[list[Outcome], str | None]:
    """The channel's calibration (built or reused): outcomes and the bundle's fingerprint
    (None when it failed)."""
    summary = NightSummary(date, run.output)
    archive = _archive(run, date)
    if archive is None:
        return summary.outcomes, None
    try:
        return summary.outcomes, pipeline.channel_calibration(run, archive, date, channel,
                                                              summary)
    finally:
        archive.close()


def response_task(run, date: str, channel: str, cal_fp: str, conditions: dict | None = None
                  ) -> tuple[list[Outcome], pipeline.ChannelResponse | None]:
    """The channel's response (and the products of the standards it reduced).
    ``conditions`` holds the guider conditions the runner has read so far (keyed as by
    :func:`pipeline.guider`); the others are read here."""
    summary = NightSummary(date, run.output)
    archive = _archive(run, date)
    if archive is None:
        return summary.outcomes, None
    try:
        with Ledger(ledger_path(run.output), run.config_hash) as ledger:
            found = pipeline.channel_response(run, archive, date, channel, cal_fp, summary,
                                              ledger, conditions=conditions)
        return summary.outcomes, found
    finally:
        archive.close()


def science_task(run, date: str, channel: str, exposure: str, cal_fp: str, response: tuple,
                 key: str, fp: str, conditions: dict | None = None
                 ) -> tuple[list[Outcome], tuple | None]:
    """One exposure of one channel: outcomes and (primary header, flux unit) when a source
    spectrum was written (for the join), else None. ``conditions`` holds the exposure's
    guider conditions when the runner has read them (once for all channels)."""
    summary = NightSummary(date, run.output)
    archive = _archive(run, date)
    if archive is None:
        return summary.outcomes, None
    try:
        night = archive.night(date)
        found = next(e for e in night.exposures() if e.name == exposure)
        with Ledger(ledger_path(run.output), run.config_hash) as ledger:
            join = pipeline.reduce_science(run, night, found, channel, cal_fp, response, key,
                                           fp, summary, ledger, conditions=conditions)
        return summary.outcomes, join
    finally:
        archive.close()


# many run in a row in a worker, each needing about the same memory: the worker keeps what
# one frees for the next (ops.executors.trimmed_task)
science_task.keeps_freed_memory = True  # type: ignore[attr-defined]
