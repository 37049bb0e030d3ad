"""FITS helpers: header numbers read safely, products written whole or not at all."""

from __future__ import annotations

import logging
import math
import os
import tempfile
from pathlib import Path

from astropy.io import fits
from astropy.io.fits.verify import VerifyError

from .errors import WriteError

log = logging.getLogger(__name__)

#: Seconds a ``.part`` file must be older than the run's start to count as stale.
PART_GRACE = 60.0


def header_value(header: fits.Header, key: str) -> object:
    """Header value ``key``; None when absent or when the card cannot be parsed (an
    unparsable card such as ``EXPTIME = NaN`` makes astropy raise on access)."""
    try:
        return header.get(key)
    except (VerifyError, ValueError):
        return None


def card_text(header: fits.Header, key: str) -> str:
    """The value of card ``key`` as written in the file, for messages (``missing`` when
    the card is absent)."""
    try:
        card = header.cards[key]
    except (KeyError, IndexError):
        return "missing"
    try:
        return repr(card.value)
    except (VerifyError, ValueError):
        text = card.image[10:].split("/")[0].strip().strip("'").strip()
        return f"{text} (unparsable card)"


def header_number(header: fits.Header, key: str) -> float | None:
    """Header value ``key`` as a finite float; None when absent, boolean, unparsable or not
    a number."""
    value = header_value(header, key)
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def write_fits_atomic(hdul: fits.HDUList, path: str | Path) -> Path:
    """Write ``hdul`` with checksums to a temporary file beside ``path``, then rename.

    A crash or a full disk leaves any previous file at ``path`` untouched and no partial
    file behind.

    Raises
    ------
    WriteError
        When the folder cannot be made or the file cannot be written (disk full, file-size
        limit, no permission); the message names the file and the reason.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        os.close(fd)
        hdul.writeto(tmp, overwrite=True, checksum=True)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; products are for everyone
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        reason = exc.strerror or str(exc)
        if "requested and" in reason:  # astropy's short write: the disk or a size limit
            reason = f"disk full or file-size limit reached: {reason}"
        raise WriteError(f"{path}: cannot write ({reason}); no partial file left",
                         file=path) from exc
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove_stale_parts(root: str | Path, started: float, grace: float = PART_GRACE
                       ) -> list[Path]:
    """Remove the temporary ``.*.part`` files that :func:`write_fits_atomic` left under
    ``root`` in earlier runs (killed, or out of disk).

    Parameters
    ----------
    root : path
        Product tree root.
    started : float
        Start of the current run (seconds since the epoch, ``time.time()``).
    grace : float
        Seconds: a file modified less than this before ``started`` is kept, in case another
        run is still writing it.

    Returns
    -------
    list of Path
        The files removed (each logged with its size).
    """
    removed = []
    root = Path(root)
    if not root.is_dir():
        return removed
    for path in root.rglob(".*.part"):
        try:
            stat = path.stat()
            if not path.is_file() or stat.st_mtime > started - grace:
                continue
            path.unlink()
        except OSError as exc:
            log.warning("%s: stale partial file not removed (%s)", path, exc)
            continue
        log.warning("%s: removed a partial file (%d bytes) left by an earlier run", path,
                    stat.st_size)
        removed.append(path)
    return removed


def _umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
