"""Wavelength refinement from the sky (panacea.skywave) against simulator truth.

The sky of an exposure is rendered by the simulator with a known spectral flexure against
the night's arcs; the refinement, given the arcs' (true) solution, must take it out.
"""

from __future__ import annotations

import numpy as np
import pytest

from panacea import instrument
from panacea.simulate.night import ExposurePlan, sky_spectra
from panacea.simulate.optics import build_optics
from panacea.skywave import apply_shift, measure_sky_shift

DATE = "20181108"
#: Issue 12's targets for the zero point after refinement (px), median-night ones except uv:
#: a dark 900 s uv sky holds two Hg lines of ~50 e per fiber over ~12 e/px of continuum, so
#: the photon noise alone is ~0.035 px there; uv is held to the worst-night target.
TARGET = {"uv": 0.08, "orange": 0.04, "red": 0.02, "farred": 0.02}
READ_NOISE = 3.0


@pytest.fixture(scope="module")
def optics():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = build_optics(instrument.get_channel(name), DATE)
        return cache[name]
    return get


def _observe(optics, shift, stretch, exptime=900.0, seed=3, lines=True):
    """Noisy sky spectra (electrons per column) of every fiber seen through flexure."""
    flexed = optics.with_flexure(shift, stretch)
    plan = ExposurePlan(12, 1, "sci", "sky", exptime, "2018-11-08T03:00:00", "science",
                        tracker=[(0, 0, 0), (1, 0, 1)])
    rng = np.random.default_rng(seed)
    if lines:
        expected = sky_spectra(flexed, plan, rng)
    else:  # a smooth continuum alone: nothing to measure a shift on
        expected = np.full((instrument.NFIBERS, optics.ncol), 200.0) * flexed.fiber_throughput
    var = np.clip(expected, 0, None) + READ_NOISE**2
    flux = rng.poisson(np.clip(expected, 0, None)) + rng.normal(0, READ_NOISE, expected.shape)
    return flux, var, flexed


def _zero_point(wave, true_wave, optics):
    """Median (over live fibers and all but 50 columns at each end) wavelength error in px."""
    disp = np.gradient(true_wave, axis=1)
    d = ((wave - true_wave) / disp)[~optics.dead][:, 50:-50]
    return float(np.median(d))


@pytest.mark.parametrize("name", ["uv", "orange", "red", "farred"])
@pytest.mark.parametrize("shift,stretch", [(0.6, 0.05), (-0.8, -0.1)])
def test_flexure_taken_out(optics, name, shift, stretch):
    o = optics(name)
    flux, var, flexed = _observe(o, shift, stretch)
    before = _zero_point(o.wave, flexed.wave, o)
    assert abs(before - shift) < 0.05  # the simulated flexure is there
    result = measure_sky_shift(flux, var, o.wave, ~o.dead)
    # uv's two Hg lines: one by one or the template fit of both, whichever is more precise
    assert result.method in (("lines", "xcorr") if name == "uv" else ("lines",))
    after = _zero_point(apply_shift(o.wave, result), flexed.wave, o)
    assert abs(after) <= TARGET[name], (name, before, after, result)
    # the error is honest: the residual within 4 sigma (and sigma small enough to matter)
    assert abs(result.shift - shift) < 4 * result.error + 0.01
    assert result.error < TARGET[name]  # precise enough to meet the target
    if name in ("red", "farred"):  # dozens of OH lines: the stretch is measured too
        assert result.nlines >= 15
        assert abs(result.stretch - stretch) < 0.04


@pytest.mark.parametrize("seed", [0, 3])
def test_short_exposure_not_pulled_to_the_arcs(optics, seed):
    """A 180 s red sky: faint lines must not bias the shift towards the arcs' prediction
    (per-fiber scales from the lines' own pixels did: -0.38 px came out as -0.355)."""
    o = optics("red")
    flux, var, flexed = _observe(o, -0.38, 0.03, exptime=180.0, seed=seed)
    result = measure_sky_shift(flux, var, o.wave, ~o.dead)
    assert result.method == "lines"
    assert abs(_zero_point(apply_shift(o.wave, result), flexed.wave, o)) <= 0.04


def test_no_lines_never_worse(optics):
    o = optics("orange")
    flux, var, _ = _observe(o, 0.5, 0.0, lines=False)
    result = measure_sky_shift(flux, var, o.wave, ~o.dead)
    assert result.method == "none"
    assert result.shift == 0.0 and result.nlines == 0
    np.testing.assert_array_equal(apply_shift(o.wave, result), o.wave)


def test_faint_sky_is_not_trusted(optics):
    """A 5-second exposure: whatever is measured carries an error that covers the truth,
    or nothing is corrected."""
    o = optics("uv")
    flux, var, flexed = _observe(o, -0.7, 0.0, exptime=5.0)
    result = measure_sky_shift(flux, var, o.wave, ~o.dead)
    before = abs(_zero_point(o.wave, flexed.wave, o))
    after = abs(_zero_point(apply_shift(o.wave, result), flexed.wave, o))
    if result.method == "none":
        assert after == before
    else:
        assert abs(result.shift + 0.7) < 4 * result.error + 0.01
        assert after < before


@pytest.mark.parametrize("seed", range(6))
def test_faint_uv_sky_applied_only_when_it_pays(optics, seed):
    """A 180 s uv sky (a standard's frame: two faint Hg lines) with a small flexure: the
    offset is applied only when its RMS over the detector is at least sqrt(2) errors (then
    applying it is expected to leave less than leaving it out), and the error is honest."""
    o = optics("uv")
    flux, var, flexed = _observe(o, 0.2, -0.06, exptime=180.0, seed=100 + seed)
    result = measure_sky_shift(flux, var, o.wave, ~o.dead)
    before = abs(_zero_point(o.wave, flexed.wave, o))
    after = abs(_zero_point(apply_shift(o.wave, result), flexed.wave, o))
    if result.method == "none":
        assert result.shift == 0.0 and len(result.rejected) == 3 and after == before
        shift, error, _ = result.rejected
        assert abs(shift - 0.2) < 4 * error  # its error is honest
        assert abs(shift) < np.sqrt(2) * error  # left out: it would not pay
    else:
        rms = np.sqrt(np.mean(result.offsets(o.ncol) ** 2))
        assert rms >= np.sqrt(2) * result.error
        assert after < 3 * result.error + 0.02, (before, after, result)


def test_template_fit_error_is_honest(optics):
    """The template fit of all lines on faint uv skies: the spread of its shifts over noise
    realisations matches its reported error (within a factor 1.6)."""
    from panacea.skywave import sky_fibers, xcorr_shift
    o = optics("uv")
    shifts, errors = [], []
    for seed in range(8):
        flux, var, _ = _observe(o, 0.5, 0.0, exptime=180.0, seed=200 + seed)
        xc = xcorr_shift(flux, o.wave, sky_fibers(flux, ~o.dead), variance=var)
        assert xc is not None
        shifts.append(xc[0])
        errors.append(xc[1])
    pull = (np.array(shifts) - 0.5) / np.array(errors)
    rms = float(np.sqrt(np.mean(pull**2)))
    assert 1 / 1.6 < rms < 1.6, (shifts, errors)


def test_outlying_line_is_clipped():
    """Five lines over part of the detector, one pulled by 2.3 px (a sky line on a standard
    star's Halpha wing): the robust fit leaves it out and the shift holds the others'."""
    from panacea.skywave import _combine
    shifts = np.array([0.19, 0.37, 0.49, -2.02, 0.53])
    errors = np.hypot([0.084, 0.086, 0.23, 0.293, 0.215], 0.12)
    cols = np.array([840.5, 1462.3, 1516.9, 1632.9, 1700.4])
    coef, error, keep = _combine(cols, shifts, errors, 2064)
    assert keep.tolist() == [True, True, True, False, True]
    assert abs(np.polynomial.legendre.legval(0.0, coef) - 0.33) < 0.05 and error < 0.12


def test_faint_uv_zero_point_over_frames(optics):
    """Eight faint uv frames (45 s: the two Hg lines at an error of ~0.3 px, like a 180 s
    standard on a dark night) with flexures of 0.25-0.95 px: applying every offset whose RMS
    is at least sqrt(2) errors leaves an RMS zero point of ~0.21 px against truth, where the
    former 3-sigma rule left 0.60 px (it applied one frame of eight) and the arcs alone
    0.67 px."""
    o = optics("uv")
    shifts = [0.9, -0.7, 0.5, -0.35, 0.8, -0.95, 0.25, 0.6]
    before, after, three_sigma, pulls = [], [], [], []
    for i, shift in enumerate(shifts):
        flux, var, flexed = _observe(o, shift, 0.03, exptime=45.0, seed=300 + i)
        result = measure_sky_shift(flux, var, o.wave, ~o.dead)
        b = _zero_point(o.wave, flexed.wave, o)
        a = _zero_point(apply_shift(o.wave, result), flexed.wave, o)
        s, e = (result.shift, result.error) if result.method != "none" else result.rejected[:2]
        pulls.append((s - b) / e)
        before.append(b)
        after.append(a)
        three_sigma.append(b - s if abs(s) >= 3 * e else b)
        if result.method != "none":
            assert abs(a) < 3 * result.error  # each applied offset within its error
    rms = [float(np.sqrt(np.mean(np.square(v)))) for v in (before, after, three_sigma)]
    assert rms[1] < 0.26 and rms[1] < 0.4 * rms[2], rms
    assert 0.5 < float(np.sqrt(np.mean(np.square(pulls)))) < 1.6, pulls


def test_rule_applies_what_pays():
    """Applying leaves ~error, leaving out leaves the offset: applied from sqrt(2) errors of
    RMS over the detector (a stretch alone counts), never with an error beyond MAX_ERROR."""
    from panacea.skywave import MAX_ERROR, SkyShift, _worth_applying
    assert _worth_applying(SkyShift(0.5, error=0.3, method="xcorr"), 2064)
    assert not _worth_applying(SkyShift(0.4, error=0.3, method="xcorr"), 2064)
    assert not _worth_applying(SkyShift(2.0, error=MAX_ERROR + 0.01, method="xcorr"), 2064)
    # no shift at the centre, 0.5 px at the ends: RMS 0.29 px against an error of 0.1
    assert _worth_applying(SkyShift(0.0, 0.5, error=0.1, method="lines"), 2064)
    assert not _worth_applying(SkyShift(0.0, 0.2, error=0.1, method="lines"), 2064)


def test_sky_fibers_blank_field_and_source():
    """Every live fiber is sky in a blank field; with a source, its fibers stay out."""
    from panacea.skywave import SKY_FIBER_FRACTION, sky_fibers
    rng = np.random.default_rng(5)
    usable = np.ones(instrument.NFIBERS, bool)
    usable[[17, 200]] = False  # dead
    flux = rng.normal(20.0, 5.0, (instrument.NFIBERS, 500)) * rng.uniform(0.9, 1.1, (280, 1))
    np.testing.assert_array_equal(sky_fibers(flux, usable), usable)
    flux[100:108] += 60.0  # a source over eight fibers
    keep = sky_fibers(flux, usable)
    assert not keep[100:108].any() and not keep[[17, 200]].any()
    assert keep.sum() == int(SKY_FIBER_FRACTION * usable.sum())


def test_arc_scatter_sets_an_error_floor(optics):
    """Dozens of red OH lines: the arc solution's ripple does not average down over them, so
    ARC_SYSTEMATIC of its scatter stays in the error however many lines are measured."""
    from panacea.skywave import ARC_SYSTEMATIC
    o = optics("red")
    flux, var, _ = _observe(o, 0.4, 0.0)
    bare = measure_sky_shift(flux, var, o.wave, ~o.dead)
    floored = measure_sky_shift(flux, var, o.wave, ~o.dead, arc_rms=0.1)
    assert bare.nlines >= 15 and bare.error < 0.02
    assert floored.error >= ARC_SYSTEMATIC * 0.1
    assert abs(floored.shift - bare.shift) < bare.error
