"""One writer per output tree and night: an fcntl lock on ``{output}/NIGHTS/{date}/.lock``.

The lock file holds the holder's pid, host and start time, so a second run can say who has
the night. The lock is advisory (``fcntl.flock``) and released by the kernel when the holder
exits, even when it is killed: a stale file never blocks a later run.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from pathlib import Path

from ..errors import PanaceaError
from .summary import night_folder

log = logging.getLogger(__name__)


class LockHeld(PanaceaError):
    """Another run holds the night's lock (exit code 3)."""


class NightLock:
    """Context manager holding ``{output}/NIGHTS/{date}/.lock``.

    Parameters
    ----------
    output : path
        Product tree root.
    date : str
        Night, YYYYMMDD.
    wait : bool
        Block until the lock is free instead of raising :class:`LockHeld`.
    """

    def __init__(self, output: str | Path, date: str, wait: bool = False):
        self.path = night_folder(output, date) / ".lock"
        self.wait = wait
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`LockHeld` naming the holder (unless ``wait``);
        :class:`~panacea.errors.PanaceaError` when the lock file cannot be created."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise PanaceaError(f"{self.path}: cannot create the night's lock file "
                               f"({err.strerror}); is the output tree writable?") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(self.path)
                if not self.wait:
                    raise LockHeld(
                        f"{self.path}: another run holds this night ({holder}); wait for it, "
                        "or pass --wait to start when it ends") from None
                log.info("%s: held by %s; waiting", self.path, holder)
                fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} host {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> NightLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return text or "holder unknown"
