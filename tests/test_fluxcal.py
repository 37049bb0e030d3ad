"""Flux calibration: guider conditions, standard spectra, response fit, response files."""

from __future__ import annotations

import datetime as dt
import io
import logging

import numpy as np
import pytest
from astropy.io import fits

from panacea import fluxcal
from panacea import instrument as inst
from panacea.archive import NightIndex
from panacea.errors import PanaceaError
from panacea.simulate import night as simnight
from panacea.simulate import spectra as sp

from lsf import binned_through_lsf

DATE = "20181108"
STANDARD = "FEIGE_34"


# --------------------------------------------------------------------------- guider


def frame_bytes(cards: dict, layout: str = "single") -> bytes:
    """A small guider FITS file with the given header cards: all in one HDU ("single"), or
    as real frames are ("real"): the image in extension 1 whose header holds GUIDLOOP, MJD
    and TRANSPAR, the tracker cards in the primary header."""
    image = np.zeros((4, 4), np.uint16)
    if layout == "single":
        hdus = [fits.PrimaryHDU(image, header=fits.Header(cards))]
    else:
        ext = {k: v for k, v in cards.items() if k in fluxcal.GUIDER_IMAGE_CARDS}
        prim = {k: v for k, v in cards.items() if k not in ext}
        hdus = [fits.PrimaryHDU(header=fits.Header(prim)),
                fits.ImageHDU(image, header=fits.Header(ext))]
    buf = io.BytesIO()
    fits.HDUList(hdus).writeto(buf)
    return buf.getvalue()


def test_guider_cards_are_read_from_where_real_frames_keep_them():
    """Extension 1 for GUIDLOOP/MJD/TRANSPAR, the primary header for the tracker cards;
    a card only in the other HDU is still found."""
    buf = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(header=fits.Header({"X_STRT": 1.5, "TRANSPAR": 0.2,
                                                      "PHI_STRT": 10.0})),
                  fits.ImageHDU(np.zeros((4, 4)), header=fits.Header(
                      {"TRANSPAR": 0.93, "GUIDLOOP": "ACTIVE", "X_STRT": 9.9,
                       "Y_STRT": -0.4}))]).writeto(buf)
    h = fluxcal.guider_header(buf.getvalue())
    assert (h["TRANSPAR"], h["GUIDLOOP"], h["X_STRT"], h["Y_STRT"], h["PHI_STRT"]) == (
        0.93, "ACTIVE", 1.5, -0.4, 10.0)
    with pytest.raises(fluxcal.ArchiveError, match="gc1 frame: cannot read"):
        fluxcal.guider_header(b"garbage" * 500, "gc1 frame")


def stamp(t: dt.datetime) -> str:
    return t.strftime("%Y%m%dT%H%M%S") + f".{t.microsecond // 100000}"


@pytest.fixture(params=["single", "real"])
def guided_night(request, tmp_path, fakeraw):
    """A night with loose guider frames of known values around a 120 s exposure at 03:00.

    gc1 and gc2 every 20 s from 02:59:00 to 03:03:00; ACQUIRE outside the exposure with
    absurd values (they must be ignored), glitches 0.0 and 3.2 inside it, one unreadable frame.
    """
    fakeraw.write_tiny_exposure(tmp_path, DATE, 1, "zro")
    start = dt.datetime(2018, 11, 8, 3, 0, 0)
    expected_t, xy = [], []
    for cam, offset in (("gc1", 0.0), ("gc2", 0.01)):
        folder = tmp_path / DATE / cam
        folder.mkdir(parents=True)
        for i in range(13):
            t = start + dt.timedelta(seconds=-60 + 20 * i)
            inside = start <= t <= start + dt.timedelta(seconds=120)
            cards = {"GUIDLOOP": "ACTIVE" if inside else "ACQUIRE",
                     "TRANSPAR": 0.8 + offset + 0.01 * i if inside else 0.3,
                     "X_STRT": 1.0 + 0.1 * i if inside else 4.9, "Y_STRT": -0.5}
            if inside and i == 4:
                cards["TRANSPAR"] = 0.0 if cam == "gc1" else 3.2
            elif inside:
                expected_t.append(cards["TRANSPAR"])
            if inside:
                xy.append((cards["X_STRT"], cards["Y_STRT"]))
            (folder / f"{stamp(t)}_{cam}_sci.fits").write_bytes(frame_bytes(cards,
                                                                            request.param))
    bad = tmp_path / DATE / "gc2" / f"{stamp(start + dt.timedelta(seconds=30))}_gc2_sci.fits"
    bad.write_bytes(b"not a FITS file at all" * 10)
    x, y = np.array(xy).T
    return (NightIndex(tmp_path, DATE), start, float(np.mean(expected_t)),
            float(np.mean(inst.illuminated_area(x, y))), bad)


def test_guider_conditions_known_frames(guided_night, caplog):
    night, start, transparency, area, bad = guided_night
    with caplog.at_level(logging.WARNING, logger="panacea.fluxcal"):
        cond = fluxcal.guider_conditions(night, start, 120.0)
    assert cond.transparency == pytest.approx(transparency, abs=1e-9)
    assert cond.area_cm2 == pytest.approx(area, rel=1e-9)
    assert cond.area_cm2 < inst.DEFAULT_AREA_CM2  # off-centre tracker
    assert (cond.transparency_source, cond.area_source) == ("guider", "guider")
    assert cond.n_frames == 14  # 7 per camera inside the window; the corrupt one not read
    assert any(bad.name in n and "unreadable" in n for n in cond.notes)
    assert any(bad.name in r.getMessage() for r in caplog.records)
    # an aware start time gives the same answer as a naive UTC one
    aware = fluxcal.guider_conditions(night, start.replace(tzinfo=dt.timezone.utc), 120.0)
    assert aware.transparency == cond.transparency
    assert aware.area_cm2 == cond.area_cm2


def test_guider_conditions_outside_any_frame(guided_night):
    night, start, *_ = guided_night
    cond = fluxcal.guider_conditions(night, start + dt.timedelta(hours=2), 300.0)
    assert cond.transparency == 1.0
    assert cond.area_cm2 == inst.DEFAULT_AREA_CM2
    assert cond.n_frames == 0
    assert (cond.transparency_source, cond.area_source) == ("default", "default")
    assert any("no guider frames during the exposure" in n for n in cond.notes)


def test_guider_conditions_no_guider_folder(good_archives):
    night = NightIndex(good_archives["dir"], DATE)
    exposure = night.exposures(ftype="sci")[0]
    cond = fluxcal.guider_conditions(night, exposure.time, exposure.exptime)
    assert cond.transparency == 1.0
    assert cond.area_cm2 == inst.DEFAULT_AREA_CM2
    assert (cond.transparency_source, cond.area_source) == ("default", "default")
    assert len(cond.notes) == 2
    assert all("no guider frames for night 20181108" in n for n in cond.notes)
    assert "transparency 1.0" in cond.notes[0] and "default area" in cond.notes[1]


def test_guider_conditions_frames_without_cards(good_archives):
    """Guider frames during the exposure that lack GUIDLOOP, TRANSPAR and tracker cards."""
    night = NightIndex(good_archives["tar"], DATE)
    exposure = night.exposures(ftype="sci")[0]
    cond = fluxcal.guider_conditions(night, exposure.time, exposure.exptime)
    assert cond.n_frames == 3
    assert (cond.transparency, cond.area_cm2) == (1.0, inst.DEFAULT_AREA_CM2)
    assert any("GUIDLOOP=ACTIVE" in n for n in cond.notes)


def test_guider_conditions_simulated_night(sim_night):
    """Against the simulator's truth for the standards and the science exposure."""
    truth = sim_night.night_truth()
    night = NightIndex(sim_night.baseraw, sim_night.date)
    exposures = {(e.obsid, e.exp): e for e in night.exposures(ftype="sci")}
    # the simulator writes guider frames as real ones are
    with fits.open(io.BytesIO(night.read_bytes(night.guider_files()[0]))) as hdul:
        assert len(hdul) == 2 and hdul[1].data.shape == (32, 32)
        assert {"GUIDLOOP", "MJD", "TRANSPAR"} <= set(hdul[1].header)
        assert not {"GUIDLOOP", "TRANSPAR"} & set(hdul[0].header)
        assert {"RHO_STRT", "THE_STRT", "PHI_STRT", "X_STRT", "Y_STRT"} <= set(hdul[0].header)
    checked = 0
    for plan in truth["exposures"]:
        if plan["kind"] not in ("standard", "science"):
            continue
        exposure = exposures[(plan["obsid"], plan["exp"])]
        assert exposure.time == dt.datetime.fromisoformat(plan["start"]).replace(
            tzinfo=dt.timezone.utc)
        cond = fluxcal.guider_conditions(night, exposure.time, exposure.exptime)
        assert cond.notes == []
        assert cond.transparency == pytest.approx(plan["transparency"], abs=0.01)
        assert cond.area_cm2 == pytest.approx(plan["area_cm2"], rel=0.01)
        assert cond.n_frames == 2 * (int(plan["exptime"] // 15) + 1)
        checked += 1
    assert checked == 3
    # the night does carry glitches inside exposures: they must not have been averaged in
    glitches = [g for g in truth["guider"] if g["guidloop"] == "ACTIVE"
                and not 0.1 <= g["transpar"] <= 1.1]
    assert glitches


# --------------------------------------------------------------------------- standards


def test_standard_file_and_read_round_trip(tmp_path):
    path = simnight.write_standard(tmp_path, STANDARD)
    assert fluxcal.standard_file(tmp_path, STANDARD) == path
    assert fluxcal.standard_file(tmp_path, "feige-34") == path
    assert path.name == fluxcal.standard_filename("FEIGE_34") == "mfeige34.dat.txt"
    assert fluxcal.standard_file(tmp_path, "GD50") is None
    assert fluxcal.standard_file(tmp_path / "missing", STANDARD) is None
    wave, flam = fluxcal.read_standard(path)
    assert wave[0] == 3500.0 and np.all(np.diff(wave) == 2.0)
    expected = sp.standard_flambda(STANDARD, wave)
    np.testing.assert_allclose(flam, expected, rtol=1e-4)  # AB mag written to 1e-4


def test_standard_case_insensitive(tmp_path):
    (tmp_path / "MFEIGE34.DAT.TXT").write_text("4000 11.0\n5000 11.1\n")
    assert fluxcal.standard_file(tmp_path, STANDARD).name == "MFEIGE34.DAT.TXT"


@pytest.mark.parametrize("content", ["", "# only a comment\n", "4000 abc\n5000 11\n",
                                     "4000\n5000\n", "4000 11.0\n"])
def test_read_standard_bad_files(tmp_path, content):
    path = tmp_path / "mbad.dat.txt"
    path.write_text(content)
    with pytest.raises(PanaceaError, match="mbad.dat.txt"):
        fluxcal.read_standard(path)


def test_read_standard_missing(tmp_path):
    with pytest.raises(PanaceaError, match="mnone.dat.txt"):
        fluxcal.read_standard(tmp_path / "mnone.dat.txt")


# --------------------------------------------------------------------------- response


def observed_rate(ch: inst.Channel, plan: simnight.ExposurePlan) -> np.ndarray:
    """Noise-free count rate of the standard on the channel grid (e-/s/A), from the
    simulator's formulas: its true F_lambda through a Gaussian line spread of 4.3 px FWHM
    (px = the channel's local dispersion) and a one-pixel box, averaged over the grid bins,
    turned into electrons by ``photons_per_angstrom``."""
    step_f = 0.05
    wide = np.arange(3500.0, 10700.0, step_f)  # the reference's normalisation range
    wf = np.arange(ch.wave_lo - 60, ch.wave_hi + 60, step_f)
    f = np.interp(wf, wide, sp.standard_flambda(STANDARD, wide))
    binned = binned_through_lsf(ch, wf, f)
    return simnight.photons_per_angstrom(ch, ch.grid, binned, plan) / plan.exptime


@pytest.fixture(scope="module")
def standard_obs(tmp_path_factory):
    """Reference spectrum read back from the simulator's file, the plan, and per channel the
    noisy rate (Poisson + a background of 3e4 e- per pixel), its variance and the truth."""
    folder = tmp_path_factory.mktemp("standards")
    ref = fluxcal.read_standard(simnight.write_standard(folder, STANDARD))
    plan = simnight.ExposurePlan(7, 1, "sci", f"{STANDARD}_056_E", 180.0,
                                 "2018-11-08T02:00:00", "standard", transparency=0.9,
                                 area_cm2=4.8e5)
    rng = np.random.default_rng(2024)
    out = {}
    for ch in inst.channels().values():
        rate = observed_rate(ch, plan)
        step = ch.grid[1] - ch.grid[0]
        var = (rate * plan.exptime * step + 3e4) / (plan.exptime * step) ** 2
        noisy = rate + rng.standard_normal(rate.size) * np.sqrt(var)
        out[ch.name] = (rate, noisy, var, sp.response(ch, ch.grid))
    return ref, plan, out


MEASURED: dict[str, tuple[float, float, float]] = {}


@pytest.mark.parametrize("name", ["uv", "orange", "red", "farred"])
@pytest.mark.parametrize("noisy", [False, True], ids=["clean", "noisy"])
def test_derive_response_matches_simulator(standard_obs, name, noisy):
    (rw, rf), plan, data = standard_obs
    rate, noisy_rate, var, truth = data[name]
    ch = inst.get_channel(name)
    fit = fluxcal.derive_response(ch.grid, noisy_rate if noisy else rate, var, rw, rf,
                                  ch.resolution, plan.area_cm2, plan.transparency)
    q = fit.response / truth
    median, rms = float(np.median(q) - 1), float(np.std(q - 1))
    MEASURED[f"{name}-{'noisy' if noisy else 'clean'}"] = (median, rms, fit.rms)
    assert abs(median) < 0.005
    assert rms < 0.02
    assert np.max(np.abs(q - 1)) < 0.01
    assert fit.rms < 0.02
    # clipping leaves at least 80 % of the pixels outside the masked stellar and telluric bands
    free = np.ones(ch.grid.size, bool)
    for band in fit.masked:
        free &= ~((ch.grid >= band.lo) & (ch.grid <= band.hi))
    assert free.sum() > 0.5 * ch.grid.size
    assert fit.used[free].sum() > 0.8 * free.sum()
    np.testing.assert_allclose(np.nanmedian(fit.ratio / truth), 1.0, atol=0.005)


@pytest.mark.parametrize("name", ["orange", "red"])
def test_derive_response_resists_sky_residuals(standard_obs, name):
    """10 % residuals on every sky line bend an unclipped fit by > 2 %; clipping keeps < 1 %."""
    (rw, rf), plan, data = standard_obs
    _, noisy_rate, var, truth = data[name]
    ch = inst.get_channel(name)
    spiky = noisy_rate.copy()
    rng = np.random.default_rng(3)
    for line in inst.sky_lines():
        if ch.wave_lo + 5 < line.wavelength < ch.wave_hi - 5:
            j = int(np.argmin(np.abs(ch.grid - line.wavelength)))
            spiky[j - 2: j + 3] *= 1 + rng.choice([-1, 1]) * 0.1
    args = (ch.grid, spiky, var, rw, rf, ch.resolution, plan.area_cm2, plan.transparency)
    clipped = fluxcal.derive_response(*args)
    unclipped = fluxcal.derive_response(*args, nsigma=np.inf)
    assert np.max(np.abs(unclipped.response / truth - 1)) > 0.02
    assert np.max(np.abs(clipped.response / truth - 1)) < 0.01
    assert clipped.n_clipped > 20


def test_derive_response_mask_and_errors(standard_obs):
    (rw, rf), plan, data = standard_obs
    rate, _, var, truth = data["uv"]
    ch = inst.get_channel("uv")
    mask = np.zeros(ch.grid.size, bool)
    mask[1000:1100] = True
    bad = rate.copy()
    bad[1000:1100] *= 3  # masked: must not matter
    var = var.copy()
    var[5:8] = 0.0  # zero variance: not used
    fit = fluxcal.derive_response(ch.grid, bad, var, rw, rf, ch.resolution, plan.area_cm2,
                                  plan.transparency, mask=mask)
    assert not fit.used[1000:1100].any() and not fit.used[5:8].any()
    assert np.all(np.isnan(fit.ratio[1000:1100]))
    assert np.max(np.abs(fit.response / truth - 1)) < 0.005
    with pytest.raises(PanaceaError, match="usable"):
        fluxcal.derive_response(ch.grid, rate, np.zeros_like(rate), rw, rf, ch.resolution,
                                plan.area_cm2, plan.transparency)
    with pytest.raises(PanaceaError, match="usable"):  # reference far from the channel
        fluxcal.derive_response(ch.grid, rate, var, rw + 6000, rf, ch.resolution,
                                plan.area_cm2, plan.transparency)
    with pytest.raises(ValueError):
        fluxcal.derive_response(ch.grid, rate, var, rw, rf, ch.resolution, 0.0, 0.9)


def test_convolve_reference_resolution():
    """A narrow Gaussian absorption line comes out with the expected width and depth."""
    wave = np.arange(4000.0, 6000.0, 0.1)
    sigma0, depth0 = 1.0, 0.5
    flam = 1 - depth0 * np.exp(-0.5 * ((wave - 5000.0) / sigma0) ** 2)
    grid = np.linspace(4500.0, 5500.0, 4001)  # 0.25 A pixels
    resolution = 1500.0
    out = fluxcal.convolve_reference(grid, wave, flam, resolution)
    sigma_r = 5000.0 / resolution / 2.3548
    sigma = np.sqrt(sigma0**2 + sigma_r**2 + 0.25**2 / 12)
    assert 1 - out.min() == pytest.approx(depth0 * sigma0 / sigma, rel=0.01)
    assert np.sum(1 - out) * 0.25 == pytest.approx(depth0 * sigma0 * np.sqrt(2 * np.pi),
                                                   rel=0.01)
    assert np.all(np.isnan(fluxcal.convolve_reference(grid + 2000, wave, flam, resolution)
                           [-100:]))


# --------------------------------------------------------------------------- files


def test_response_file_round_trip(tmp_path):
    ch = inst.get_channel("red")
    resp = sp.response(ch, ch.grid)
    path = fluxcal.write_response(tmp_path / "response_red.fits", ch.grid, resp,
                                  {"CHANNEL": "red", "STANDARD": STANDARD})
    with fits.open(path) as hdul:
        assert hdul[0].data.shape == (2, inst.GRID_POINTS)
        assert hdul[0].data.dtype == np.dtype(">f8")
        assert hdul[0].header["BUNIT"] == fluxcal.RESPONSE_UNIT
        assert hdul[0].header["STANDARD"] == STANDARD
    data = fluxcal.read_response(path)
    np.testing.assert_array_equal(data, np.stack([ch.grid, resp]))
    np.testing.assert_array_equal(fluxcal.read_response(path, ch.grid), resp)
    sub = np.linspace(7000.0, 8000.0, 333)
    np.testing.assert_allclose(fluxcal.read_response(path, sub), sp.response(ch, sub),
                               rtol=1e-6)
    np.testing.assert_array_equal(fluxcal.response_from_dir(tmp_path, "red", ch.grid), resp)
    assert fluxcal.response_from_dir(tmp_path, "uv", inst.get_channel("uv").grid) is None
    with pytest.raises(PanaceaError, match="response_red.fits"):
        fluxcal.read_response(path, inst.get_channel("farred").grid)


@pytest.mark.parametrize("kind", ["shape", "decreasing", "negative", "nan", "empty", "junk"])
def test_read_response_malformed(tmp_path, kind):
    path = tmp_path / f"response_{kind}.fits"
    wave = np.linspace(4000.0, 5000.0, 50)
    resp = np.full(50, 1e-17)
    data = {
        "shape": np.stack([wave, resp, resp]),
        "decreasing": np.stack([wave[::-1], resp]),
        "negative": np.stack([wave, -resp]),
        "nan": np.stack([wave, np.where(wave > 4500, np.nan, resp)]),
        "empty": None,
    }
    if kind == "junk":
        path.write_bytes(b"SIMPLE  = nonsense" * 50)
    else:
        fits.PrimaryHDU(data[kind]).writeto(path)
    with pytest.raises(PanaceaError, match=path.name):
        fluxcal.read_response(path)
    with pytest.raises(PanaceaError, match=path.name):
        fluxcal.response_from_dir(tmp_path, kind, wave)


def test_flux_calibrate():
    ch = inst.get_channel("orange")
    resp = sp.response(ch, ch.grid)
    flam = sp.standard_flambda(STANDARD, ch.grid)
    rate = flam * 4.5e5 * 0.8 / resp  # e-/s/A
    rates = np.stack([rate, 2 * rate])
    errs = np.stack([np.sqrt(rate), np.zeros_like(rate)])
    f, e = fluxcal.flux_calibrate(rates, errs, resp, 4.5e5, 0.8)
    np.testing.assert_allclose(f[0], flam, rtol=1e-12)
    np.testing.assert_allclose(f[1], 2 * flam, rtol=1e-12)
    np.testing.assert_allclose(e[0], np.sqrt(rate) * resp / (4.5e5 * 0.8), rtol=1e-12)
    assert np.all(e[1] == 0)
    with pytest.raises(ValueError):
        fluxcal.flux_calibrate(rate, rate, resp, 4.5e5, 0.0)


@pytest.mark.parametrize("channel", ["uv", "orange", "red", "farred"])
def test_bundled_default_response_is_the_simulated_instruments(channel):
    from panacea import instrument
    from panacea.fluxcal import default_response
    from panacea.simulate.spectra import response

    ch = instrument.get_channel(channel)
    resp = default_response(channel, ch.grid)
    assert resp is not None and resp.shape == ch.grid.shape and np.all(resp > 0)
    ratio = resp / response(ch, ch.grid)
    assert np.median(ratio[50:-50]) == pytest.approx(1.0, abs=0.02)
    assert np.std(ratio[50:-50]) < 0.02
