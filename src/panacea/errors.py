"""Exceptions raised by Panacea.

Every error the pipeline raises on purpose derives from :class:`PanaceaError`, so a driver
can tell a data problem (skip this exposure, report it) from a programming error.
"""

from __future__ import annotations


class PanaceaError(Exception):
    """Base class of all Panacea errors.

    Attributes
    ----------
    file : str or None
        The file (or ``tarball:member``) the error is about, when one is known; drivers put
        it in the night summary.
    """

    file: str | None = None

    def __init__(self, *args, file: str | None = None):
        super().__init__(*args)
        if file is not None:
            self.file = str(file)


class ArchiveError(PanaceaError):
    """A raw archive file (tarball, member, folder) could not be read."""


class NoDataError(ArchiveError):
    """No LRS2 raw data exist where they were looked for."""


class CalibrationNotFound(ArchiveError):
    """No calibration exposure of the requested kind within the search window.

    Attributes
    ----------
    kind : str
        Calibration kind (``bias``, ``twi``, ``flt``, ``arc``).
    searched : list of str
        Nights (YYYYMMDD) searched, in search order.
    baseraw : str
        Root of the raw archive that was searched.
    """

    def __init__(self, message: str, kind: str, searched: list[str], baseraw: str):
        super().__init__(message)
        self.kind = kind
        self.searched = list(searched)
        self.baseraw = baseraw


class FrameError(PanaceaError):
    """A raw amplifier frame is unreadable, malformed or missing."""


class UsageError(PanaceaError):
    """A command-line value or the environment it names is unusable (exit status 2)."""


class WriteError(PanaceaError, OSError):
    """A product could not be written (disk full, file-size limit, permissions)."""
