"""Wavelength solution: line identification and the 2-D fit, judged against simulator truth."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from panacea import instrument
from panacea import wavelength as wv
from panacea.archive import Archive
from panacea.ccd import read_channel

CHANNELS = ("uv", "orange", "red", "farred")
#: The brightest line of each channel saturates in the simulated arcs.
SATURATED_LINES = {"uv": 4358.327, "red": 7635.106, "farred": 8521.442}


@pytest.fixture(scope="module")
def arc_inputs(sim_night):
    """Per channel: extracted arc spectra (true traces), the truth and the solution."""
    night = Archive(sim_night.baseraw).night(sim_night.date)
    out = {}
    for name in CHANNELS:
        truth = sim_night.truth(name)
        frames: dict[str, list] = {}
        for exp in night.exposures(ftype="cmp", channel=name):
            frame = read_channel(night, exp, name)
            lamp = instrument.ARC_OBJECTS[str(frame.header["OBJECT"]).strip().lower()]
            frames.setdefault(lamp, []).append(frame)
        arcs = wv.arc_spectra_from_frames(frames, truth.trace, 3.0)
        out[name] = (arcs, truth, wv.solve_wavelength(arcs, name, truth.dead))
    return out


def pixel_errors(wave: np.ndarray, truth) -> np.ndarray:
    """(fit - truth) / dispersion in px for the live fibers at every column."""
    return ((wave - truth.wavelength) / truth.dispersion)[~truth.dead]


@pytest.mark.parametrize("name", CHANNELS)
def test_accuracy_against_truth(arc_inputs, name):
    _, truth, sol = arc_inputs[name]
    err = pixel_errors(sol.wave, truth)
    assert sol.wave.shape == truth.wavelength.shape
    assert np.sqrt(np.mean(err**2)) <= 0.03
    assert np.abs(err).max() <= 0.15
    # the reported per-fiber RMS describes the line residuals of every live fiber
    live = ~truth.dead
    assert np.all(np.isfinite(sol.rms_pix[live])) and np.nanmedian(sol.rms_pix) < 0.05
    assert np.allclose(sol.rms_angstrom[live] / sol.rms_pix[live],
                       np.median(truth.dispersion), rtol=0.1)
    assert (sol.lines.status == "used").sum() >= 8


@pytest.mark.parametrize("name", CHANNELS)
def test_model_is_consistent(arc_inputs, name):
    sol = arc_inputs[name][2]
    assert np.all(np.diff(sol.wave, axis=1) > 0)
    # column(wave) inverts the stored wavelengths
    for k in (0, 139, 279):
        assert np.allclose(sol.column(sol.wave[k], fibers=[k])[0], np.arange(sol.wave.shape[1]),
                           atol=1e-6)
    table = sol.line_table()
    assert table.shape == (len(sol.lines), 4)
    used = sol.lines.status == "used"
    assert np.all(table[used, 2] > 0) and np.all(table[~used, 2] == 0)
    assert np.all(np.isin(table[:, 1], list(wv.LAMP_CODES.values())))
    assert np.all(np.isnan(table[~used, 3])) and np.all(table[used, 3] < 0.1)


@pytest.mark.parametrize("name", sorted(SATURATED_LINES))
def test_saturated_lines_are_excluded(arc_inputs, name):
    arcs, _, sol = arc_inputs[name]
    lines = sol.lines
    i = int(np.argmin(np.abs(lines.wavelength - SATURATED_LINES[name])))
    assert lines.status[i] == "saturated"
    assert not lines.used[:, i].any()
    # no used centroid has a saturated sample in its fit window
    k, j = np.nonzero(lines.used)
    cols = np.rint(lines.column[k, j]).astype(int)[:, None] + np.arange(-7, 8)
    assert not any(arcs[lines.lamp[jj]][2][kk, cc].any()
                   for kk, jj, cc in zip(k, j, cols, strict=True))


def test_dead_fibers_get_interpolated_solutions(arc_inputs):
    _, truth, sol = arc_inputs["farred"]
    assert truth.dead.sum() == 2
    assert np.array_equal(sol.unmeasured, truth.dead)
    err = ((sol.wave - truth.wavelength) / truth.dispersion)[truth.dead]
    assert np.all(np.isfinite(sol.wave)) and np.abs(err).max() < 0.15


def test_missing_lamp_solves_from_the_others(arc_inputs, caplog):
    arcs, truth, _ = arc_inputs["uv"]
    without_cd = {lp: v for lp, v in arcs.items() if lp != "cd"}
    with caplog.at_level(logging.WARNING, logger="panacea.wavelength"):
        sol = wv.solve_wavelength(without_cd, "uv", truth.dead)
    assert "no arc spectra of lamp(s) cd" in caplog.text
    assert np.all(sol.lines.status[sol.lines.lamp == "cd"] == "lamp missing")
    err = pixel_errors(sol.wave, truth)
    assert np.sqrt(np.mean(err**2)) <= 0.03 and np.abs(err).max() <= 0.15


def test_too_few_lines_raise(arc_inputs):
    arcs, truth, _ = arc_inputs["red"]
    with pytest.raises(ValueError, match="usable arc lines"):  # red lines are nearly all FeAr
        wv.solve_wavelength({lp: v for lp, v in arcs.items() if lp != "fear"}, "red",
                            truth.dead)
    with pytest.raises(wv.WavelengthError, match="no arc spectra"):
        wv.solve_wavelength({"xenon": arcs["fear"]}, "red", truth.dead)
    flux, var, sat = arcs["fear"]
    with pytest.raises(wv.WavelengthError, match="shape"):
        wv.solve_wavelength({"fear": (flux, var[:, :-1], sat)}, "red", truth.dead)


def test_identification_survives_large_shifts(arc_inputs):
    """Whole-frame shifts of tens of pixels and fiber-to-fiber shifts of several pixels."""
    arcs, truth, _ = arc_inputs["orange"]
    nfib, ncol = truth.wavelength.shape
    shift = 25 + np.rint(6 * np.sin(np.pi * np.arange(nfib) / 140.0)).astype(int)
    src = np.clip(np.arange(ncol)[None, :] - shift[:, None], 0, ncol - 1)
    moved = {lp: tuple(np.take_along_axis(a, src, axis=1) for a in v) for lp, v in arcs.items()}
    sol = wv.solve_wavelength(moved, "orange", truth.dead)
    cols = np.arange(ncol)
    wave = np.array([np.interp(cols - shift[k], cols, truth.wavelength[k], left=np.nan)
                     for k in range(nfib)])
    err = (sol.wave - wave) / truth.dispersion
    inside = np.isfinite(err) & (cols[None, :] >= 40)
    assert np.sqrt(np.mean(err[inside] ** 2)) <= 0.03


def test_bad_samples_carry_no_weight(arc_inputs):
    arcs, truth, _ = arc_inputs["red"]
    flux, var, sat = (a.copy() for a in arcs["fear"])
    flux[:, 700:712] = np.nan  # across a line
    var[:100, 1000:1010] = 0.0
    sol = wv.solve_wavelength({"fear": (flux, var, sat)}, "red", truth.dead)
    err = pixel_errors(sol.wave, truth)
    assert np.sqrt(np.mean(err**2)) <= 0.03 and np.abs(err).max() <= 0.15


# --------------------------------------------------------------------------- synthetic


def test_line_fit_recovers_centroids():
    """Pixel-integrated Gaussians with noise and a close neighbour (deblended)."""
    rng = np.random.default_rng(3)
    nfib, ncol = 40, 200
    cols = np.arange(ncol)
    true = np.stack([60.3 + 0.1 * np.arange(nfib), 70.0 + 0.05 * np.arange(nfib)], axis=1)
    model = np.zeros((nfib, ncol))
    for j, flux in enumerate((2e5, 8e4)):
        edges = np.concatenate([cols, [ncol]]) - 0.5
        g, _, _ = wv._pixel_gauss(edges[None, :], true[:, j : j + 1], np.full((nfib, 1), 1.9))
        model += flux * g
    var = model + 25.0
    data = model + rng.normal(0, np.sqrt(var))
    fits = wv._fit_lines(data[None], var[None], np.zeros((1, nfib, ncol), bool),
                         np.array([0, 0]), np.rint(true) + 1.0, np.ones((nfib, 2), bool))
    assert fits.ok.all()
    pull = (fits.mu - true) / fits.mu_err
    assert np.abs(np.mean(fits.mu - true)) < 0.005
    assert 0.6 < np.std(pull) < 1.5
    assert np.allclose(fits.sigma, 1.9, atol=0.05)


def test_fiber_shifts_are_measured():
    rng = np.random.default_rng(5)
    nfib, ncol = 30, 600
    cols = np.arange(ncol)
    centres = rng.uniform(20, ncol - 20, 25)
    shifts = rng.uniform(-8, 8, nfib)
    spec = np.zeros((1, nfib, ncol))
    for c, f in zip(centres, rng.uniform(1e3, 1e5, centres.size), strict=True):
        spec[0] += f * np.exp(-0.5 * ((cols[None, :] - c - shifts[:, None]) / 1.8) ** 2)
    spec += rng.normal(0, 5.0, spec.shape)
    live = np.ones(nfib, bool)
    live[7] = False
    got = wv._fiber_shifts(spec, live)
    want = shifts - np.median(shifts[live])
    assert np.abs(got - want)[live].max() < 0.15
