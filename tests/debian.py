"""Test helper: Debian packages a test needs, installed with apt-get when missing."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable


def apt_install(packages: tuple[str, ...], present: Callable[[], bool]) -> str | None:
    """Install ``packages`` unless ``present()`` already holds; None when they are there,
    else the reason they cannot be had here (for the test's skip message)."""
    if present():
        return None
    what = " and ".join(packages)
    if shutil.which("apt-get") is None:
        return f"{what} not installed and this system has no apt-get"
    if os.geteuid() != 0:
        return f"{what} not installed and apt-get needs root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            return f"{' '.join(cmd)} failed: {done.stderr.strip()[-300:]}"
    return None if present() else f"{what} still missing after apt-get"
