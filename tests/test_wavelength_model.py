"""The wavelength model chosen by the data (cross-validation) and the randomized simulator's
wavelength nuisances."""

from __future__ import annotations

import numpy as np
import pytest

from panacea import wavelength as wv
from panacea.simulate import nuisance


def test_cross_validation_finds_the_degree():
    """Centroids of 20 lines in 280 fibers from a degree-5 column model with 0.01 px noise:
    the held-out score rejects degrees that cannot follow it and does not run to the cap."""
    rng = np.random.default_rng(5)
    nfib, x = 280, np.sort(rng.uniform(-0.95, 0.95, 20))
    y = np.linspace(-1, 1, nfib)
    true = np.zeros((5, 5))
    true[:, 0] = [1000.0, 15.0, 6.0, -3.0, 1.5]
    true[0, 1] = 2.0
    col = wv._design(x, y, 5, 4) @ true.ravel() + rng.normal(0, 0.5, nfib)[:, None]
    err = np.full(col.shape, 0.01)
    col = col + rng.normal(0, 0.01, col.shape)
    choice = wv._choose_model(col, err, np.ones(col.shape, bool), x, y, 9, 4.0)
    assert choice["method"] == "cv"
    assert 5 <= choice["deg_x"] <= 6
    assert choice["cv_rms"] < 0.01
    assert choice["scores"][(4, 4)] > 10 * choice["cv_rms"]


def test_default_night_draws_nothing():
    assert nuisance.draw(1, "20181108", False) == nuisance.Nuisances()
    assert nuisance.flexure(nuisance.Nuisances(), 1, "20181108", 12, 1, "red") == (0.0, 0.0)


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_draws_within_documented_ranges(seed):
    n = nuisance.draw(seed, "20181108", True)
    assert 0.05 <= n.ripple_amp <= 0.2 and 150 <= n.ripple_period <= 600
    assert all(abs(c) <= 2 for c in n.lowo_coeffs)
    assert 0.9 <= n.lsf_scale <= 1.1 and abs(n.lsf_asym) <= 0.15
    assert 0 <= n.arc_missing <= 2 and 5 <= n.arc_unlisted <= 20 and 1 <= n.arc_blends <= 3
    assert 0.002 <= n.scatter_frac <= 0.015
    shift, stretch = nuisance.flexure(n, seed, "20181108", 12, 1, "red")
    assert abs(shift) <= 1 and abs(stretch) <= 0.15


@pytest.fixture(scope="module")
def rippled_arcs(red_randomized_night):
    """The arc spectra of the shared red randomized night 1 (conftest: ripples, arcs with
    missing, unlisted and blended lines, an asymmetric line spread), extracted on the true
    traces; the night's AMPNAME convention is read back too."""
    _, truth, frames = red_randomized_night
    return wv.arc_spectra_from_frames(frames, truth.trace, 3.0), truth


def test_model_choice_on_a_rippled_night(rippled_arcs):
    """The fixed degree swings by px between the sparse red lines; the chosen one does not.
    (Neither follows the 367-px ripple: the arcs do not sample it.)"""
    arcs, truth = rippled_arcs
    errs = {}
    for choose in (False, True):
        sol = wv.solve_wavelength(arcs, "red", truth.dead, choose=choose)
        errs[choose] = ((sol.wave - truth.wavelength) / truth.dispersion)[~truth.dead]
    rms = {k: float(np.sqrt(np.mean(v**2))) for k, v in errs.items()}
    worst = {k: float(np.abs(v).max()) for k, v in errs.items()}
    assert worst[False] > 1.0  # the fixed degree-7 model extrapolates wildly
    assert worst[True] < 0.5
    assert rms[True] < 0.7 * rms[False]
    assert rms[True] < 0.16  # measured 0.140; the ripple alone is ~0.12 px RMS
