"""The response ignores the standard's own lines, the telluric bands and steep channel ends.

Everything observed is made with the simulator's formulas (its strong-lined standard, its
telluric transmission, its dichroic edges, a reference tabulated coarsely as real ones are);
the pipeline's response and telluric correction are compared with the simulator's truth.
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from scipy.ndimage import median_filter

from panacea import fluxcal
from panacea import instrument as inst
from panacea.simulate import night as simnight
from panacea.simulate import nuisance
from panacea.simulate import spectra as sp

from lsf import binned_through_lsf

STANDARD = "FEIGE_34"
NZ = nuisance.Nuisances(randomized=True, stellar_lines=True, edge_width=12.0, edge_inset=15.0)
PLAN = simnight.ExposurePlan(7, 1, "sci", f"{STANDARD}_056_E", 180.0, "2018-11-08T02:00:00",
                             "standard", transparency=0.9, area_cm2=4.8e5)


def star(w):
    return sp.standard_flambda(STANDARD, w, strong_lines=True)


def observed_rate(ch: inst.Channel, flam_fn, pwv: float = 0.0, o2: float = 0.0) -> np.ndarray:
    """Noise-free count rate (e-/s/A) on the channel grid: F_lambda times the telluric
    transmission on a 0.05 A grid, through the simulator's Gaussian line spread of 4.3 px
    FWHM and a pixel box, averaged over the grid bins, through the edged response."""
    step_f = 0.05
    wf = np.arange(ch.wave_lo - 60, ch.wave_hi + 60, step_f)
    f = flam_fn(wf) * sp.telluric_transmission(wf, pwv, o2, 1.22)
    binned = binned_through_lsf(ch, wf, f)
    return simnight.photons_per_angstrom(ch, ch.grid, binned, PLAN, nz=NZ) / PLAN.exptime


def noisy(rate: np.ndarray, ch: inst.Channel, seed: int) -> tuple[np.ndarray, np.ndarray]:
    step = ch.grid[1] - ch.grid[0]
    var = (rate * PLAN.exptime * step + 3e4) / (PLAN.exptime * step) ** 2
    return rate + np.random.default_rng(seed).standard_normal(rate.size) * np.sqrt(var), var


def shape_errors(q: np.ndarray, grid: np.ndarray) -> tuple[float, float]:
    """RMS and largest deviation of the 21-pixel running median of ``q`` from 1, more than
    30 A from the channel's ends."""
    far = (grid > grid[0] + 30) & (grid < grid[-1] - 30)
    run = median_filter(q, 21, mode="nearest")[far] - 1
    return float(np.sqrt(np.mean(run**2))), float(np.max(np.abs(run)))


@pytest.fixture(scope="module")
def uv_standard():
    ch = inst.get_channel("uv")
    rate, var = noisy(observed_rate(ch, star), ch, 5)
    return ch, rate, var


@pytest.mark.parametrize("step,binned", [(10.0, True), (2.0, False)])
def test_response_ignores_deep_balmer_lines(uv_standard, step, binned):
    """H8-H12, Ca H and K (3780-4040 A) and a dichroic edge: the response stays on the
    truth, and the same fit without the masks is off by several per cent there."""
    ch, rate, var = uv_standard
    rw, rf = sp.tabulate_reference(star, 3500.0, 10700.0, step, binned)
    truth = simnight.channel_response(ch, ch.grid, NZ)
    args = (ch.grid, rate, var, rw, rf, ch.resolution, PLAN.area_cm2, PLAN.transparency)
    fit = fluxcal.derive_response(*args)
    q = fit.response / truth
    rms, worst = shape_errors(q, ch.grid)
    assert rms < 0.01 and worst < 0.02
    lines = (ch.grid > 3780) & (ch.grid < 4040)
    run = median_filter(q, 21, mode="nearest")
    assert np.max(np.abs(run[lines] - 1)) < 0.02
    assert {"H8", "H9", "H10", "H11", "H12", "Ca II K"} <= {b.name for b in fit.masked}
    assert fit.ref_step == pytest.approx(step)
    if step >= 10:  # a coarse reference cannot follow the lines: unmasked they bend the fit
        naive = fluxcal.derive_response(*args, mask_lines=False)
        assert np.max(np.abs(median_filter(naive.response / truth, 21)[lines] - 1)) > 0.03


def test_telluric_measured_on_the_standard_corrects_the_science(tmp_path):
    """Red channel with O2 A and B and water bands: the science spectrum divided by the
    standard's transmission follows the truth; uncorrected it is off by tens of per cent."""
    ch = inst.get_channel("red")
    rate, var = noisy(observed_rate(ch, star, pwv=5.0, o2=1.0), ch, 6)
    rw, rf = sp.tabulate_reference(star, 3500.0, 10700.0, 2.0, False)
    fit = fluxcal.derive_response(ch.grid, rate, var, rw, rf, ch.resolution, PLAN.area_cm2,
                                  PLAN.transparency)
    kinds = {b.name: b.kind for b in fit.masked}
    assert kinds["O2 A"] == kinds["O2 B"] == kinds["H2O 7200"] == "telluric"
    science = observed_rate(ch, sp.science_flambda, pwv=5.0, o2=1.0)
    clear = observed_rate(ch, sp.science_flambda)  # the same target without absorption
    base = fit.response / (PLAN.area_cm2 * PLAN.transparency)
    truth = clear * simnight.channel_response(ch, ch.grid, NZ) / (PLAN.area_cm2
                                                                  * PLAN.transparency)
    corrected = science * base / fluxcal.telluric_correction(fit.telluric, 1.22, 1.22)
    # the O2 A band's deep pixels are flagged saturated (left uncorrected, as in TELLSKIP)
    # and judged apart, as the robustness benchmark does
    flagged = fit.telluric < fluxcal.MIN_TELLURIC
    o2a = (ch.grid > 7585) & (ch.grid < 7710)
    assert 40 < flagged.sum() == (flagged & o2a).sum()
    assert flagged[(ch.grid > 7594) & (ch.grid < 7621)].all()  # the saturated core
    # corrected from airmass 1.22 to 1.6, the band's deep pixels would be off by +13 to +55 %:
    # flagged, they are left alone (divisor 1)
    assert np.all(fluxcal.telluric_correction(fit.telluric, 1.22, 1.6)[flagged] == 1.0)
    rms, worst = shape_errors(np.where(flagged, 1.0, corrected / truth), ch.grid)
    assert rms < 0.01 and worst < 0.02
    assert shape_errors(science * base / truth, ch.grid)[1] > 0.3
    # what was masked is in the response file's header, the transmission in an extension
    path = fluxcal.write_response(tmp_path / "response_red.fits", ch.grid, fit.response,
                                  fluxcal.response_cards(fit), telluric=fit.telluric)
    with fits.open(path) as hdul:
        h = hdul[0].header
        assert h["MSKTELL"] == sum(k == "telluric" for k in kinds.values()) >= 5
        assert h["MSKSTEL"] >= 1  # H-alpha
        assert h["TELLSAT"] == flagged.sum()
        assert any(str(h[k]).startswith("O2 A") for k in h if k.startswith("MASK"))
        assert "COMMENT" not in h and "HISTORY" not in h
        np.testing.assert_allclose(hdul["TELLURIC"].data, fit.telluric, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(fluxcal.read_response(path, ch.grid), fit.response)


def test_telluric_correction_scales_with_airmass_and_skips_saturation():
    t = np.array([1.0, 0.8, 0.5, 0.01])
    np.testing.assert_allclose(fluxcal.telluric_correction(t, 1.2, 1.2), [1.0, 0.8, 0.5, 1.0])
    np.testing.assert_allclose(fluxcal.telluric_correction(t, 1.0, 2.0)[:3],
                               [1.0, 0.64, 0.25])


def test_narrow_stellar_line_in_a_telluric_band_stays_out_of_the_science():
    """Orange: the standard's Na D (inside the H2O 5900 band) is missed by a reference
    tabulated every 10 A; measured as if it were the atmosphere's, it was divided into the
    science (-12 % on a randomized night). The transmission is bridged across it: the science
    follows the truth there, and the band's own water lines beyond Na D are still corrected."""
    ch = inst.get_channel("orange")
    rate, var = noisy(observed_rate(ch, star, pwv=3.0, o2=1.0), ch, 7)
    rw, rf = sp.tabulate_reference(star, 3500.0, 10700.0, 10.0, False)
    fit = fluxcal.derive_response(ch.grid, rate, var, rw, rf, ch.resolution, PLAN.area_cm2,
                                  PLAN.transparency)
    nad = (ch.grid > 5885) & (ch.grid < 5900)
    raw = fit.response / fit.ratio  # what the standard alone says the transmission is
    # the table's samples miss or straddle the star's Na D: +-15 % and more, far beyond any
    # water line here
    assert np.max(np.abs(raw[nad] - 1)) > 0.15
    assert np.all((fit.telluric[nad] > 0.93) & (fit.telluric[nad] < 1.01))
    assert fluxcal.response_cards(fit)["TELLBRG"][0] == fit.n_bridged >= nad.sum()
    science = observed_rate(ch, sp.science_flambda, pwv=3.0, o2=1.0)
    clear = observed_rate(ch, sp.science_flambda)
    corrected = science * fit.response / fluxcal.telluric_correction(fit.telluric, 1.22, 1.22)
    truth = clear * simnight.channel_response(ch, ch.grid, NZ)
    q = corrected / truth
    q /= np.median(q)
    run = median_filter(q, 21, mode="nearest")
    band = (ch.grid > 5860) & (ch.grid < 6020)
    assert np.max(np.abs(run[band] - 1)) < 0.01
    water = (ch.grid > 5920) & (ch.grid < 5990)  # beyond Na D: the band is still corrected
    assert np.min(fit.telluric[water]) < 0.97
    uncorrected = median_filter(science * fit.response / truth / np.median(q), 21)
    assert np.max(np.abs(uncorrected[water] - 1)) > 2 * np.max(np.abs(run[water] - 1))


def test_line_mask_beside_a_steep_end_does_not_swing_the_response():
    """Orange's He II 4686 mask lies in the steep blue end zone (a 12 A dichroic edge 15 A
    inside the end). One cubic piece across the mask could not follow the edge and the fit
    left the truth by 1.3 % beside it (on randomized night 1, where clipping then ate the
    data beside the mask, by -4.7 %); the mask's breakpoints are kept and residuals under
    1 % are not clipped: within 0.7 %."""
    ch = inst.get_channel("orange")
    step_f = 0.05
    wf = np.arange(ch.wave_lo - 60, ch.wave_hi + 60, step_f)
    binned = binned_through_lsf(ch, wf, star(wf))
    rate = simnight.photons_per_angstrom(ch, ch.grid, binned, PLAN, nz=NZ) / PLAN.exptime
    rate, var = noisy(rate, ch, 8)
    rw, rf = sp.tabulate_reference(star, 3500.0, 10700.0, 2.0, True)
    fit = fluxcal.derive_response(ch.grid, rate, var, rw, rf, ch.resolution, PLAN.area_cm2,
                                  PLAN.transparency)
    assert "He II 4686" in {b.name for b in fit.masked}
    q = fit.response / simnight.channel_response(ch, ch.grid, NZ)
    q /= np.median(q)
    run = median_filter(q, 21, mode="nearest")
    edge = (ch.grid > ch.grid[0] + 30) & (ch.grid < 4760)
    assert np.max(np.abs(run[edge] - 1)) < 0.007


def test_bridge_transmission_needs_both_sides():
    """A narrow dip with the band measured on both sides is bridged; a run at the end of
    the grid (nothing to its left) is left as it is rather than extrapolated."""
    from panacea.fluxcal import bridge_transmission

    grid = np.arange(5800.0, 5900.0, 1.0)
    t = np.full(grid.size, 0.95)
    t[40:44] = 0.6  # the star's line in the measured transmission
    t[:5] = 0.3
    holes = np.zeros(grid.size, bool)
    holes[40:44] = True
    holes[:5] = True
    out = bridge_transmission(grid, t, holes, min_level=0.9)
    assert np.allclose(out[40:44], 0.95)
    assert np.array_equal(out[:5], t[:5])
    # a band too deep beside the run keeps its own structure
    deep = t.copy()
    deep[30:40] = 0.5
    assert np.array_equal(bridge_transmission(grid, deep, holes, min_level=0.9)[40:44],
                          deep[40:44])
