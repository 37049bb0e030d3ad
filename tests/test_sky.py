"""Sky model against the simulator's truth, with true trace, wavelength and fiber-to-fiber."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import median_filter

from panacea.sky import sky_model

_CACHE: dict = {}


def _exposure(sim_night, obsid: int, channel: str) -> dict:
    """Bias-subtracted boxcar spectra of one exposure plus its truth (cached)."""
    key = (str(sim_night.baseraw), obsid, channel)
    if key in _CACHE:
        return _CACHE[key]
    from panacea.archive import Archive
    from panacea.ccd import read_channel
    from panacea.extract import boxcar
    from panacea.simulate.truth import load_exposure

    night = Archive(sim_night.baseraw).night(sim_night.date)
    plan = next(e for e in sim_night.night_truth()["exposures"] if e["obsid"] == obsid)
    exp = next(e for e in night.exposures(ftype="sci") if e.obsid == obsid)
    frame = read_channel(night, exp, channel)
    zeros = [read_channel(night, z, channel) for z in night.exposures(ftype="zro")]
    image = frame.image - np.mean([z.image for z in zeros], axis=0)
    variance = frame.variance + np.mean([z.variance for z in zeros], axis=0) / len(zeros)
    truth = sim_night.truth(channel)
    parts = load_exposure(sim_night.baseraw, sim_night.date, obsid, plan["exp"], channel)
    trace = truth.trace + plan["trace_shift"]
    cosmic = parts["cosmic"].astype(bool)
    flux, var = boxcar(image, trace, 3.0, variance, mask=cosmic)
    hit, _ = boxcar(cosmic.astype(float), trace, 3.0)
    _CACHE[key] = {"flux": flux, "var": var, "mask": hit > 0, "truth": truth,
                   "sky": parts["sky"], "source": parts["source"]}
    return _CACHE[key]


def _fit(d: dict, method: str = "spline"):
    t = d["truth"]
    return sky_model(d["flux"], d["var"], t.wavelength, t.throughput, t.dead, mask=d["mask"],
                     method=method)


def _residual_stats(d: dict, model) -> dict[str, float]:
    """RMS of residual/sigma and mean residual on true sky fibers, continuum and lines."""
    sky, src = d["sky"], d["source"]
    skyf = ~d["truth"].dead & np.all(src < 0.01 * sky, axis=1)
    r = d["flux"] - model.sky
    rs = r / np.sqrt(np.where(d["var"] > 0, d["var"], 1.0))
    ok = skyf[:, None] & ~d["mask"] & (d["var"] > 0)
    ok[:, :5] = ok[:, -5:] = False
    run = median_filter(sky, size=(1, 51))
    line = sky > 1.2 * run
    out = {}
    for name, sel in (("cont", ok & ~line), ("line", ok & line)):
        out[f"{name}_rms"] = float(np.sqrt(np.mean(rs[sel] ** 2)))
    out["cont_mean"] = float(r[ok & ~line].sum() / d["flux"][ok & ~line].sum())
    out["line_mean"] = float(r[ok & line].sum() / (sky - run)[ok & line].sum())
    return out


@pytest.mark.parametrize("channel", ["red", "orange"])
def test_spline_residuals_at_noise_level(sim_night, channel):
    d = _exposure(sim_night, 12, channel)
    m = _fit(d)
    s = _residual_stats(d, m)
    assert m.sky.shape == d["flux"].shape
    assert s["cont_rms"] < 1.08
    assert s["line_rms"] < 1.15
    assert abs(s["cont_mean"]) < 0.01
    assert abs(s["line_mean"]) < 0.02
    assert 0.8 < m.chi2_dof_sky < 1.2


@pytest.mark.xfail(reason="star wings of ~1-3x the sky are sometimes kept as sky fibers "
                   "(known gap of the fiber rejection)", strict=False)
def test_star_fibers_excluded(sim_night):
    d = _exposure(sim_night, 8, "red")  # standard star on the red/farred IFU
    m = _fit(d)
    frac = d["source"].sum(axis=1) / d["sky"].sum(axis=1)
    star = frac > 1.0  # more star than sky light
    assert star.sum() >= 10
    assert not np.any(m.sky_fibers & star)
    assert m.sky_fibers.sum() > 80
    # the sky under the star is still modelled: compare with truth where it is bright
    k = np.argmax(frac)
    ratio = np.median(m.sky[k]) / np.median(d["sky"][k])
    assert 0.85 < ratio < 1.15


def test_spline_beats_template(sim_night):
    d = _exposure(sim_night, 12, "red")
    spline = _residual_stats(d, _fit(d, "spline"))
    template = _residual_stats(d, _fit(d, "template"))
    assert spline["line_rms"] < template["line_rms"]
    assert abs(spline["line_mean"]) < abs(template["line_mean"])


def test_unknown_method_raises(sim_night):
    d = _exposure(sim_night, 12, "red")
    with pytest.raises(ValueError, match="unknown sky method"):
        _fit(d, "median")


def test_relative_throughput_recovers_a_wrong_fiber_to_fiber(sim_night):
    """--correct_ftf: throughput errors of sky fibers measured from the sky itself. One 900 s
    red exposure measures each fiber to about 1 % (noise), so 5 % errors shrink, and a
    correct fiber-to-fiber stays within that noise."""
    d = _exposure(sim_night, 12, "red")
    t = d["truth"]
    clean = ~t.dead & np.all(d["source"] < 0.01 * d["sky"], axis=1)
    error = 1 + np.random.default_rng(5).uniform(-0.05, 0.05, t.throughput.shape[0])
    # sky fibers as the pipeline's refit gives them: without the star's light
    m = sky_model(d["flux"], d["var"], t.wavelength, t.throughput * error[:, None], t.dead,
                  mask=d["mask"], sky_fibers=clean)
    use = m.sky_fibers
    assert use.sum() > 40
    fixed = m.relative[use][:, 0] * error[use]
    before = np.std(error[use] - 1)
    after = np.std(fixed / np.median(fixed) - 1)
    assert after < 0.6 * before, (before, after)
    exact = sky_model(d["flux"], d["var"], t.wavelength, t.throughput, t.dead, mask=d["mask"],
                      sky_fibers=clean)
    assert np.std(exact.relative[use][:, 0] - 1) < 0.015
