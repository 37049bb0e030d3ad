"""The ledger ``{output}/ledger.sqlite``: what was reduced, from which inputs, with which
version and configuration, when, and with what outcome.

One row per item (``science {exposure} {channel}``, ``response {date} {channel}``), replaced
on every run. A product is up to date when its row has the same inputs fingerprint, a
produced outcome, and every product file still exists. ``--new`` asks it which nights of the
archive were never reduced or whose raw tarballs changed since.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from pathlib import Path

from .. import __version__
from .summary import Outcome

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    key TEXT PRIMARY KEY,      -- 'science 20181108 lrs20000012 exp01 orange', ...
    date TEXT NOT NULL,        -- night, YYYYMMDD
    fingerprint TEXT NOT NULL, -- raw files, calibration, response, configuration, version
    status TEXT NOT NULL,      -- written / up-to-date / skipped / failed
    reason TEXT,
    products TEXT,             -- JSON list of paths relative to the product tree
    version TEXT NOT NULL,     -- panacea-lrs2 version
    config TEXT,               -- configuration hash
    finished REAL NOT NULL     -- Unix time
);
CREATE TABLE IF NOT EXISTS nights (
    date TEXT PRIMARY KEY,
    raw TEXT NOT NULL,         -- stamp of the night's raw folder (tarball names, sizes, mtimes)
    exit_code INTEGER NOT NULL,
    finished REAL NOT NULL
);
"""


class Ledger:
    """The SQLite ledger of a product tree (opened per process; safe across processes).

    Parameters
    ----------
    path : path
        ``{output}/ledger.sqlite``.
    config : str
        Configuration hash stamped on the rows written.
    """

    def __init__(self, path: str | Path, config: str = ""):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.root = self.path.parent
        self._db = sqlite3.connect(self.path, timeout=60)
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def current(self, key: str, fingerprint: str) -> list[str] | None:
        """The products of ``key`` when they were produced from ``fingerprint`` and all still
        exist, else None."""
        row = self._db.execute("SELECT fingerprint, status, products FROM items WHERE key = ?",
                               (key,)).fetchone()
        if row is None or row[0] != fingerprint or row[1] not in ("written", "up-to-date"):
            return None
        products = [str(self.root / p) for p in json.loads(row[2] or "[]")]
        if not products or not all(Path(p).is_file() for p in products):
            return None
        return products

    def record(self, key: str, fingerprint: str | None, outcome: Outcome) -> None:
        """Store the outcome of ``key`` (committed at once, so a killed run keeps it)."""
        if fingerprint is None:
            return
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO items VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key, outcome.date, fingerprint, outcome.status, outcome.reason,
                 json.dumps([self._relative(p) for p in outcome.products]), __version__,
                 self.config, time.time()))

    def _relative(self, path: str) -> str:
        """``path`` relative to the product tree (the tree may be moved or copied)."""
        try:
            return str(Path(path).resolve().relative_to(self.root.resolve()))
        except ValueError:
            return str(path)

    def night_done(self, date: str, raw: str, exit_code: int) -> None:
        """Remember that night ``date`` was reduced from raw folder stamp ``raw``."""
        with self._db:
            self._db.execute("INSERT OR REPLACE INTO nights VALUES (?, ?, ?, ?)",
                             (date, raw, exit_code, time.time()))

    def night_stamp(self, date: str) -> tuple[str, int] | None:
        """(raw stamp, exit code) of the last run of night ``date``, or None."""
        row = self._db.execute("SELECT raw, exit_code FROM nights WHERE date = ?",
                               (date,)).fetchone()
        return None if row is None else (row[0], int(row[1]))


def raw_stamp(baseraw: str | Path, date: str) -> str:
    """A stamp of ``{baseraw}/{date}/lrs2``: every file's name, size and mtime (a new or
    changed tarball changes it; no file is read)."""
    folder = Path(baseraw) / date / "lrs2"
    items = []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            st = path.stat()
            items.append(f"{path.relative_to(folder)}:{st.st_size}:{st.st_mtime_ns}")
    return "\n".join(items)


def new_nights(ledger: Ledger, baseraw: str | Path, config: str) -> list[str]:
    """Nights of the archive never reduced, whose raw folder changed, whose last run did not
    produce everything, or that were reduced with another configuration."""
    out = []
    for folder in sorted(Path(baseraw).glob("[12][0-9][0-9][0-9][01][0-9][0-3][0-9]")):
        if not (folder / "lrs2").is_dir():
            continue
        date = folder.name
        last = ledger.night_stamp(date)
        if last is None or last[0] != raw_stamp(baseraw, date) or last[1] != 0:
            out.append(date)
            continue
        row = ledger._db.execute("SELECT COUNT(*) FROM items WHERE date = ? AND config != ?",
                                 (date, config)).fetchone()
        if row[0]:
            out.append(date)
    return out
