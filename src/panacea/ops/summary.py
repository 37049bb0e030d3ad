"""What a night run produced: one outcome per item, ``summary.json`` and the exit code.

Every calibration, standard, science exposure-channel and joined observation a run was asked
for ends as one :class:`Outcome` (written, up-to-date, skipped or failed, with the reason and
the offending file). :class:`NightSummary` collects them, writes
``{output}/NIGHTS/{date}/summary.json`` atomically and gives the process exit code.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

#: Exit codes of ``panacea-lrs2`` (documented in docs/operations.md).
EXIT_OK = 0  # everything requested was produced (written or already up to date)
EXIT_INCOMPLETE = 1  # some exposures or channels could not be produced
EXIT_USAGE = 2  # usage or configuration error
EXIT_LOCKED = 3  # another run holds the night's lock
EXIT_INTERNAL = 4  # an internal error (a bug)

KINDS = ("raw", "calibration", "standard", "response", "science", "joined")
#: Kinds that are products the run was asked for. A standard or response that could not be
#: used is recorded, but the night falls back to another response (the products still come).
REQUESTED = ("raw", "calibration", "science", "joined")
STATUSES = ("written", "up-to-date", "skipped", "failed")
SUMMARY_VERSION = 1


@dataclass
class Outcome:
    """The fate of one item of a night run.

    Attributes
    ----------
    kind : str
        One of :data:`KINDS`.
    date : str
        Night, YYYYMMDD.
    status : str
        One of :data:`STATUSES`: ``written`` (produced now), ``up-to-date`` (a valid product
        from an earlier run kept), ``skipped`` (input unusable, nothing produced) or
        ``failed`` (the step raised an error).
    channel : str or None
        LRS2 channel, None for a joined observation.
    exposure : str or None
        Exposure name (``20181108 lrs20000012 exp01``), None for calibrations.
    obsid, exp : int or None
        Observation and exposure numbers.
    reason : str
        Why it was skipped or failed (empty when written).
    file : str or None
        The offending input file, when one is known.
    products : list of str
        Paths of the products written or kept.
    """

    kind: str
    date: str
    status: str
    channel: str | None = None
    exposure: str | None = None
    obsid: int | None = None
    exp: int | None = None
    reason: str = ""
    file: str | None = None
    products: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown outcome kind {self.kind!r}")
        if self.status not in STATUSES:
            raise ValueError(f"unknown outcome status {self.status!r}")

    @property
    def produced(self) -> bool:
        """True when the item's products exist after the run."""
        return self.status in ("written", "up-to-date")


class NightSummary:
    """Outcomes of one night's run and the exit code they imply.

    Parameters
    ----------
    date : str
        Night, YYYYMMDD.
    output : path
        Product tree root; the summary goes to ``{output}/NIGHTS/{date}/summary.json``.
    """

    def __init__(self, date: str, output: str | Path):
        self.date = date
        self.output = Path(output)
        self.outcomes: list[Outcome] = []
        self.started = time.time()
        self.error: str | None = None  # a night-level failure (no data, unreadable)
        self.nodata = False  # the night has no LRS2 data at all

    @property
    def path(self) -> Path:
        return night_folder(self.output, self.date) / "summary.json"

    def add(self, kind: str, status: str, **fields) -> Outcome:
        """Record one outcome (``fields`` as in :class:`Outcome`) and log failures."""
        outcome = Outcome(kind, self.date, status, **fields)
        self.outcomes.append(outcome)
        if not outcome.produced:
            where = f" ({outcome.file})" if outcome.file else ""
            log.debug("%s %s %s: %s%s", kind, outcome.exposure or self.date,
                      outcome.channel or "", status, where)
        return outcome

    def fail_night(self, reason: str, nodata: bool = False) -> None:
        """The night as a whole could not be reduced (``nodata``: it holds no LRS2 data)."""
        self.error = reason
        self.nodata = nodata

    def counts(self) -> Counter:
        """Number of outcomes per status."""
        return Counter(o.status for o in self.outcomes)

    def exit_code(self) -> int:
        """:data:`EXIT_OK` when every requested item (:data:`REQUESTED` kinds) was produced
        and the night itself did not fail, else :data:`EXIT_INCOMPLETE`."""
        if self.error is not None or any(not o.produced for o in self.outcomes
                                         if o.kind in REQUESTED):
            return EXIT_INCOMPLETE
        return EXIT_OK

    def last_line(self) -> str:
        """One line for the end of the log, e.g. ``night 20181108: 18 written, 0 up-to-date,
        2 skipped, 0 failed -> exit 1``."""
        n = self.counts()
        text = (f"night {self.date}: {n['written']} written, {n['up-to-date']} up-to-date, "
                f"{n['skipped']} skipped, {n['failed']} failed")
        if self.error:
            text += f" ({self.error})"
        return f"{text} -> exit {self.exit_code()}"

    def as_dict(self) -> dict:
        return {
            "version": SUMMARY_VERSION,
            "date": self.date,
            "output": str(self.output),
            "started": _iso(self.started),
            "finished": _iso(time.time()),
            "error": self.error,
            "counts": {s: self.counts()[s] for s in STATUSES},
            "exit_code": self.exit_code(),
            "outcomes": [asdict(o) for o in self.outcomes],
        }

    def write(self) -> Path:
        """Write ``summary.json`` atomically (temporary file, then rename); return its path."""
        return write_json_atomic(self.as_dict(), self.path)


def night_folder(output: str | Path, date: str) -> Path:
    """``{output}/NIGHTS/{date}``: the night's summary, log, lock and reports."""
    return Path(output) / "NIGHTS" / date


def write_json_atomic(data: dict, path: str | Path) -> Path:
    """Write ``data`` as indented JSON to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1)
            fh.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
