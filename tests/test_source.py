"""Source detection, Moffat PSF, refraction and PSF extraction on synthetic IFU data."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from panacea import instrument
from panacea.refraction import Weather, header_weather, refraction_track
from panacea.simulate.spectra import refraction_offsets
from panacea.source import (
    EXTENDED_BETA,
    analyse,
    detect,
    fit_psf,
    moffat_fractions,
    moffat_gradient,
    psf_extract,
)

XY = instrument.fiber_positions()


def test_moffat_fractions_sum_to_the_light_on_the_ifu():
    centre = moffat_fractions(XY, 0.0, 0.0, 1.5)
    assert 0.97 < centre.sum() < 1.0  # a little light falls outside the 12" x 7" IFU
    corner = moffat_fractions(XY, -6.0, -3.4, 1.5)
    assert corner.sum() < 0.5
    many = moffat_fractions(XY, np.array([0.0, 1.0]), np.array([0.0, 0.5]), np.array([1.5, 2]))
    assert many.shape == (280, 2)
    np.testing.assert_allclose(many[:, 0], centre)


@pytest.mark.parametrize("beta", [3.5, 4.185, np.inf])
def test_moffat_gradient_matches_the_fractions_and_their_differences(beta):
    """Column 0 is :func:`moffat_fractions`; columns 1-5 the derivatives in x0, y0, fwhm,
    ratio and angle, against central differences of column 0 (an elliptical, rotated
    profile off centre, Moffat with a half-integer and another wing index, Gaussian)."""
    par = np.array([0.7, -0.4, 1.6, 0.8, 0.5])
    grad = moffat_gradient(XY, *par, beta=beta)
    np.testing.assert_allclose(grad[:, 0], moffat_fractions(XY, *par, beta=beta),
                               rtol=1e-12, atol=1e-15)
    step = 1e-6
    for k in range(5):
        hi, lo = par.copy(), par.copy()
        hi[k] += step
        lo[k] -= step
        diff = (moffat_gradient(XY, *hi, beta=beta)[:, 0]
                - moffat_gradient(XY, *lo, beta=beta)[:, 0]) / (2 * step)
        scale = np.max(np.abs(grad[:, k + 1]))
        assert scale > 0
        np.testing.assert_allclose(grad[:, k + 1], diff, rtol=0, atol=1e-7 * scale)


def test_psf_fit_recovers_position_fwhm_and_shape():
    rng = np.random.default_rng(3)
    truth = moffat_fractions(XY, 0.83, -0.41, 1.62, ratio=0.93, angle=0.0) * 5e4 + 20.0
    err = np.sqrt(truth + 25.0)
    data = truth + rng.normal(0, err)
    psf = fit_psf(data, err, XY, (0.6, -0.3, 1.3))
    assert psf.x == pytest.approx(0.83, abs=0.02)
    assert psf.y == pytest.approx(-0.41, abs=0.02)
    assert psf.fwhm == pytest.approx(1.62, rel=0.03)
    assert psf.ratio == pytest.approx(0.93, abs=0.04)
    assert psf.amplitude == pytest.approx(5e4, rel=0.02)


def _ifu_cube(flux, x, y, fwhm, grid, noise=1.0, seed=0):
    frac = moffat_fractions(XY, x, y, fwhm)
    model = frac * flux[None, :]
    err = np.full(model.shape, noise)
    data = model + np.random.default_rng(seed).normal(0, noise, model.shape)
    return data, err


def test_detection_needs_a_significant_source():
    grid = np.linspace(4635, 6950, 2064)
    sky = np.ones((280, grid.size))
    noise = np.random.default_rng(1).normal(0, 1, (280, grid.size))
    assert detect(noise, np.ones_like(noise), sky, grid, XY) is None
    data, err = _ifu_cube(np.full(grid.size, 20.0), np.full(grid.size, -2.0),
                          np.full(grid.size, 1.0), np.full(grid.size, 1.5), grid)
    det = detect(data, err, sky, grid, XY)
    assert det is not None and det.significance > 10
    assert np.hypot(det.x + 2.0, det.y - 1.0) < 0.6  # the nearest lenslet


def test_analyse_measures_the_refraction_track_and_extracts_the_flux():
    ch = instrument.get_channel("uv")
    grid = ch.grid
    weather = Weather(8.0, 793.0, 40.0)
    dx, dy = refraction_offsets(grid, 4100.0, 63.0, 8.0, 793.0, 40.0)  # simulator's model
    flux = 400.0 * (grid / 4000.0) ** -1
    fwhm = 1.4 * (grid / 4100.0) ** -0.2
    data, err = _ifu_cube(flux, 0.7 + dx, -0.5 + dy, fwhm, grid, noise=0.5)
    sky = np.ones_like(data)
    src = analyse(data, err, sky, err, grid, XY, 63.0, weather, fwhm_guess=1.3)
    assert src is not None and src.track_used == "measured"
    px, py = src.x - (0.7 + dx), src.y - (-0.5 + dy)
    assert np.max(np.hypot(px, py)) < 0.03
    # model track (ERFA) against the simulator's Edlen model
    mdx, mdy = refraction_track(grid, src.ref_wave, 63.0, weather)
    sdx, sdy = refraction_offsets(grid, src.ref_wave, 63.0, 8.0, 793.0, 40.0)
    assert np.max(np.hypot(mdx - sdx, mdy - sdy)) < 0.02
    assert np.ptp(np.hypot(mdx, mdy)) > 0.4  # ~0.5" across uv
    assert np.median(src.fwhm / fwhm) == pytest.approx(1.0, abs=0.03)
    ratio = src.spectrum / flux
    assert np.median(ratio) == pytest.approx(1.0, abs=0.005)
    pull = (src.spectrum - flux) / src.error
    assert 0.85 < np.std(pull) < 1.15


def test_psf_extraction_error_is_the_inverse_weight():
    w = np.array([[0.5], [0.3], [0.0]])
    d = np.array([[50.0], [30.0], [99.0]])
    e = np.array([[1.0], [1.0], [0.0]])
    f, err = psf_extract(d, e, w)
    assert f[0] == pytest.approx(100.0)
    assert err[0] == pytest.approx(1 / np.sqrt(0.25 + 0.09))


def test_header_weather_defaults_are_noted():
    h = fits.Header({"AMBTEMP": 4.5, "BAROMPRE": 801.0})
    w = header_weather(h)
    assert (w.temperature, w.pressure, w.humidity) == (4.5, 801.0, 30.0)
    assert len(w.notes) == 1 and "humidity" in w.notes[0]


def test_sky_line_mask_ignores_dead_fibers():
    from panacea.source import sky_line_mask

    grid = np.arange(600)
    sky = np.full((280, 600), 50.0)
    sky[:, 300:303] += 100.0  # a sky line
    sky[:, :5] = 0.0  # uncovered ends of every fiber
    mask = sky_line_mask(sky)
    assert np.array_equal(np.flatnonzero(mask), grid[300:303])
    sky[[17, 200]] = 0.0  # dead fibers hold no sky at all
    assert np.array_equal(sky_line_mask(sky), mask)


def _simulated_cube(psf_model: str, beta: float, seeing: float, x0: float, y0: float,
                    noise: float, seed: int = 0, ellipticity: float = 0.0, angle: float = 0.0):
    """Sky-subtracted fiber spectra of a point source drawn with the simulator's own PSF
    (its ``moffat_fractions``: Gaussian or Moffat, refraction, FWHM ~ lambda^-0.2) on the
    orange grid, with Gaussian noise; returns (data, err, grid, flux, true FWHM(grid))."""
    from panacea.simulate import night as simnight

    ch = instrument.get_channel("orange")
    grid = ch.grid
    plan = simnight.ExposurePlan(12, 1, "sci", "t", 900.0, "2018-11-08T03:00:00", "science",
                                 source_xy=(x0, y0), seeing=seeing, parangle=40.0,
                                 temperature=8.0, pressure=793.0, humidity=40.0,
                                 psf_model=psf_model, psf_beta=beta, ellipticity=ellipticity,
                                 psf_angle=angle)
    wk = np.linspace(grid[0], grid[-1], 24)
    frac = simnight.moffat_fractions(plan, wk, simnight.dar_offsets(plan, wk))
    frac = np.stack([np.interp(grid, wk, f) for f in frac])
    flux = 300.0 * (grid / 5000.0) ** -1
    data = frac * flux + np.random.default_rng(seed).normal(0, noise, frac.shape)
    return data, np.full(frac.shape, noise), grid, flux, seeing * (grid / 5000.0) ** -0.2


@pytest.mark.parametrize("psf_model,beta,seeing,x0,y0", [
    ("gauss", 3.5, 2.0, 6.49 - 0.59, 0.5),  # Gaussian, one fiber inside the long edge
    ("moffat", 2.5, 1.2, -1.0, -(3.835 - 0.9)),  # broad wings near the short edge
])
def test_psf_shape_is_chosen_by_the_data(monkeypatch, psf_model, beta, seeing, x0, y0):
    """A source near the IFU edge: flux within 3 % and seeing within 8 % with the PSF the
    data choose; the fixed beta = 3.5 Moffat of before misses the flux by more than 4 %."""
    import panacea.source as source

    data, err, grid, flux, fwhm = _simulated_cube(psf_model, beta, seeing, x0, y0, noise=1.0)
    weather = Weather(8.0, 793.0, 40.0)
    src = analyse(data, err, np.ones_like(data), err, grid, XY, 40.0, weather)
    assert src.psf_model == psf_model
    assert np.isfinite(src.beta) == (psf_model == "moffat")
    if psf_model == "moffat":
        assert src.beta == pytest.approx(beta, abs=0.5)
    assert np.median(src.spectrum / flux) == pytest.approx(1.0, abs=0.03)
    assert np.median(src.fwhm / fwhm) == pytest.approx(1.0, abs=0.08)
    assert 0.05 < src.choice.outside < 0.6  # much of the light falls off the IFU
    assert np.all(src.error >= 0) and src.choice.outside_err >= 0
    monkeypatch.setattr(source, "BETA_CHOICES", (3.5,))
    fixed = analyse(data, err, np.ones_like(data), err, grid, XY, 40.0, weather)
    assert fixed.beta == 3.5
    assert abs(np.median(fixed.spectrum / flux) - 1) > 0.04


def test_outside_light_uncertainty_enters_the_flux_error():
    """Faint source on the edge: the spread of the light outside the IFU over the profiles
    the chi2 allows is part of the flux error."""
    data, err, grid, _, _ = _simulated_cube("moffat", 3.0, 1.8, 6.49 - 0.59, 0.5,
                                               noise=12.0, seed=3)
    weather = Weather(8.0, 793.0, 40.0)
    src = analyse(data, err, np.ones_like(data), err, grid, XY, 40.0, weather)
    assert src.choice.outside_err > 0.002
    rel = src.choice.outside_err / (1 - src.choice.outside)
    stat = psf_extract(data, err, src.weights)[1]
    np.testing.assert_allclose(src.error, np.hypot(stat, np.abs(src.spectrum) * rel),
                               rtol=1e-6)


def _disk_cube(grid: np.ndarray, x0: float, y0: float, scale: float, ratio: float,
               noise: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An exponential disk (scale length ``scale``", axis ratio ``ratio``) of total flux 1 per
    Angstrom times a power law, integrated over each lenslet on a 10 x 10 sub-grid (the
    test's own code, not the pipeline's PSF); returns data, errors and the true light on
    the IFU per Angstrom."""
    n = 10
    sub = ((np.arange(n) + 0.5) / n - 0.5) * instrument.LENSLET_PITCH
    sx, sy = np.meshgrid(sub, sub)
    px = XY[:, 0, None] + sx.ravel()[None, :] - x0
    py = XY[:, 1, None] + sy.ravel()[None, :] - y0
    surface = np.exp(-np.hypot(px, py / ratio) / scale) / (2 * np.pi * scale**2 * ratio)
    frac = surface.mean(axis=1) * instrument.LENSLET_PITCH**2  # light of each lenslet
    flux = 300.0 * (grid / 5000.0) ** -1.5  # total flux per Angstrom
    model = frac[:, None] * flux[None, :]
    rng = np.random.default_rng(seed)
    err = np.full(model.shape, noise)
    return model + rng.normal(0, noise, model.shape), err, frac.sum() * flux


def test_extended_source_is_not_extrapolated_and_agrees_across_channels():
    """A source wider than any seeing: every channel uses the same wing index, the spectrum
    is the model's light on the IFU (nothing extrapolated outside it), the same fraction of
    the true light in uv and red, and the model's outside light enters the flux error."""
    weather = Weather(8.0, 793.0, 40.0)
    ratios = []
    for name, seed in (("uv", 4), ("red", 5)):
        grid = instrument.get_channel(name).grid
        data, err, on_ifu = _disk_cube(grid, -1.8, 0.9, 1.8, 0.7, noise=0.5, seed=seed)
        sky = np.ones_like(data)
        src = analyse(data, err, sky, err, grid, XY, 0.0, weather)
        assert src is not None and src.extended, src.psf
        assert src.beta == EXTENDED_BETA and src.extrapolated == 0.0
        assert 0.05 < src.outside < 0.5  # the model's guess of the light outside
        inner = slice(100, -100)
        ratio = float(np.median(src.spectrum[inner] / on_ifu[inner]))
        ratios.append(ratio)
        rel = np.median(src.error[inner] / np.abs(src.spectrum[inner]))
        assert rel >= src.outside / (1 - src.outside) * 0.99
    # the Moffat's weights against an exponential profile: 5.5 % low on this source, the
    # same in both channels (extrapolated, as before, the spectra were 17 % above the light
    # on the IFU)
    assert 0.93 < ratios[0] < 1.0
    assert ratios[1] == pytest.approx(ratios[0], rel=0.01)


@pytest.mark.parametrize("fwhm", [1.6, 2.7])  # typical, and the worst seeing (uv, 2.5" at 5000 A)
def test_point_source_is_extrapolated_outside_the_ifu(fwhm):
    grid = instrument.get_channel("orange").grid
    flux = np.full(grid.size, 200.0)
    data, err = _ifu_cube(flux, np.full(grid.size, 1.0), np.full(grid.size, 0.3),
                          np.full(grid.size, fwhm), grid, noise=0.5)
    src = analyse(data, err, np.ones_like(data), err, grid, XY, 0.0, Weather(8.0, 793.0, 40.0))
    assert src is not None and src.extended == ""
    assert src.extrapolated == pytest.approx(src.outside) and src.outside > 0.0
    assert np.median(src.spectrum) == pytest.approx(200.0, rel=0.01)  # the total flux
