"""Optimal extraction and rectification of a simulated science exposure, against truth."""

from __future__ import annotations

import numpy as np
import pytest

from panacea import instrument
from panacea.archive import Archive
from panacea.calibration import calibrate_channel
from panacea.ccd import read_channel
from panacea.extract import aperture, boxcar, optimal
from panacea.profile import FiberProfile
from panacea.rectify import grid_edges, pixel_edges, rectify
from panacea.simulate.truth import load_exposure
from panacea.trace import TraceSolution, measure_shift

CHANNELS = ("orange", "farred")


def reduce_science(archive, date, bundle, exposure, channel, cosmic):
    """Bias-subtract, pixel-flatten and optimally extract one channel of an exposure."""
    night = archive.night(date)
    frame = read_channel(night, exposure, channel)
    amp_rows = int(bundle.meta["AMPROWS"])
    nbias = max(int(bundle.meta.get("NBIAS", 1)), 1)
    # the master bias is a mean of NBIAS frames: its variance is rdnoise^2 / NBIAS
    bias_var = np.repeat(np.asarray(bundle["rdnoise"], float) ** 2 / nbias, amp_rows)[:, None]
    pflat = bundle["pixelflat"]
    image = (frame.image - bundle["masterbias"]) / pflat
    variance = (frame.variance + bias_var) / pflat**2
    read_var = np.broadcast_to(bias_var + np.repeat(np.asarray(bundle["rdnoise"]) ** 2,
                                                    amp_rows)[:, None], image.shape) / pflat**2
    mask = cosmic | (frame.mask > 0)
    dead = bundle["dead"].astype(bool)
    n = dead.size
    tsol = TraceSolution(bundle["trace"], dead, np.zeros(n), np.zeros(n, int), np.ones(n),
                         np.zeros(1), np.zeros((n, 1)))
    profile = FiberProfile.from_array(bundle["profile"], image.shape[1], amp_rows,
                                      int(bundle.meta["FIBPAMP"]),
                                      float(bundle.meta["HALFWID"]), dead)
    shift = measure_shift(image, tsol, variance, mask, profile=profile, amp_rows=amp_rows)
    first, weights = profile.weights(tsol.shifted(shift).trace)
    ext = optimal(image, variance, mask, first, weights, read_variance=read_var)
    flux, var, frac = ext.flux, ext.variance, ext.frac
    return {"flux": flux, "var": var, "frac": frac, "dead": dead, "shift": shift,
            "image": image, "variance": variance, "mask": mask,
            "trace": tsol.shifted(shift).trace}


@pytest.fixture(scope="module")
def science(sim_night):
    """Bundles of two channels and the extracted science exposure (exp 1), with truth."""
    archive = Archive(sim_night.baseraw)
    info = next(e for e in sim_night.night_truth()["exposures"] if e["kind"] == "science")
    obsid, exp = info["obsid"], info["exp"]
    night = archive.night(sim_night.date)
    exposure = next(e for e in night.exposures() if e.obsid == obsid and e.exp == exp)
    out = {}
    for ch in CHANNELS:
        bundle = calibrate_channel(archive, sim_night.date, ch)
        truth = load_exposure(sim_night.baseraw, sim_night.date, obsid, exp, ch)
        red = reduce_science(archive, sim_night.date, bundle, exposure, ch,
                             truth["cosmic"].astype(bool))
        red.update(true=truth["sky"] + truth["source"], wave=bundle["wavelength"],
                   true_shift=info["trace_shift"])
        out[ch] = red
    return out


@pytest.mark.parametrize("channel", CHANNELS)
def test_optimal_against_truth(science, channel):
    r = science[channel]
    assert r["shift"] == pytest.approx(r["true_shift"], abs=0.02)
    live = ~r["dead"]
    cols = slice(100, 1965)
    m, t, v = r["flux"][live, cols], r["true"][live, cols], r["var"][live, cols]
    assert np.all(v > 0)
    assert abs(np.median(m / t - 1)) < 0.005
    z = (m - t) / np.sqrt(v)
    assert 0.95 < np.sqrt(np.mean(z**2)) < 1.05
    # the cosmic-ray mask removes part of some profiles; no fiber loses all of it
    assert np.all(r["frac"][live, cols] > 0)
    assert np.median(r["frac"][live, cols]) == pytest.approx(1.0)


def test_optimal_beats_boxcar(science):
    """Optimal extraction has a smaller variance than a +-3 px boxcar for the same frame."""
    r = science["orange"]
    _, bvar = boxcar(r["image"], r["trace"], 3.0, r["variance"], r["mask"])
    use = ~r["dead"][:, None] & (bvar > 0)
    assert np.median(r["var"][use] / bvar[use]) < 1.0


def test_optimal_masks_and_synthetic():
    """Noise-free frame of overlapping Gaussian fibers: exact fluxes, masked pixels ignored."""
    nrow, ncol, nfib, h = 135, 50, 20, 8
    rng = np.random.default_rng(1)
    trace = 10 + 5.5 * np.arange(nfib)[:, None] + 0.3 * np.sin(np.arange(ncol) / 7)[None, :]
    first = np.round(trace).astype(int) - h
    rows = first[:, None, :] + np.arange(2 * h + 1)[None, :, None]
    w = np.exp(-0.5 * ((rows - trace[:, None, :]) / 1.6) ** 2)
    w /= w.sum(axis=1, keepdims=True)
    truth = rng.uniform(50, 500, (nfib, ncol))
    image = np.zeros((nrow, ncol))
    cols = np.broadcast_to(np.arange(ncol), rows.shape)
    np.add.at(image, (rows, cols), truth[:, None, :] * w)
    mask = np.zeros((nrow, ncol), bool)
    mask[40:43, 10] = True
    image[mask] = 1e5  # a cosmic ray
    var = 9.0 + np.maximum(image, 0)
    flux, fvar, frac, *_ = optimal(image, var, mask, first, w.astype(np.float32),
                               read_variance=9.0, niter=8)
    np.testing.assert_allclose(flux, truth, rtol=1e-4)
    assert np.all(fvar > 0)
    assert frac[:, 10].min() < 0.9
    assert np.allclose(np.delete(frac, 10, axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("channel", CHANNELS)
def test_rectify_against_truth(science, channel):
    r = science[channel]
    live = ~r["dead"]
    grid = instrument.get_channel(channel).grid
    fr, vr = rectify(r["flux"][live], r["var"][live], r["wave"][live], grid)
    tr, _ = rectify(r["true"][live], np.ones_like(r["true"][live]), r["wave"][live], grid)
    good = vr > 0
    assert good.mean() > 0.9
    z = (fr - tr)[good] / np.sqrt(vr[good])
    assert np.mean(z**2) == pytest.approx(1.0, abs=0.05)


def test_rectify_conserves_flux():
    """Output x bin width equals the integral of the piecewise-constant input spectrum."""
    rng = np.random.default_rng(3)
    nfib, ncol = 5, 400
    wave = 5000 + np.cumsum(rng.uniform(0.9, 1.3, (nfib, ncol)), axis=1)
    flux = rng.uniform(10, 1000, (nfib, ncol))
    var = rng.uniform(1, 5, (nfib, ncol))
    grid = np.linspace(5050, 5350, 250)
    fr, vr = rectify(flux, var, wave, grid)
    ge = grid_edges(grid)
    width = np.diff(ge)
    for f in range(nfib):
        edges = pixel_edges(wave[f:f + 1])[0]
        cum = np.concatenate([[0], np.cumsum(flux[f])])
        g = vr[f] > 0
        lo, hi = ge[:-1][g].min(), ge[1:][g].max()
        expected = np.interp(hi, edges, cum) - np.interp(lo, edges, cum)
        assert (fr[f][g] * width[g]).sum() == pytest.approx(expected, rel=1e-3)
        assert (fr[f][g] * width[g]).sum() == pytest.approx(expected, rel=1e-9)
    # variance: independent dense overlap matrix of one fiber
    f = 1
    edges = pixel_edges(wave[f:f + 1])[0]
    overlap = np.clip(np.minimum(ge[1:, None], edges[None, 1:])
                      - np.maximum(ge[:-1, None], edges[None, :-1]), 0, None)
    wmat = overlap / np.diff(edges)[None, :] / width[:, None]
    g = vr[f] > 0
    np.testing.assert_allclose(fr[f][g], (wmat @ flux[f])[g], rtol=1e-9)
    np.testing.assert_allclose(vr[f][g], (wmat**2 @ var[f])[g], rtol=1e-9)
    # a bad native pixel blanks the bins it touches, and only those
    var2 = var.copy()
    var2[f, 200] = 0
    _, vr2 = rectify(flux, var2, wave, grid)
    touched = wmat[:, 200] > 0
    assert np.all(vr2[f][touched] == 0)
    assert np.all(vr2[f][~touched & g] > 0)


def test_row_offsets_between_fibers_are_fitted():
    """A smooth additive offset of the rows (what the overscan leaves of the bias drift)
    biases every fiber by offset x the profile's effective width; it is measured between
    the fibers, where curved traces leave low-signal pixels, and removed."""
    nrow, ncol, nfib, h = 300, 1500, 40, 8
    rng = np.random.default_rng(3)
    col = np.arange(ncol)
    trace = 12 + 6.8 * np.arange(nfib)[:, None] + 4.0 * ((col - 750) / 750.0) ** 2
    first = np.round(trace).astype(int) - h
    rows = first[:, None, :] + np.arange(2 * h + 1)[None, :, None]
    w = np.exp(-0.5 * ((rows - trace[:, None, :]) / 1.2) ** 2)
    w /= w.sum(axis=1, keepdims=True)
    truth = np.full((nfib, ncol), 15.0)  # a faint sky, as in uv
    clean = np.zeros((nrow, ncol))
    np.add.at(clean, (rows, np.broadcast_to(col, rows.shape)), truth[:, None, :] * w)
    # smooth offsets of ~0.1 e- per row, with a step between the halves (amplifiers)
    r = np.arange(nrow)
    offset = 0.12 * np.sin(2 * np.pi * r / 90.0) + 0.05 * np.cos(2 * np.pi * r / 50.0)
    offset[150:] += 0.1
    rn2 = 9.0
    image = rng.poisson(clean) + rng.normal(0, 3.0, clean.shape) + offset[:, None]
    var = rn2 + np.maximum(image, 0)
    plain = optimal(image, var, None, first, w.astype(np.float32), read_variance=rn2)
    fitted = optimal(image, var, None, first, w.astype(np.float32), read_variance=rn2,
                     row_segments=(0, 150, 300))
    inner = slice(3, nfib - 3)
    err_plain = (plain.flux - truth)[inner].mean(axis=1)
    err_fit = (fitted.flux - truth)[inner].mean(axis=1)
    noise = np.sqrt(plain.variance[inner].mean(axis=1) / ncol)
    n2 = np.median(noise) ** 2
    assert np.var(err_plain) > 4 * n2  # the offsets matter ...
    # ... and what is left of them beyond the noise is < 20 % of the variance (measured 9 %)
    assert np.mean(err_fit**2) - n2 < 0.2 * (np.var(err_plain) - n2)
    # the offsets themselves (0.1 e- RMS) to 0.03 e-, a step between the amplifiers included
    assert np.sqrt(np.mean((fitted.offset.mean(axis=1) - offset)[20:280] ** 2)) < 0.045
    assert np.all(plain.offset == 0)
    # the read-noise part of the variance does not depend on the signal
    ratio = fitted.read_variance[inner] / fitted.variance[inner]
    assert np.all(ratio <= 1 + 1e-6) and np.mean(ratio) < 0.8


def test_row_offsets_survive_a_bad_pixel_and_check_segments():
    """A non-finite unmasked pixel must not spread through the row offsets to every fiber;
    segments must cover the frame."""
    nrow, ncol, nfib, h = 120, 200, 15, 8
    col = np.arange(ncol)
    trace = 10 + 6.8 * np.arange(nfib)[:, None] + 0.0 * col[None, :]
    first = np.round(trace).astype(int) - h
    rows = first[:, None, :] + np.arange(2 * h + 1)[None, :, None]
    w = np.exp(-0.5 * ((rows - trace[:, None, :]) / 1.2) ** 2)
    w /= w.sum(axis=1, keepdims=True)
    image = np.zeros((nrow, ncol))
    np.add.at(image, (rows, np.broadcast_to(col, rows.shape)), 20.0 * w)
    image[40, 50] = np.nan
    var = 9.0 + np.nan_to_num(image)
    ext = optimal(image, var, None, first, w.astype(np.float32), read_variance=9.0,
                  row_segments=(0, 60, 120))
    assert np.isfinite(ext.offset).all()
    assert np.isfinite(ext.flux).mean() > 0.99
    with pytest.raises(ValueError, match="row_segments"):
        optimal(image, var, None, first, w.astype(np.float32), read_variance=9.0,
                row_segments=(0, 60))


def test_offsets_keep_a_local_halo_local():
    """Scattered light around a bright star's fiber is local: the fitted offset removes
    part of it where it is and carries little of it to the rest of the rows."""
    rng = np.random.default_rng(5)
    nrow, ncol, nfib, h = 300, 1500, 40, 8
    col, r = np.arange(ncol), np.arange(nrow)
    trace = 12 + 6.8 * np.arange(nfib)[:, None] + 4.0 * ((col - 750) / 750.0) ** 2
    first = np.round(trace).astype(int) - h
    rows = first[:, None, :] + np.arange(2 * h + 1)[None, :, None]
    w = np.exp(-0.5 * ((rows - trace[:, None, :]) / 1.2) ** 2)
    w /= w.sum(axis=1, keepdims=True)
    truth = np.full((nfib, ncol), 15.0)
    truth[20] = 3000.0
    clean = np.zeros((nrow, ncol))
    np.add.at(clean, (rows, np.broadcast_to(col, rows.shape)), truth[:, None, :] * w)
    halo = 2.0 * np.exp(-0.5 * ((r[:, None] - trace[20, 750]) / 25.0) ** 2
                        - 0.5 * ((col[None, :] - 750) / 200.0) ** 2)
    image = rng.poisson(clean + halo) + rng.normal(0, 3.0, clean.shape)
    var = 9.0 + np.maximum(image, 0)
    fibs = [16, 17, 18, 19, 21, 22, 23, 24]
    near, far = np.abs(col - 750) < 100, (col < 200) | (col > 1300)
    err = {}
    for seg in (None, (0, 150, 300)):
        ext = optimal(image, var, None, first, w.astype(np.float32), read_variance=9.0,
                      row_segments=seg)
        e = (ext.flux - truth)[fibs]
        err[seg is not None] = e[:, near].mean(), e[:, far].mean()
    # about 7 e- per column of halo in these fibers near its centre; measured 7.1 -> 3.8,
    # and -0.1 -> -0.4 far from it (one offset per whole row: 5.2 and -1.9)
    assert err[True][0] < 0.7 * err[False][0]
    assert abs(err[True][1]) < 0.8


# --------------------------------------------------------------------------- boxcar apertures
def _boxcar_reference(image, trace, half_width, variance, mask):
    """Every row's overlap with the aperture, summed over the whole column (slow, direct)."""
    rows = np.arange(image.shape[0])[:, None]
    flux = np.zeros(trace.shape)
    var = np.zeros(trace.shape)
    for f in range(trace.shape[0]):
        lo, hi = trace[f] - half_width, trace[f] + half_width
        w = np.clip(np.minimum(rows + 0.5, hi) - np.maximum(rows - 0.5, lo), 0.0, 1.0)
        w = np.where(mask, 0.0, w)
        flux[f] = (w * image).sum(axis=0)
        var[f] = (w**2 * variance).sum(axis=0)
    return flux, var


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_boxcar_aperture_reused_equals_the_direct_sum(dtype):
    """An aperture built once gives bit for bit what a boxcar on the trace gives, for
    frames with a variance and a mask, a trace partly off the frame and a float32 trace;
    both agree with the direct overlap sum."""
    rng = np.random.default_rng(3)
    nrow, ncol, half = 60, 40, 2.7
    trace = (np.array([1.2, 9.5, 17.0, 30.25, 44.8, 58.9])[:, None]
             + 0.05 * np.arange(ncol) + rng.uniform(-0.3, 0.3, (6, ncol))).astype(dtype)
    ap = aperture(trace, half, (nrow, ncol))
    for _ in range(3):  # several frames on one aperture
        image = rng.normal(50, 20, (nrow, ncol)).astype(np.float32)
        variance = np.abs(image) + 9.0
        mask = rng.random((nrow, ncol)) < 0.05
        got = boxcar(image, ap, variance=variance, mask=mask)
        direct = boxcar(image, trace, half, variance, mask)
        assert np.array_equal(got[0], direct[0]) and np.array_equal(got[1], direct[1])
        ref = _boxcar_reference(image, trace, half, variance, mask)
        np.testing.assert_allclose(got[0], ref[0], rtol=1e-6 if dtype == np.float32 else 1e-12,
                                   atol=1e-9)
        np.testing.assert_allclose(got[1], ref[1], rtol=1e-6 if dtype == np.float32 else 1e-12)
    flat, none = boxcar(np.ones((nrow, ncol), np.float32), ap)
    assert none is None
    inside = (trace - half > -0.5) & (trace + half < nrow - 0.5)
    np.testing.assert_allclose(flat[inside], 2 * half, rtol=1e-6)  # the aperture's width
    assert np.all(flat[~inside] < 2 * half)  # the fiber at the edge loses its off-frame rows


def test_boxcar_aperture_refuses_another_frame_or_width():
    trace = np.full((3, 20), 10.0) + np.arange(3)[:, None] * 6
    ap = aperture(trace, 3.0, (30, 20))
    with pytest.raises(ValueError, match="half_width 2.5 differs"):
        boxcar(np.zeros((30, 20)), ap, 2.5)
    with pytest.raises(ValueError, match=r"image of shape \(31, 20\)"):
        boxcar(np.zeros((31, 20)), ap)
    with pytest.raises(ValueError, match=r"variance of shape \(30, 21\)"):
        boxcar(np.zeros((30, 20)), ap, variance=np.zeros((30, 21)))
    with pytest.raises(ValueError, match="does not fit a frame"):
        aperture(trace, 3.0, (30, 21))
    assert boxcar(np.zeros((30, 20)), ap, 3.0)[0].shape == (3, 20)


def test_boxcar_takes_big_endian_and_half_precision_frames():
    """An image read straight from a FITS HDU is big-endian: the same sums as native."""
    rng = np.random.default_rng(3)
    image = rng.normal(100.0, 5.0, (60, 80)).astype(np.float32)
    trace = np.tile(np.array([[15.2], [30.7], [45.1]]), (1, 80))
    mask = np.zeros(image.shape, bool)
    mask[20, 10] = True
    ref, _ = boxcar(image, trace, mask=mask)
    big, _ = boxcar(image.astype(">f4"), trace, mask=mask.astype(">i2"))
    assert np.array_equal(ref, big)
    half = image.astype(np.float16)
    assert np.array_equal(boxcar(half, trace)[0], boxcar(half.astype(np.float32), trace)[0])

