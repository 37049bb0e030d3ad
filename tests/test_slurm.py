"""A two-night range reduced on a real single-node Slurm cluster through dask-jobqueue.

The cluster (slurm-wlm and munge from the distribution, installed when missing) runs on this
machine for the session; the test is skipped, saying why, only where it cannot be had.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import panacea
from panacea.cli import main
from panacea.ops.summary import night_folder

pytest.importorskip("dask_jobqueue", reason="the Slurm engine needs dask-jobqueue")

from engines import differences
from slurm_localhost import LocalSlurm, install


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A running single-node Slurm cluster (its SLURM_CONF set for the clients)."""
    reason = install()
    if reason is not None:
        pytest.skip(f"no Slurm cluster: {reason}")
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"), memory_mb=8000)
    old = os.environ.get("SLURM_CONF")
    try:
        cluster.start()
    except (OSError, RuntimeError) as err:
        cluster.stop()
        pytest.skip(f"no Slurm cluster: {err}")
    yield cluster
    cluster.stop()
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old


def _two_nights(sim_night, dest: Path) -> tuple[str, str]:
    """An archive whose two nights hold the same raw files (the second a copy of the first
    under the next date), guider frames and standards' reference spectra included."""
    first, second = sim_night.date, str(int(sim_night.date) + 1)
    for date in (first, second):
        for src in (sim_night.baseraw / first).rglob("*"):
            if src.is_file():
                link = dest / date / src.relative_to(sim_night.baseraw / first)
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(src)
    (dest / "standards").symlink_to(sim_night.baseraw / "standards")  # reference spectra
    return first, second


def test_slurm_two_night_range(slurm, sim_night, reduced, tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    first, second = _two_nights(sim_night, raw)
    cfg = tmp_path / "slurm.yaml"
    cfg.write_text(f"""calibration:
  windows: {{bias: 0, twi: 0, flt: 0, arc: 0}}   # each night its own frames
executor:
  slurm: {{queue: debug, cores: 1, memory: 3GB, jobs: 2, walltime: "00:20:00",
           log_directory: {tmp_path / "jobs"}}}
""")
    # the jobs run this checkout's panacea
    monkeypatch.setenv("PYTHONPATH", str(Path(panacea.__file__).parents[1]))
    out = tmp_path / "out"
    rc = main(["--dates", f"{first}:{second}", "-s", "uv", "--baseraw", str(raw),
               "--output", str(out), "--config", str(cfg), "--slurm"])
    assert rc == 0
    for date in (first, second):
        summary = json.loads((night_folder(out, date) / "summary.json").read_text())
        assert summary["counts"]["written"] >= 5 and summary["exit_code"] == 0
    assert list((tmp_path / "jobs").glob("*.err")), "no Slurm job ran"
    # the first night equals the serial run; the second, of the same frames, the first
    only_first = out / "first"
    only_first.mkdir()
    for p in list(out.rglob(f"*{first}*.fits")):
        target = only_first / p.relative_to(out)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(p)
    assert differences(only_first, reduced, exclude=("joined_",)) == []
    assert differences(only_first, out, rename=lambda n: n.replace(first, second)) == []
