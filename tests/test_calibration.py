"""Whole-channel calibration from raw frames through the CLI, against simulator truth."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from panacea.calbundle import bundle_path, read_bundle
from panacea.cli import main

CHANNELS = ("uv", "orange", "red", "farred")


@pytest.mark.parametrize("channel", CHANNELS)
def test_calibration_against_truth(reduced, sim_night, channel):
    b = read_bundle(bundle_path(reduced, sim_night.date, channel))
    t = sim_night.truth(channel)
    live = ~t.dead
    # dead fibers: all found, none invented
    assert np.array_equal(b["dead"].astype(bool), t.dead)
    # trace (targets: 0.01 px on the benchmark night; 2 twilights here)
    err = b["trace"][live] - t.trace[live]
    assert np.sqrt(np.mean(err**2)) < 0.012
    assert np.max(np.abs(err)) < 0.06
    # wavelength in pixels over all live fibers and all columns
    werr = (b["wavelength"][live] - t.wavelength[live]) / t.dispersion[live]
    assert np.sqrt(np.mean(werr**2)) < 0.02
    assert np.max(np.abs(werr)) < 0.10
    # fiber-to-fiber, both normalised by the median fiber at each column
    f = b["flat"][live] / np.median(b["flat"][live], axis=0)
    tt = t.throughput[live] / np.median(t.throughput[live], axis=0)
    assert np.sqrt(np.mean((f / tt - 1) ** 2)) < 0.006
    # read noise within 5 % of the truth
    assert np.all(np.abs(b["rdnoise"] / t.rdnoise - 1) < 0.05)
    # pixel maps are consistent with the per-fiber solutions
    k = 140
    col = 1000
    row = int(round(b["trace"][k, col]))
    assert b["bigw"][row, col] == pytest.approx(b["wavelength"][k, col], abs=0.5)


def test_rerun_reuses_bundles(reduced, sim_night, caplog):
    path = bundle_path(reduced, sim_night.date, "uv")
    before = path.stat().st_mtime_ns
    with caplog.at_level(logging.INFO):
        rc = main(["-d", sim_night.date, "-s", "uv", "--baseraw", str(sim_night.baseraw),
                   "--output", str(reduced)])
    assert rc == 0
    assert "reusing calibration" in caplog.text
    assert path.stat().st_mtime_ns == before


def test_night_without_arcs_fails_clearly(sim_night, fakeraw, tmp_path, caplog):
    base = fakeraw.copy_night(sim_night.baseraw, sim_night.date, tmp_path / "raw",
                              skip={4, 5, 6})
    with caplog.at_level(logging.ERROR):
        rc = main(["-d", sim_night.date, "-s", "farred", "--baseraw", str(base),
                   "--output", str(tmp_path / "out")])
    assert rc == 1
    assert "arc" in caplog.text and "20181101" in caplog.text and "20181115" in caplog.text
    assert not bundle_path(tmp_path / "out", sim_night.date, "farred").exists()


def test_contradicting_header_is_left_out(sim_night, fakeraw, tmp_path, caplog):
    """A twilight whose IMAGETYP says 'sci' is left out with a warning; the rest calibrates."""

    def retype(name, hdul):
        if hdul[0].header["EXPN"] == 1:
            hdul[0].header["IMAGETYP"] = "sci"

    base = fakeraw.copy_night(sim_night.baseraw, sim_night.date, tmp_path / "raw",
                              edit={2: retype})
    with caplog.at_level(logging.WARNING):
        rc = main(["-d", sim_night.date, "-s", "orange", "--baseraw", str(base),
                   "--output", str(tmp_path / "out")])
    assert rc == 0
    assert "contradicts file type" in caplog.text
    b = read_bundle(bundle_path(tmp_path / "out", sim_night.date, "orange"))
    assert b.meta["NFLAT"] == 1


def test_science_selection(sim_night):
    from panacea.archive import Archive
    from panacea.cli import reduce_parser
    from panacea.ops.cli_config import run_config_from_args
    from panacea.pipeline import science_exposures

    def selection(*argv):
        return run_config_from_args(reduce_parser().parse_args(argv)).selection

    night = Archive(sim_night.baseraw).night(sim_night.date)
    sel = selection("-d", sim_night.date)
    assert {e.obsid for e in science_exposures(night, sel)} == {7, 8, 12}
    sel = selection("-d", sim_night.date, "-o", "feige")
    assert {e.obsid for e in science_exposures(night, sel)} == {7, 8}
    sel = selection("-d", sim_night.date, "-rf", "-o", "ldls")
    assert {e.ftype for e in science_exposures(night, sel)} == {"flt"}
