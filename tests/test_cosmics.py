"""Cosmic-ray detection against the simulator's truth and on synthetic frames."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest

from panacea.archive import Archive
from panacea.ccd import read_channel
from panacea.cosmics import detect_cosmics, dispersion_median, sharpness_limits
from panacea.simulate.truth import load_exposure

#: (obsid, exp, channel) of the sim_night frames checked: science and both standards.
FRAMES = [(12, 1, "uv"), (12, 1, "farred"), (7, 1, "orange"), (8, 1, "red")]


def _charge_estimate(image: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Approximate cosmic-ray charge (e-) of the truth's pixels (0 elsewhere): the image
    minus the median of the same row's pixels within +-3 columns that the truth leaves
    clean."""
    r, c = np.nonzero(truth)
    cols = np.clip(c[:, None] + np.arange(-3, 4)[None, :], 0, image.shape[1] - 1)
    near = np.where(truth[r[:, None], cols], np.nan, image[r[:, None], cols])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN windows
        model = np.nanmedian(near, axis=1)
    charge = np.zeros(image.shape)
    charge[r, c] = image[r, c] - np.where(np.isfinite(model), model, 0.0)
    return charge


@pytest.fixture(scope="module")
def sim_frames(sim_night):
    """Frame, truth mask and fiber source spectra of each of :data:`FRAMES`."""
    night = Archive(sim_night.baseraw).night(sim_night.date)
    out = {}
    for obsid, exp, channel in FRAMES:
        expo = next(e for e in night.exposures(channel=channel)
                    if e.obsid == obsid and e.exp == exp)
        frame = read_channel(night, expo, channel)
        parts = load_exposure(sim_night.baseraw, sim_night.date, obsid, exp, channel)
        out[obsid, exp, channel] = frame, parts
    return out


@pytest.mark.parametrize("key", FRAMES, ids=lambda k: f"{k[0]}-{k[2]}")
def test_fiber_method_against_truth(sim_night, sim_frames, key):
    frame, parts = sim_frames[key]
    truth = parts["cosmic"].astype(bool)
    crmask = detect_cosmics(frame.image, frame.variance, frame.mask)
    # cosmic-ray charge of a track's pixels well above the pixel noise
    noise = np.sqrt(frame.variance)
    strong = truth & (_charge_estimate(frame.image, truth) > 5 * noise)
    assert strong.sum() > 50
    detected = crmask[strong].mean()
    false = crmask[~truth].mean()
    assert detected >= 0.97, f"{key}: only {100 * detected:.2f} % of >5-sigma CR pixels"
    assert false < 0.002, f"{key}: {100 * false:.4f} % of clean pixels flagged"
    assert crmask[truth].mean() >= 0.95

    ch = sim_night.truth(key[2])
    shift = next(e["trace_shift"] for e in sim_night.night_truth()["exposures"]
                 if (e["obsid"], e["exp"]) == key[:2])
    rows = np.arange(frame.shape[0])[:, None]
    source = parts.get("source")
    if source is not None and source.sum() > 0:
        # the brightest star fibers keep every pixel that no cosmic ray touched
        for k in np.argsort(source.sum(axis=1))[-3:]:
            core = np.abs(rows - (ch.trace[k] + shift)[None, :]) < 3.5
            assert crmask[core & ~truth].mean() < 1e-3
    sky = np.median(parts["sky"], axis=0)
    lines = sky > 3 * dispersion_median(sky[None, :], 25)[0] + 20
    if lines.any():
        assert crmask[:, lines][~truth[:, lines]].mean() < 1e-3


def test_lacosmic_method_on_science(sim_frames):
    frame, parts = sim_frames[12, 1, "uv"]
    truth = parts["cosmic"].astype(bool)
    rows = slice(0, 700)  # a third of the frame keeps the test quick
    truth = truth[rows]
    crmask = detect_cosmics(frame.image[rows], frame.variance[rows], frame.mask[rows],
                            method="lacosmic")
    assert crmask[truth].mean() >= 0.95
    assert crmask[~truth].mean() < 0.002


def _synthetic(seed: int = 3):
    """A 200 x 300 frame of Gaussian fibers with a bright star fiber, a bright emission line
    and known cosmic-ray tracks: image (e-), variance, truth mask and the CR charge."""
    rng = np.random.default_rng(seed)
    nrow, ncol = 200, 300
    rows = np.arange(nrow)[:, None].astype(float)
    cols = np.arange(ncol)[None, :].astype(float)
    image = np.zeros((nrow, ncol))
    line = 2000.0 * np.exp(-0.5 * ((cols - 150.0) / (4.3 / 2.3548)) ** 2)
    for k, y0 in enumerate(np.arange(10.0, 195.0, 6.7)):
        flux = 40.0 + line + (1.2e4 if k == 14 else 0.0)  # fiber 14: a bright star
        y = y0 + 0.002 * (cols - 150.0)
        image += flux * np.exp(-0.5 * ((rows - y) / 1.2) ** 2) / (np.sqrt(2 * np.pi) * 1.2)
    expected = image.copy()
    image = rng.poisson(image).astype(float) + rng.normal(0.0, 3.0, image.shape)
    charge = np.zeros_like(image)
    for y, x, dy, dx, n in [(20, 30, 0, 1, 6), (50, 80, 1, 0, 5), (100, 200, 1, 1, 4),
                            (104, 60, 0, 1, 3), (105, 152, 0, 0, 1), (150, 250, 1, -1, 5),
                            (int(10 + 14 * 6.7), 100, 0, 0, 1),
                            (99, 40, 1, 0, 9)]:  # along the columns, through the star
        for i in range(n):
            charge[y + i * dy, x + i * dx] = rng.uniform(600.0, 1500.0)
    image += charge
    variance = 9.0 + np.maximum(image, 0.0)
    return image, variance, charge > 0, expected


def test_synthetic_tracks_star_and_line():
    image, variance, truth, _ = _synthetic()
    crmask = detect_cosmics(image, variance)
    assert crmask[truth].all()
    assert not crmask[~truth].any()
    # a saturated or bad pixel in the mask is never flagged
    mask = np.zeros(image.shape, np.uint8)
    mask[truth] = 1
    assert not detect_cosmics(image, variance, mask).any()


def test_sharpness_limits_are_physical():
    vert, horiz, diag = sharpness_limits()
    assert 0.55 < vert < 0.7 < horiz < 0.9
    assert diag < vert


def test_bad_arguments():
    image = np.zeros((20, 30))
    with pytest.raises(ValueError):
        detect_cosmics(image, image, method="median")
    with pytest.raises(ValueError):
        detect_cosmics(image, np.zeros((20, 31)))
    with pytest.raises(ValueError):
        detect_cosmics(image, image + 9, sigma_clip=3)


def test_dispersion_median_of_nine_is_the_exact_running_median():
    """The median-of-9 network (the default width) equals a direct running median with
    repeated edge pixels, on every ordering of nine values and on values with ties."""
    perms = np.array(list(itertools.permutations(range(9))), np.float32)
    assert np.all(dispersion_median(perms, 4)[:, 4] == 4.0)
    rng = np.random.default_rng(3)
    image = (rng.integers(0, 5, (40, 97)) * rng.normal(1, 0.1, (40, 1))).astype(np.float32)
    padded = np.pad(image, ((0, 0), (4, 4)), mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, 9, axis=1)
    direct = np.median(windows, axis=2)
    np.testing.assert_array_equal(dispersion_median(image, 4), direct)
    np.testing.assert_array_equal(dispersion_median(image, 3), np.median(
        np.lib.stride_tricks.sliding_window_view(np.pad(image, ((0, 0), (3, 3)), mode="edge"),
                                                 7, axis=1), axis=2))
