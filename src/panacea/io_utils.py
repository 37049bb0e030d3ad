"""FITS helpers: header numbers read safely, products written whole or not at all."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from astropy.io import fits
from astropy.io.fits.verify import VerifyError


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
        return f"{card.image[10:].split('/')[0].strip()!r} (unparsable card)"


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

    A crash or a full disk leaves any previous file at ``path`` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        hdul.writeto(tmp, overwrite=True, checksum=True)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; products are for everyone
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
