"""Tests of raw frame reading (panacea.ccd)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from scipy.signal import find_peaks

from panacea import instrument
from panacea.archive import NightIndex
from panacea.ccd import (
    Frame,
    Mask,
    amp_binning,
    amp_sections,
    detector_value,
    read_amp,
    read_channel,
    read_channel_image,
)
from panacea.errors import FrameError

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "samples"
SAMPLE = SAMPLES / "lrs20000004.tar.gz"


@pytest.fixture(scope="module")
def sci(good_archives, fakeraw):
    """(index, exposure) of the good night's science exposure (full-size amps)."""
    with NightIndex(good_archives["tar"], fakeraw.DATE) as index:
        yield index, index.exposures(ftype="sci")[0]


@pytest.fixture(scope="module")
def bad(bad_archive, fakeraw):
    """(index, exposures by obsid) of the night of problems."""
    with NightIndex(bad_archive, fakeraw.BAD_DATE) as index:
        yield index, {e.obsid: e for e in index.exposures()}


def _oriented_truth(fakeraw, slot, amp, shape=None):
    truth = fakeraw.truth_electrons(slot, amp, shape or fakeraw.SHAPE)
    return instrument.orient(truth, amp, fakeraw.AMPNAME[slot][amp])


def _row_residual(frame, truth):
    """Mean residual (e-) of each row, ignoring the marker and saturated pixels."""
    resid = np.ma.masked_array(frame.image - truth, mask=(truth > truth.min()) | (frame.mask > 0))
    return resid.mean(axis=1).filled(np.nan)


# --------------------------------------------------------------------------- read_amp


@pytest.mark.parametrize("slot", ["056", "066"])
@pytest.mark.parametrize("amp", ["LL", "LU", "RU", "RL"])
def test_overscan_gain_and_variance(sci, fakeraw, slot, amp):
    index, exposure = sci
    frame = read_amp(index, exposure.files[(slot, amp)])
    assert frame.shape == (1032, 2064) and frame.image.dtype == np.float32
    truth = _oriented_truth(fakeraw, slot, amp)
    resid = _row_residual(frame, truth)
    assert np.nanmax(np.abs(resid)) < 0.5  # the per-row pedestal is gone
    level = fakeraw.GAIN[amp] * (fakeraw.LEVEL[amp] + fakeraw.SLOT_LEVEL[slot])
    assert np.median(frame.image) == pytest.approx(level, abs=0.5)  # header gain applied
    good = frame.mask[100:900, 100:1900] == 0
    noise = np.std(frame.image[100:900, 100:1900][good])
    assert noise == pytest.approx(fakeraw.RDNOISE[amp], rel=0.05)
    expected = fakeraw.RDNOISE[amp] ** 2 + np.maximum(frame.image, 0)
    np.testing.assert_allclose(frame.variance, expected, rtol=1e-6)
    assert frame.variance.dtype == np.float32 and frame.mask.dtype == np.uint8


@pytest.mark.parametrize("slot, amp, where", [
    ("056", "LL", (10, 20)),        # as read
    ("056", "RU", (10, 20)),
    ("056", "LU", (1021, 2043)),    # rotated by 180 degrees
    ("056", "RL", (1021, 2043)),
    ("066", "LL", (10, 2043)),      # AMPNAME LR: columns reversed
    ("066", "LU", (1021, 20)),      # rotated, and AMPNAME UL: columns reversed
])
def test_orientation_of_marker_and_saturation(sci, fakeraw, slot, amp, where):
    index, exposure = sci
    frame = read_amp(index, exposure.files[(slot, amp)])
    unsaturated = np.where(frame.mask == 0, frame.image, -np.inf)
    assert np.unravel_index(np.argmax(unsaturated), frame.shape) == where
    flagged = np.argwhere(frame.mask & Mask.SATURATED)
    row, col = fakeraw.SATURATED
    sat = np.zeros((1032, 2064), bool)
    sat[row, col] = True
    sat = instrument.orient(sat, amp, fakeraw.AMPNAME[slot][amp])
    assert [tuple(p) for p in flagged] == [tuple(p) for p in np.argwhere(sat)]


def test_frame_overscan_is_one_level(sci, fakeraw):
    index, exposure = sci
    frame = read_amp(index, exposure.files[("056", "LL")], overscan="frame")
    resid = _row_residual(frame, _oriented_truth(fakeraw, "056", "LL"))
    assert abs(np.nanmean(resid)) < 0.5
    assert np.nanmax(np.abs(resid)) > 10  # the 20-ADU pedestal wave is left in
    with pytest.raises(ValueError, match="overscan mode"):
        read_amp(index, exposure.files[("056", "LL")], overscan="column")


def test_binned_amp_and_missing_gain(bad, fakeraw, caplog):
    index, exposures = bad
    with caplog.at_level(logging.WARNING, logger="panacea.ccd"):
        frame = read_amp(index, exposures[20].files[("056", "LL")])
    assert "GAIN" in caplog.text and "RDNOISE" in caplog.text
    assert "lrs20000020" in caplog.text  # the warning names the file
    assert frame.shape == (1032, 1032)  # 2x1 binning: 32 overscan columns
    truth = instrument.DEFAULT_GAIN * fakeraw.signal_adu("056", "LL", (1032, 1064))
    resid = _row_residual(frame, truth)  # half the overscan columns: twice the noise
    assert abs(np.nanmean(resid)) < 0.1 and np.nanmax(np.abs(resid)) < 1.0
    np.testing.assert_allclose(frame.variance - np.maximum(frame.image, 0),
                               instrument.DEFAULT_RDNOISE**2, rtol=1e-5)


@pytest.mark.parametrize("obsid, match", [
    (21, r"lrs20000021\.tar:lrs20000021/exp01/lrs2/.*_056LL_sci\.fits: unexpected amp shape"),
    (24, r"lrs20000024\.tar:.*_056LL_sci\.fits: unreadable FITS"),
    (25, r"lrs20000025\.tar:.*_056LL_sci\.fits: the image is constant"),
])
def test_bad_amp_files_raise_frame_error(bad, obsid, match):
    index, exposures = bad
    with pytest.raises(FrameError, match=match):
        read_amp(index, exposures[obsid].files[("056", "LL")])


def test_header_sections():
    shape = (1032, 2128)
    assert amp_sections(fits.Header(), shape) == (slice(0, 2064), slice(2064, 2128))
    prescan = fits.Header({"TRIMSEC": "[65:2128,1:1032]", "BIASSEC": "[1:64,1:1032]"})
    assert amp_sections(prescan, shape) == (slice(64, 2128), slice(0, 64))
    assert amp_sections(fits.Header(), (1032, 1064)) == (slice(0, 1032), slice(1032, 1064))


@pytest.mark.parametrize("cards", [
    {"TRIMSEC": "[1:2100,1:1032]", "BIASSEC": "[2065:2128,1:1032]"},   # overlaps the overscan
    {"TRIMSEC": "[1:2064,1:1032]", "BIASSEC": "[2065:2200,1:1032]"},   # outside the array
    {"TRIMSEC": "garbage", "BIASSEC": "[2065:2128,1:1032]"},
    {"TRIMSEC": "[1:2064,1:1032]"},
])
def test_insane_header_sections_fall_back_to_the_rule(cards, caplog):
    with caplog.at_level(logging.WARNING, logger="panacea.ccd"):
        assert amp_sections(fits.Header(cards), (1032, 2128), "f.fits") == (
            slice(0, 2064), slice(2064, 2128))
    assert "f.fits" in caplog.text


def test_amp_binning():
    assert amp_binning((1032, 2128)) == (1, 1)
    assert amp_binning((1032, 1064)) == (1, 2)
    assert amp_binning((516, 1064)) == (2, 2)
    for shape in [(1032, 2064), (1000, 2128), (1032, 532)]:
        with pytest.raises(FrameError, match="x.fits: unexpected amp shape"):
            amp_binning(shape, "x.fits")


def test_detector_value(caplog):
    header = fits.Header({"GAIN": -1.0, "RDNOISE": 2.5})
    with caplog.at_level(logging.WARNING, logger="panacea.ccd"):
        assert detector_value(header, "GAIN", 0.85, "a.fits") == 0.85
        assert detector_value(header, "RDNOISE", 3.0, "a.fits") == 2.5
    assert "GAIN=-1.0" in caplog.text and "a.fits" in caplog.text
    assert "RDNOISE" not in caplog.text


def test_frame_checks_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        Frame(np.zeros((2, 2)), np.zeros((2, 3)), np.zeros((2, 2)), fits.Header())


# --------------------------------------------------------------------------- read_channel


def test_read_channel_stitching_order(sci, fakeraw):
    index, exposure = sci
    for name in ("uv", "orange", "red", "farred"):
        channel = instrument.get_channel(name)
        frame = read_channel(index, exposure, name)
        assert frame.shape == (2064, 2064)
        first = read_amp(index, exposure.files[(channel.ifuslot, channel.amps[0])])
        second = read_amp(index, exposure.files[(channel.ifuslot, channel.amps[1])])
        assert np.array_equal(frame.image[:1032], first.image)
        assert np.array_equal(frame.image[1032:], second.image)
        assert np.array_equal(frame.variance[1032:], second.variance)
        assert np.array_equal(frame.mask[:1032], first.mask)
        assert frame.header["AMPNAME"] == fakeraw.AMPNAME[channel.ifuslot][channel.amps[0]]
        assert name in frame.source


def test_read_channel_image_is_the_frame_image(sci, bad):
    """The image-only read (biases) gives exactly read_channel's image, into ``out`` when it
    fits, and the same errors."""
    index, exposure = sci
    for name in ("uv", "red"):
        frame = read_channel(index, exposure, name)
        image = read_channel_image(index, exposure, name)
        assert image.dtype == np.float32 and np.array_equal(image, frame.image)
        out = np.full((2, *frame.shape), np.nan, np.float32)
        plane = out[1]
        assert read_channel_image(index, exposure, name, out=plane) is plane
        assert np.array_equal(out[1], frame.image) and np.all(np.isnan(out[0]))
        frame = read_channel(index, exposure, name, overscan="frame")
        assert np.array_equal(read_channel_image(index, exposure, name, overscan="frame"),
                              frame.image)
    with pytest.raises(FrameError, match="amplifier 056LU"):
        read_channel_image(bad[0], bad[1][20], "uv")


def test_read_channel_bad_pixel_mask(sci):
    index, exposure = sci
    bpm = np.zeros((2064, 2064), bool)
    bpm[:, 700] = True
    frame = read_channel(index, exposure, "uv", bad_pixel_mask=bpm)
    assert np.all(frame.mask[:, 700] & Mask.BAD_COLUMN)
    assert not np.any(frame.mask[:, 701] & Mask.BAD_COLUMN)
    with pytest.raises(ValueError, match="bad-pixel mask shape"):
        read_channel(index, exposure, "uv", bad_pixel_mask=bpm[:1032])


def test_read_channel_missing_amp(bad):
    index, exposures = bad
    with pytest.raises(FrameError, match="20181109 lrs20000020 exp01: amplifier 056LU"):
        read_channel(index, exposures[20], "uv")
    assert read_channel(index, exposures[20], "orange").shape == (2064, 1032)


# --------------------------------------------------------------------------- independent sample


@pytest.fixture(scope="module")
def sample_night(tmp_path_factory):
    if not SAMPLE.is_file():
        pytest.skip(f"independent sample {SAMPLE} not found (expects shared/ beside the repo)")
    folder = tmp_path_factory.mktemp("raw_sample") / "20181201" / "lrs2"
    folder.mkdir(parents=True)
    try:
        (folder / SAMPLE.name).symlink_to(SAMPLE)
    except OSError:
        shutil.copy(SAMPLE, folder / SAMPLE.name)
    with NightIndex(folder.parents[1], "20181201") as index:
        yield index


def _brightest_peaks(frame, n):
    """Columns and heights of the ``n`` brightest lines in the central fibers (rows 400-600)."""
    spectrum = np.median(frame.image[400:600], axis=0)
    cols, props = find_peaks(spectrum, prominence=50 * np.median(np.abs(spectrum)) + 10)
    order = np.argsort(props["prominences"])[::-1][:n]
    return cols[order], spectrum[cols[order]]


def test_sample_uv_hg_lines(sample_night):
    (exposure,) = sample_night.exposures()
    assert (exposure.obsid, exposure.ftype, exposure.object.lower()) == (4, "cmp", "hg_b")
    frame = read_channel(sample_night, exposure, "uv")
    assert frame.shape == (2064, 2064)
    (c4358, c4046), (f4358, f4046) = _brightest_peaks(frame, 2)
    assert abs(c4358 - 1453) <= 15 and abs(c4046 - 830) <= 15
    assert c4046 < c4358 and f4358 > f4046  # wavelength increases to the right


def test_sample_uv_fibers_are_rows(sample_night):
    (exposure,) = sample_night.exposures()
    frame = read_channel(sample_night, exposure, "uv")
    col = 1453
    profile = np.array([frame.image[r, col - 25 : col + 25].max() for r in range(2064)])
    rows, _ = find_peaks(profile, height=0.05 * profile.max(), distance=4)
    assert abs(rows[0] - 45.6) < 3  # first fiber of the uv LL amp
    pitch = np.median(np.diff(rows))
    assert 6.2 <= pitch <= 7.2
    assert 260 <= len(rows) <= 280


def test_sample_orange_hg_line(sample_night):
    (exposure,) = sample_night.exposures()
    frame = read_channel(sample_night, exposure, "orange")
    (col,), _ = _brightest_peaks(frame, 1)
    assert abs(col - 764) <= 15
