"""The night's tasks on real engines give the products of the serial run."""

from __future__ import annotations

import json
import shutil

import pytest

from panacea.cli import main
from panacea.ops.summary import night_folder

pytest.importorskip("dask.distributed", reason="the dask engine needs dask[distributed]")

from engines import differences


def test_dask_local_cluster_matches_serial(reduced, sim_night, tmp_path):
    """One channel's science on a Dask LocalCluster of two worker processes (calibration
    bundle of the serial run reused) equals the serial products to float32 rounding."""
    out = tmp_path / "dask"
    (out / "CALS").mkdir(parents=True)
    shutil.copy2(reduced / "CALS" / f"cal_{sim_night.date}_uv.fits", out / "CALS")
    rc = main(["-d", sim_night.date, "-s", "uv", "--baseraw", str(sim_night.baseraw),
               "--output", str(out), "--scheduler", "local", "--jobs", "2"])
    assert rc == 0
    summary = json.loads((night_folder(out, sim_night.date) / "summary.json").read_text())
    science = [o for o in summary["outcomes"] if o["kind"] == "science"]
    assert len(science) == 3 and all(o["status"] == "written" for o in science)
    # the workers' log lines reach the night's log (they would stay on the workers)
    night_log = night_folder(out, sim_night.date) / f"panacea_{sim_night.date}.log"
    assert "panacea.science" in night_log.read_text()
    # joined spectra: the serial run joined four channels, this one uv only
    assert differences(out, reduced, exclude=("joined_",)) == []
