"""Damage for the fault-injection tests: truncated, overwritten and rewritten raw files,
edited header cards, and the command line run in a subprocess."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SRC = Path(__file__).resolve().parents[1] / "src"


def truncate(path: Path, size: int) -> Path:
    """Cut ``path`` (a real file, not a link) to ``size`` bytes."""
    data = Path(path).read_bytes()[:size]
    Path(path).unlink()
    Path(path).write_bytes(data)
    return Path(path)


def overwrite(path: Path, offset: int, nbytes: int, seed: int = 0) -> Path:
    """Replace ``nbytes`` bytes at ``offset`` by random ones (the file stays the same size)."""
    data = bytearray(Path(path).read_bytes())
    rng = np.random.default_rng(seed)
    data[offset:offset + nbytes] = rng.integers(0, 256, nbytes, dtype=np.uint8).tobytes()
    Path(path).unlink(missing_ok=True)
    Path(path).write_bytes(bytes(data))
    return Path(path)


def replace_file(path: Path, content: bytes) -> Path:
    """Put ``content`` where ``path`` (possibly a symlink into the shared night) was."""
    Path(path).unlink(missing_ok=True)
    Path(path).write_bytes(content)
    return Path(path)


def rewrite_tar(path: Path, change) -> Path:
    """Rewrite tarball ``path`` member by member: ``change(index, name, data)`` returns new
    bytes, or None to keep the member as it is. ``path`` may be a symlink; the result is a
    real file."""
    path = Path(path)
    src = path.resolve()
    out = path.with_name(path.name + ".new")
    with tarfile.open(src) as tin, tarfile.open(out, "w") as tout:
        for i, info in enumerate(tin.getmembers()):
            data = tin.extractfile(info).read() if info.isfile() else None
            if data is not None:
                new = change(i, info.name, data)
                data = data if new is None else new
                info.size = len(data)
            tout.addfile(info, io.BytesIO(data) if data is not None else None)
    path.unlink()
    out.rename(path)
    return path


def set_card(fits_bytes: bytes, key: str, value_text: str) -> bytes:
    """The FITS bytes with card ``key`` of the primary header rewritten as it would be
    written by hand: ``KEY     = {value_text}`` (so unparsable values can be made)."""
    head = fits_bytes[:2880 * 4]
    prefix = f"{key:<8}= ".encode()
    for start in range(0, len(head), 80):
        if head[start:start + 10] == prefix:
            card = f"{key:<8}= {value_text:>20} / edited by the fault tests".ljust(80)
            return fits_bytes[:start] + card.encode() + fits_bytes[start + 80:]
    raise KeyError(key)


def members_of(path: Path) -> list[str]:
    with tarfile.open(Path(path).resolve()) as tar:
        return tar.getnames()


@dataclass
class Run:
    """A finished command-line run."""

    returncode: int
    output: str  # stdout and stderr together

    @property
    def errors(self) -> list[str]:
        return [line for line in self.output.splitlines() if " ERROR " in line]

    @property
    def warnings(self) -> list[str]:
        return [line for line in self.output.splitlines() if " WARNING " in line]


def run_cli(*args: str, preexec_fn=None, timeout: float = 300, cwd=None,
            wrapper: tuple[str, ...] = ()) -> Run:
    """``panacea-lrs2 ARGS`` in a fresh interpreter with this tree's sources first
    (``wrapper``: a command that runs it, e.g. ``setpriv`` dropping privileges)."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run([*wrapper, sys.executable, "-m", "panacea.cli", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=timeout,
                          preexec_fn=preexec_fn, cwd=cwd)
    return Run(proc.returncode, proc.stdout + proc.stderr)


def part_files(root: Path) -> list[Path]:
    """Partial files of interrupted writes under ``root``."""
    return sorted(Path(root).rglob("*.part"))
