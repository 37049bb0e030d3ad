"""The night's sky lines constrain the shape of the wavelength solution (issue 12 item 2),
judged against the simulator's truth."""

from __future__ import annotations

import numpy as np
import pytest

from panacea import instrument
from panacea import skyshape as ss
from panacea import wavelength as wv
from panacea.archive import Archive
from panacea.ccd import read_channel
from panacea.extract import boxcar

NCOL = 2064


def _rms(wave: np.ndarray, truth) -> float:
    """RMS (px) against truth over live fibers, columns 50..ncol-50 (as the benchmark)."""
    err = ((wave - truth.wavelength) / truth.dispersion)[~truth.dead][:, 50:-50]
    return float(np.sqrt(np.mean(err**2)))


@pytest.fixture(scope="module")
def red_seed1(red_randomized_night):
    """The shared red randomized night 1 (conftest): its arc solution and the sky lines of
    its two 900 s exposures, extracted on the true traces."""
    night, truth, arcs = red_randomized_night
    sol = wv.solve_wavelength(wv.arc_spectra_from_frames(arcs, truth.trace, 3.0), "red",
                              truth.dead)
    sky = []
    for exp in night.exposures(ftype="sci", channel="red"):
        frame = read_channel(night, exp, "red")
        flux, var = boxcar(frame.image, truth.trace, 3.0, frame.variance)
        sky.append(ss.measure_exposure(flux, var, sol.wave, ~truth.dead, exp.name))
    return sol, sky, truth


def test_sky_lines_beat_the_arcs_alone(red_seed1):
    """The arcs (17 lines) leave the ripple between them: 0.14 px against truth. With the
    sky lines of two exposures (23-24 lines each) the held-out lines choose a shape that
    takes out a quarter of it."""
    sol, sky, truth = red_seed1
    # 24 usable listed lines, each stacked in three groups of fibers along the slit
    assert all(len(s) >= 60 for s in sky)
    lines = sol.lines
    arc = ss.arc_residuals(lines.column, sol.column(lines.wavelength), lines.used,
                           lines.column_err)
    shape = ss.fit_shape(sky, arc, sol.wave.shape[1])
    assert shape.applied and shape.nexp == 2
    assert shape.rms < 0.95 * shape.rms_none
    before, after = _rms(sol.wave, truth), _rms(ss.apply_shape(sol.wave, shape.offsets), truth)
    assert before > 0.13  # the case keeps its large ripple
    assert after < 0.115 and after < 0.8 * before  # measured 0.143 -> 0.106


def test_no_sky_lines_leave_the_arcs_alone(red_seed1):
    """Too few sky lines: no shape, zero offsets, the solution unchanged."""
    sol, sky, _ = red_seed1
    lines = sol.lines
    arc = ss.arc_residuals(lines.column, sol.column(lines.wavelength), lines.used,
                           lines.column_err)
    few = [ss.SkyLines(s.name, s.wavelength[:3], s.column[:3], s.offset[:3], s.error[:3],
                       s.fiber[:3]) for s in sky]
    shape = ss.fit_shape(few, arc, NCOL)
    assert not shape.applied and "sky lines measured" in shape.reason
    assert np.array_equal(ss.apply_shape(sol.wave, shape.offsets), sol.wave)


def _synthetic(rng, ripple: float):
    """Sky offsets of three exposures (shift, stretch, a common ripple, noise 0.02 px) and
    arc residuals at eight columns (the ripple there, noise 0.01 px)."""
    def r(c):
        return ripple * np.sin(2 * np.pi * c / 350.0 + 0.4)

    cols = np.sort(rng.uniform(60, NCOL - 60, 30))
    sky = []
    for e, (a, b) in enumerate(((0.4, 0.05), (-0.7, -0.1), (0.1, 0.0))):
        x = (cols - (NCOL - 1) / 2) / ((NCOL - 1) / 2)
        off = a + b * x + r(cols) + rng.normal(0, 0.02, cols.size)
        sky.append(ss.SkyLines(f"e{e}", 6500.0 + cols, cols, off, np.full(cols.size, 0.02)))
    acol = np.linspace(100, NCOL - 100, 8)
    arc = (acol, r(acol) + rng.normal(0, 0.01, acol.size), np.full(acol.size, 0.02))
    return sky, arc, r(np.arange(NCOL, dtype=float))


def test_shape_and_flexure_recovered():
    """A 0.15 px ripple that eight arc lines cannot sample is recovered from 30 sky lines in
    three exposures to 0.03 px, with each exposure's shift and stretch."""
    sky, arc, true = _synthetic(np.random.default_rng(5), 0.15)
    shape = ss.fit_shape(sky, arc, NCOL)
    assert shape.applied
    err = (shape.offsets - true)[60:-60]
    assert np.sqrt(np.mean(err**2)) < 0.03
    assert shape.shifts["e0"] == pytest.approx((0.4, 0.05), abs=0.03)
    assert shape.shifts["e1"] == pytest.approx((-0.7, -0.1), abs=0.03)


def test_no_ripple_no_shape():
    """Without a common shape the held-out lines keep the arcs alone (never worse)."""
    sky, arc, _ = _synthetic(np.random.default_rng(6), 0.0)
    shape = ss.fit_shape(sky, arc, NCOL)
    assert not shape.applied
    assert not np.any(shape.offsets)


def test_onsky_exposures_enter_the_calibration(sim_night, fakeraw, tmp_path):
    """The night's on-sky exposures are inputs of the calibration: one more or less changes
    its fingerprint (so the bundle is rebuilt)."""
    from panacea.calbundle import content_fingerprint
    from panacea.calibration import CalibrationOptions, plan_calibration

    opts = CalibrationOptions()
    night = Archive(sim_night.baseraw).night(sim_night.date)
    sci = night.exposures(ftype="sci", channel="red")
    assert len(sci) == 3  # the standard in each arm's IFU and one science exposure
    plan = plan_calibration(Archive(sim_night.baseraw), sim_night.date,
                            instrument.get_channel("red"), opts)
    assert {e.name for e in plan.onsky} == {e.name for e in sci}
    assert {e.name for e in sci} <= set(plan.inputs)
    fewer = fakeraw.copy_night(sim_night.baseraw, sim_night.date, tmp_path / "raw",
                               skip=(sci[-1].obsid,))
    plan2 = plan_calibration(Archive(fewer), sim_night.date, instrument.get_channel("red"),
                             opts)
    assert len(plan2.onsky) == 2
    assert (content_fingerprint(plan2.inputs, plan2.sources, opts.describe())
            != content_fingerprint(plan.inputs, plan.sources, opts.describe()))


@pytest.mark.parametrize("channel", ("uv", "red"))
def test_bundle_says_how_the_shape_was_chosen(reduced, sim_night, channel):
    """The cards say which model the sky lines chose and what constrained it; uv (two sky
    lines) keeps the arcs alone."""
    from panacea.calbundle import bundle_path, read_bundle

    meta = read_bundle(bundle_path(reduced, sim_night.date, channel)).meta
    if channel == "uv":
        assert meta["WSKYMOD"] == "none" and meta["WSKYMAX"] == 0
        assert meta["WSKYNL"] < ss.MIN_SKY_LINES
    else:
        assert meta["WSKYNE"] == 3  # the standard in each arm's IFU and one science exposure
        assert meta["WSKYNL"] >= 15 and meta["WSKYNM"] >= 3 * meta["WSKYNL"]
        assert meta["WSKYCV0"] > 0
        if meta["WSKYMOD"] != "none":
            assert meta["WSKYCV"] < 0.95 * meta["WSKYCV0"]
