"""The numba kernels of the calibration give the numbers of the array code they replace, bit
for bit (the calibration bundles of a night must not change with them).

Each reference below is the plain numpy formulation the kernel replaced; the inputs include
NaN, masked pixels, ties and the two-frame cases.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from astropy.io import fits
from memreader import BytesReader

from panacea import ccd, instrument
from panacea.bias import combine_bands
from panacea.combine import combine_frames
from panacea.flat import pixel_map
from panacea.skyshape import CLIP_SIGMA, _clip_stack


def _bits(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view(np.dtype(f"u{a.dtype.itemsize}")) if a.dtype.kind == "f" else a


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(_bits(a), _bits(b))


def _combine_frames_reference(images, variances, masks, levels, nsigma=5.0):
    n = len(images)
    levels = np.asarray(levels, float)
    scaled = np.stack([im / lv for im, lv in zip(images, levels)])
    svar = np.stack([v / lv**2 for v, lv in zip(variances, levels)])
    ok = np.ones(scaled.shape, bool) if masks is None else ~np.stack(masks)
    ref = (scaled.sum(axis=0) - scaled.max(axis=0)) / (n - 1) if n >= 3 else scaled.min(axis=0)
    ok &= (scaled - ref) <= nsigma * np.sqrt(np.maximum(svar, 1e-12))
    nkept = ok.sum(axis=0)
    total = levels.sum()
    mean = np.where(ok, scaled, 0).sum(axis=0) / np.maximum(nkept, 1)
    var = np.where(ok, svar, 0).sum(axis=0) / np.maximum(nkept, 1) ** 2
    return ((mean * total).astype(np.float32), (var * total**2).astype(np.float32),
            nkept == 0)


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("masked", [False, True])
def test_combine_frames_kernel_is_the_array_code(n, masked):
    rng = np.random.default_rng(n + 10 * masked)
    images = (1000 + rng.normal(0, 30, (n, 70, 90))).astype(np.float32)
    images[rng.random(images.shape) < 0.02] += 4000  # cosmic rays
    variances = np.abs(images) + np.float32(9)
    variances[:, 3, :4] = 0  # below the variance floor
    images[0, 5, 5] = np.nan
    variances[n - 1, 6, 6] = np.nan
    masks = [rng.random((70, 90)) < 0.05 for _ in range(n)] if masked else None
    levels = [1000.0 + 7 * i for i in range(n)]
    got = combine_frames(list(images), list(variances), masks, levels=levels, band_rows=16)
    want = _combine_frames_reference(list(images), list(variances), masks, levels)
    assert all(_same(g, w) for g, w in zip(got, want))


def _combine_bands_reference(frames, noise, nsigma=5.0):
    n = frames.shape[0]
    sig = nsigma * noise[None, :, None]
    if n >= 3:
        ref = (frames.sum(axis=0) - frames.max(axis=0)) / (n - 1)
        keep = np.abs(frames - ref) <= sig
    else:
        keep = (frames - frames.min(axis=0)) <= sig * np.sqrt(2)
    count = keep.sum(axis=0)
    mean = np.where(keep, frames, 0).sum(axis=0) / np.maximum(count, 1)
    return mean.astype(np.float32), count.astype(np.int16)


@pytest.mark.parametrize("n", [2, 3, 8])
def test_combine_bands_kernel_is_the_array_code(n):
    rng = np.random.default_rng(n)
    frames = rng.normal(0, 3, (n, 60, 50)).astype(np.float32)
    frames[rng.random(frames.shape) < 0.02] += 300
    frames[:, 2, :] = 0.0
    noise = np.full(60, 3.0)
    want = _combine_bands_reference(frames, noise)
    for source in (frames, lambda i, rows: frames[i, rows]):  # a stack or a reader
        got = combine_bands(source, n, (60, 50), noise, band_rows=16)
        assert all(_same(g, w) for g, w in zip(got, want))


def test_pixel_map_is_np_interp():
    rng = np.random.default_rng(3)
    nfib, ncol, nrow = 40, 30, 400
    trace = np.cumsum(rng.uniform(5, 12, (nfib, ncol)), axis=0) + rng.uniform(-20, 5, ncol)
    values = rng.normal(1.0, 0.1, (nfib, ncol))
    values[rng.random(values.shape) < 0.03] = np.nan
    values[4] = np.inf
    trace[10, 3] = trace[11, 3]  # a tie: np.interp for that column
    trace[2, 7] = np.nan
    want = np.stack([np.interp(np.arange(nrow, dtype=float), trace[:, c], values[:, c])
                     for c in range(ncol)], axis=1)
    assert _same(pixel_map(trace, values, nrow), want)


def _clip_stack_reference(x, y, w):
    bins = np.floor(x / 0.5).astype(int)

    def bin_medians(v):
        b = np.sort(bins)
        starts = np.r_[0, np.nonzero(np.diff(b))[0] + 1]
        counts = np.diff(np.r_[starts, b.size])
        at = np.searchsorted(b[starts], bins)
        s = v[np.lexsort((v, bins))]
        lo, hi = starts + (counts - 1) // 2, starts + counts // 2
        return (0.5 * (s[lo] + s[hi]))[at], counts[at]

    med, count = bin_medians(y)
    noise, _ = bin_medians(1.0 / np.sqrt(w))
    mad, _ = bin_medians(np.abs(y - med))
    return (count < 8) | (np.abs(y - med) < CLIP_SIGMA * np.maximum(1.4826 * mad, noise))


def test_clip_stack_is_the_array_code():
    rng = np.random.default_rng(5)
    x = rng.uniform(-6, 6, 900)
    y = 100 * np.exp(-0.5 * (x / 1.8) ** 2) + rng.normal(0, 3, x.size)
    y[rng.random(x.size) < 0.02] += 200  # cosmic rays
    y[::97] = np.round(y[::97])  # ties
    w = rng.uniform(0.05, 0.2, x.size)
    keep = _clip_stack(x, y, w)
    assert np.array_equal(keep, _clip_stack_reference(x, y, w)) and not keep.all()


class _RawFile:
    location = "memory.fits"
    amp = "LU"  # rotated


@pytest.mark.parametrize("ampname", ["LU", "UL"])  # UL also flips the columns
def test_usual_raw_amp_kernel_is_the_array_path(ampname):
    rng = np.random.default_rng(7)
    ncols = instrument.AMP_DATA_COLS + instrument.AMP_OVERSCAN_COLS
    raw = rng.normal(1000, 5, (instrument.AMP_ROWS, ncols))
    raw[:, :instrument.AMP_DATA_COLS] += rng.uniform(0, 3000, instrument.AMP_DATA_COLS)
    raw[10, 20:25] = 65535  # saturated
    hdu = fits.PrimaryHDU(raw.astype(np.uint16))  # stored as int16 with BZERO 32768
    hdu.header["GAIN"] = 0.8
    hdu.header["RDNOISE"] = 3.1
    hdu.header["AMPNAME"] = ampname
    buf = io.BytesIO()
    hdu.writeto(buf)
    reader, rawfile = BytesReader(buf.getvalue()), _RawFile()
    loaded = ccd._load_amp(reader, rawfile, "row")
    assert loaded.raw is not None and loaded.raw.dtype == np.uint16  # the kernel's path
    planes = tuple(np.empty(loaded.shape, t) for t in (np.float32, np.float32, np.uint8))
    loaded.fill(*planes)
    want, header = ccd._amp_planes(reader, rawfile, "row")  # astropy's read, array code
    assert all(_same(p, np.ascontiguousarray(w)) for p, w in zip(planes, want))
    assert planes[2].sum() == 5 * ccd.Mask.SATURATED
    assert header.tostring() == loaded.header.tostring()
