"""The sky-line fit's numerics: the whole-array NaN-aware median and the Gaussian fit with
the analytic Jacobian, against numpy and against the least-squares optimum they replace."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy.optimize import curve_fit

from panacea import skywave
from panacea.medians import nanmedian


@pytest.mark.parametrize("axis", [0, 1])
def test_nanmedian_matches_numpy(axis):
    rng = np.random.default_rng(3)
    a = rng.normal(100.0, 5.0, (280, 64))
    a[rng.random(a.shape) < 0.1] = np.nan
    a[7] = np.nan  # a dead fiber (all NaN)
    a[:, 5] = np.nan
    a[11, :63] = np.nan  # one finite value left
    a[12, :62] = np.nan  # two left: the mean of both
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want = np.nanmedian(a, axis=axis)
    got = nanmedian(a, axis)
    np.testing.assert_array_equal(got, want)  # bit for bit, NaN where no value
    clean = np.nan_to_num(a)
    np.testing.assert_array_equal(nanmedian(clean, axis), np.median(clean, axis=axis))


def _stack(rng, mu, amp=1.0, sig=1.83, base=0.02, nfib=60, noise=0.03):
    """A stack like :func:`panacea.skywave._stack`'s: fibers at random sub-pixel phases."""
    x = (np.arange(-9, 10)[None, :] - rng.uniform(-0.5, 0.5, (nfib, 1))).ravel()
    w = rng.uniform(0.5, 2.0, x.size) / noise**2
    y = amp * np.exp(-0.5 * ((x - mu) / sig) ** 2) + base + rng.normal(0, 1, x.size) / np.sqrt(w)
    return x, y, w


def test_fit_line_reaches_the_least_squares_optimum():
    """Centres and errors equal curve_fit's converged to machine tolerance (1e-6 px), and the
    centres scatter about the truth by their stated errors."""
    rng = np.random.default_rng(5)
    pulls = []
    for mu in rng.uniform(-1.5, 1.5, 40):
        x, y, w = _stack(rng, mu)
        fit = skywave._fit_line(x, y, w, 4.3)
        assert fit is not None
        sig0 = 4.3 / 2.3548
        p, cov = curve_fit(skywave._gauss, x, y, p0=(0.2, 0.0, sig0, 0.0),
                           sigma=1 / np.sqrt(w), xtol=1e-14, ftol=1e-14, maxfev=20000)
        assert fit[0] == pytest.approx(p[1], abs=1e-6)
        assert fit[1] == pytest.approx(np.sqrt(cov[1, 1]), rel=1e-4)
        pulls.append((fit[0] - mu) / fit[1])
    assert 0.6 < np.std(pulls) < 1.5
    assert abs(np.mean(pulls)) < 0.6


def test_fit_line_rejects_what_it_cannot_fit():
    rng = np.random.default_rng(8)
    x, y, w = _stack(rng, 0.3)
    assert skywave._fit_line(x[:4], y[:4], w[:4], 4.3) is None  # fewer points than parameters
    y_nan = y.copy()
    y_nan[3] = np.nan
    assert skywave._fit_line(x, y_nan, w, 4.3) is None
    flat = np.full_like(y, 0.02) + rng.normal(0, 0.03, y.size)
    fit = skywave._fit_line(x, flat, w, 4.3)
    assert fit is None or fit[2] < skywave.MIN_LINE_SNR  # no line: never counted
