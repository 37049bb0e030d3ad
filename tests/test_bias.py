"""Master bias and read noise against simulator truth."""

from __future__ import annotations

import numpy as np
import pytest

from panacea import instrument as inst
from panacea.archive import Archive
from panacea.bias import master_bias
from panacea.calibration import build_master_bias


@pytest.fixture(scope="module")
def uv_bias(sim_night):
    archive = Archive(sim_night.baseraw)
    exps = archive.night(sim_night.date).exposures(ftype="zro", channel="uv")
    return build_master_bias(archive, exps, inst.get_channel("uv")), len(exps)


def test_read_noise_within_5_percent(uv_bias, sim_night):
    mb, _ = uv_bias
    truth = sim_night.truth("uv")
    assert np.all(np.abs(mb.rdnoise / truth.rdnoise - 1) < 0.05)


def test_master_bias_structure(uv_bias, sim_night):
    mb, n = uv_bias
    truth = sim_night.truth("uv")
    ch = inst.get_channel("uv")
    true = inst.stitch(*(inst.orient(truth.bias_adu[a], amp, amp) * truth.gain[a]
                         for a, amp in enumerate(ch.amps)))
    # the per-row overscan takes out the pedestal and the row drift but not the row pattern
    # of the data columns, so compare after removing each row's median
    diff = (mb.image - np.median(mb.image, axis=1, keepdims=True)) - (
        true - np.median(true, axis=1, keepdims=True))
    noise = truth.rdnoise.mean() / np.sqrt(n)
    assert np.std(diff) == pytest.approx(noise, rel=0.1)  # nothing but read noise is left
    # the bias glow of the first read columns is recovered (column means)
    col_err = diff.mean(axis=0)
    assert np.max(np.abs(col_err)) < 6 * noise / np.sqrt(diff.shape[0])
    assert mb.image.dtype == np.float32 and mb.nframes == n


def test_disk_backed_stack_gives_the_same_master_bias(sim_night, monkeypatch):
    """Beyond BIAS_STACK_IN_MEMORY the frames go through a file: same numbers exactly."""
    from panacea import calibration

    monkeypatch.setattr(calibration, "BIAS_STACK_IN_MEMORY", 0)
    archive = Archive(sim_night.baseraw)
    exps = archive.night(sim_night.date).exposures(ftype="zro", channel="uv")[:3]
    on_disk = build_master_bias(archive, exps, inst.get_channel("uv"))
    monkeypatch.setattr(calibration, "BIAS_STACK_IN_MEMORY", 2**40)
    in_memory = build_master_bias(archive, exps, inst.get_channel("uv"))
    assert np.array_equal(on_disk.image, in_memory.image)
    assert np.array_equal(on_disk.variance, in_memory.variance)
    assert np.array_equal(on_disk.rdnoise, in_memory.rdnoise) and on_disk.nframes == 3


def test_band_combination_rejects_outliers():
    rng = np.random.default_rng(1)
    frames = rng.normal(0, 3, (7, 200, 100)).astype(np.float32)
    frames[2, 5, 5] = 5000.0  # a cosmic ray in one frame
    mb = master_bias(lambda i, rows: frames[i, rows], 7, (200, 100), amp_rows=100,
                     band_rows=32)
    assert abs(mb.image[5, 5]) < 5 and mb.image.std() == pytest.approx(3 / np.sqrt(7), rel=0.05)
    assert mb.rdnoise == pytest.approx([3, 3], rel=0.04)
    two = master_bias(lambda i, rows: frames[i, rows], 2, (200, 100), amp_rows=100)
    assert abs(two.image[5, 5]) < 10
    with pytest.raises(ValueError):
        master_bias(lambda i, rows: frames[i, rows], 1, (200, 100), amp_rows=100)
