"""Command-line values checked before any work: nights, channel lists, the output root.

Pure functions that return the cleaned value or raise :class:`panacea.errors.UsageError`
with a one-line message saying what is wrong with the value. The command line turns that
error into exit status 2 without a traceback.
"""

from __future__ import annotations

import datetime as dt
import errno
import os
import re
from pathlib import Path

from . import instrument
from .errors import UsageError

_EIGHT_DIGITS = re.compile(r"^\d{8}$")


def parse_date(text: str) -> str:
    """A night as ``YYYYMMDD`` that is a real calendar date.

    Parameters
    ----------
    text : str
        The value given on the command line.

    Returns
    -------
    str
        ``text`` stripped of surrounding blanks.

    Raises
    ------
    UsageError
        ``not YYYYMMDD`` when the text is not eight digits, ``not a calendar date`` when it
        is eight digits naming no day (month 13, 30 February, ...).
    """
    value = str(text).strip()
    if not _EIGHT_DIGITS.match(value):
        raise UsageError(f"night {text!r} is not YYYYMMDD (eight digits, e.g. 20181108)")
    try:
        dt.date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError as exc:
        raise UsageError(f"night {value} is not a calendar date ({exc})") from None
    return value


def parse_channels(text: str) -> list[str]:
    """Channel names of a comma-separated list such as ``uv,orange``, in the order given.

    Raises
    ------
    UsageError
        When the list is empty, names an unknown channel or names one twice.
    """
    known = list(instrument.channels())
    names = [t.strip().lower() for t in str(text).split(",")]
    names = [n for n in names if n]
    if not names:
        raise UsageError(f"no channel given in {text!r}; expected some of {', '.join(known)}")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UsageError(f"unknown channel {', '.join(repr(n) for n in unknown)} in {text!r}; "
                         f"expected some of {', '.join(known)}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UsageError(f"channel {', '.join(twice)} named more than once in {text!r}")
    return names


def check_output_root(path: str | Path) -> Path:
    """The product tree root, created if missing, checked to be a writable folder.

    Raises
    ------
    UsageError
        When the path (or one of its parents) is a file, cannot be created, or is not
        writable by this user.
    """
    root = Path(path).expanduser()
    for parent in (root, *root.parents):
        if parent.exists() and not parent.is_dir():
            raise UsageError(f"output {root}: {parent} is a file, not a folder")
        if parent.exists():
            break
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"output {root}: cannot be created ({_reason(exc)})") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise UsageError(f"output {root}: not writable by this user")
    probe = root / f".panacea-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"output {root}: not writable ({_reason(exc)})") from None
    return root


def _reason(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno in errno.errorcode else str(exc)
