"""Provenance cards stamped into every product: versions, git hash, options."""

from __future__ import annotations

import subprocess
from functools import cache
from pathlib import Path

import astropy
import numpy as np
import scipy
from astropy.io import fits

from . import __version__


@cache
def git_hash() -> str:
    """Short git hash of the source tree, or 'unknown' outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def stamp(header: fits.Header, options: dict | None = None) -> fits.Header:
    """Add software versions and (short) options to ``header`` in place; return it."""
    header["PANVER"] = (__version__, "panacea-lrs2 version")
    header["PANGIT"] = (git_hash(), "panacea git hash")
    header["NPVER"] = (np.__version__, "numpy version")
    header["SPVER"] = (scipy.__version__, "scipy version")
    header["APVER"] = (astropy.__version__, "astropy version")
    for key, value in (options or {}).items():
        card = f"HIERARCH PAN OPT {key.upper()}"
        header[card] = value if isinstance(value, (int, float, bool)) else str(value)[:40]
    return header
