"""Science exposures through the command line into multi_*.fits, against simulator truth."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from panacea import instrument
from panacea.products import MULTI_LAYOUT, multi_name, read_product
from panacea.simulate.truth import load_exposure


def _multi(reduced, sim_night, folder, obsid, channel):
    path = reduced / folder / multi_name(sim_night.date, obsid, 1, channel)
    assert path.exists(), path
    return read_product(MULTI_LAYOUT, path)


def test_products_land_in_the_program_tree(reduced, sim_night):
    for channel in ("uv", "orange", "red", "farred"):
        _multi(reduced, sim_night, "HET18-2-100", 12, channel)
        _multi(reduced, sim_night, "STANDARDS", 7, channel)
    _, header = _multi(reduced, sim_night, "STANDARDS", 8, "red")
    assert header["OBJECT"].startswith("FEIGE_34") and header["FLUXCAL"] is True
    with fits.open(reduced / "STANDARDS" / multi_name(sim_night.date, 8, 1, "red")) as hdul:
        assert hdul["OBSERVED_SPECTRA"].header["BUNIT"] == "erg / (s cm2 Angstrom)"
        assert hdul[0].header["PANVER"] and hdul[0].header["CALFILE"].endswith("_red.fits")
        assert hdul[0].header["RESPSRC"].startswith("FEIGE_34")
        assert np.isfinite(hdul["FIBER_POSITIONS"].data[:, 4:]).all()  # RA, Dec


@pytest.mark.parametrize("channel", ["uv", "orange", "red", "farred"])
def test_point_source_position_seeing_and_flux(reduced, sim_night, channel):
    """Science target: PSF fit and flux-calibrated spectrum (response from the night's
    standard) against the truth."""
    from astropy.io import fits as _fits

    from panacea.simulate.night import ExposurePlan, dar_offsets
    from panacea.source import sky_line_mask

    plan = ExposurePlan(**next(p for p in sim_night.night_truth()["exposures"]
                               if p["obsid"] == 12))
    path = reduced / "HET18-2-100" / f"spectrum_{sim_night.date}_0000012_exp01_{channel}.fits"
    with _fits.open(path) as hdul:
        spec, head = hdul[0].data.astype(float), hdul[0].header
    ref = head["SOURCEW"]
    dx, dy = dar_offsets(plan, np.array([ref]))
    err = np.hypot(head["SOURCEX"] - plan.source_xy[0] - dx[0],
                   head["SOURCEY"] - plan.source_xy[1] - dy[0])
    assert err < 0.05
    assert head["SEEING"] / (plan.seeing * (ref / 5000) ** -0.2) == pytest.approx(1, abs=0.05)
    w, f = np.loadtxt(sim_night.baseraw / "truth" / sim_night.date / "spectra" / "science.txt",
                      unpack=True)
    good = (spec[3] > 0) & ~sky_line_mask(spec[2][None, :], 1.05)
    good[:60] = good[-60:] = False
    ratio = spec[1][good] / np.interp(spec[0][good], w, f)
    assert head["FLUXCAL"] is True
    assert np.median(ratio) == pytest.approx(1.0, abs=0.03)


def test_cubes_and_joined_spectrum(reduced, sim_night):
    from astropy.table import Table
    from astropy.wcs import WCS

    folder = reduced / "HET18-2-100"
    with fits.open(folder / f"{sim_night.date}_0000012_exp01_orange_skysub_cube.fits") as hdul:
        cube = hdul["DATA"].data
        wcs = WCS(hdul["DATA"].header)
        assert cube.shape[0] == 2064 and wcs.naxis == 3
        world = wcs.pixel_to_world(10, 10, 100)
        assert world[1].to("Angstrom").value == pytest.approx(
            instrument.get_channel("orange").grid[100], abs=0.01)
    t = Table.read(folder / f"joined_{sim_night.date}_0000012.fits")
    wave, flux, chan = (np.asarray(t[k], float) for k in ("wavelength", "flux", "channel"))
    assert wave[0] < 3700 and wave[-1] > 10400 and np.all(np.diff(wave) > 0)
    for k in range(3):
        left = np.median(flux[chan == k][-30:])
        right = np.median(flux[chan == k + 1][:30])
        assert right / left == pytest.approx(1.0, abs=0.1)


@pytest.mark.parametrize("channel", ["uv", "orange", "farred"])
def test_extraction_and_sky_against_truth(reduced, sim_night, channel):
    arrays, header = _multi(reduced, sim_night, "HET18-2-100", 12, channel)
    plan = next(p for p in sim_night.night_truth()["exposures"] if p["obsid"] == 12)
    truth = load_exposure(sim_night.baseraw, sim_night.date, 12, 1, channel)
    t = sim_night.truth(channel)
    live = ~t.dead
    cols = slice(100, 1964)
    # trace shift measured, cosmic rays found
    assert header["EXPSHIFT"] == pytest.approx(plan["trace_shift"], abs=0.02)
    cr = truth["cosmic"].astype(bool)
    assert arrays["cosmics"][cr].mean() > 0.85
    # native-pixel optimal extraction against the true electrons (sky + source)
    flux = arrays["unrectified_spectra"][live, cols]
    true = (truth["sky"] + truth["source"])[live, cols]
    assert np.sum(flux) / np.sum(true) == pytest.approx(1.0, abs=0.005)
    # sky fibers: sky-subtracted, rectified spectra are noise around zero
    skyfib = live & (truth["source"].sum(1) < 0.01 * truth["sky"].sum(1))
    sub = arrays["skysub_spectra"][skyfib][:, cols]
    err = arrays["error_spectra"][skyfib][:, cols]
    sky = arrays["sky_spectra"][skyfib][:, cols]
    good = err > 0
    z = sub[good] / err[good]
    assert 0.85 < np.std(z) < 1.2
    assert abs(np.sum(sub[good])) < 0.01 * np.sum(sky[good])


@pytest.mark.parametrize(("obsid", "channel", "tol"), [(8, "uv", 0.015), (7, "farred", 0.01)])
def test_faint_sky_of_an_empty_arm_is_unbiased(reduced, sim_night, obsid, channel, tol):
    """180 s standard exposures leave the other arm's IFU on blank sky (2 e- per column in
    uv). Weights that followed the data's noise made that sky 11 % too bright in uv, a free
    additive term per fiber made its lines 18 % too faint."""
    arrays, _ = _multi(reduced, sim_night, "STANDARDS", obsid, channel)
    truth = load_exposure(sim_night.baseraw, sim_night.date, obsid, 1, channel)
    assert not truth["source"].any()
    live = ~sim_night.truth(channel).dead
    cols = slice(100, 1964)
    sub = arrays["skysub_spectra"][live][:, cols]
    sky = arrays["sky_spectra"][live][:, cols]
    good = arrays["error_spectra"][live][:, cols] > 0
    assert abs(np.sum(sub[good])) < tol * np.sum(sky[good])
    # the sky's lines: pixels well above the fiber's running median
    lines = good & (sky > 1.3 * np.median(sky, axis=1, keepdims=True))
    excess = np.sum(sky[lines] - np.median(sky, axis=1, keepdims=True)
                    .repeat(sky.shape[1], axis=1)[lines])
    assert abs(np.sum(sub[lines])) < 0.1 * excess


def test_without_standard_or_response_the_unit_says_so(reduced, sim_night, tmp_path, caplog):
    """No reference spectrum, no --response-dir and no default: the spectra stay in
    electron/s/cm2/Angstrom, the header and the log say why; then a --response-dir
    response is used and said to be used."""
    import logging
    import shutil

    from panacea.cli import main
    from panacea.fluxcal import response_filename, write_response

    out = tmp_path / "out"
    shutil.copytree(reduced / "CALS", out / "CALS")  # bundles are reused, not rebuilt
    empty = tmp_path / "no_standards"
    empty.mkdir()
    base = ["-d", sim_night.date, "-s", "orange", "--baseraw", str(sim_night.baseraw),
            "--standards-dir", str(empty), "-o", "SN2018"]
    with caplog.at_level(logging.WARNING):
        assert main([*base, "--output", str(out), "--no-default-response"]) == 0
    assert "no reference spectrum" in caplog.text and "stay in electron" in caplog.text
    path = out / "HET18-2-100" / f"spectrum_{sim_night.date}_0000012_exp01_orange.fits"
    with fits.open(path) as hdul:
        assert hdul[0].header["FLUXCAL"] is False
        assert hdul[0].header["BUNIT"] == "electron / (s cm2 Angstrom)"
        rate = hdul[0].data[1].copy()
    grid = instrument.get_channel("orange").grid
    rdir = tmp_path / "responses"
    write_response(rdir / response_filename("orange"), grid, np.full(grid.size, 2e-17))
    out2 = tmp_path / "out2"
    shutil.copytree(reduced / "CALS", out2 / "CALS")
    assert main([*base, "--output", str(out2), "--response-dir", str(rdir)]) == 0
    with fits.open(out2 / "HET18-2-100" / path.name) as hdul:
        assert hdul[0].header["FLUXCAL"] is True
        assert hdul[0].header["RESPSRC"].startswith(str(rdir)[:20])
        np.testing.assert_allclose(hdul[0].data[1], rate * 2e-17, rtol=1e-5, atol=1e-22)


def test_bad_science_frames_are_named_skipped_or_flagged(reduced, sim_night, fakeraw,
                                                        tmp_path, caplog):
    """A science frame missing one amplifier, one with EXPTIME 0 and one saturated over a
    large area: the first two are skipped with a message naming the file, the third is
    reduced and flagged in its header, and the rest of the night is reduced."""
    import logging
    import shutil

    from panacea.cli import main

    def exptime_zero(name, hdul):
        hdul[0].header["EXPTIME"] = 0.0

    def drop_red_amp(name, hdul):
        return False if "_066LU_" in name else None

    def saturate_farred(name, hdul):
        if "_066RU_" in name:
            hdul[0].data[:300] = 65535  # ~15 % of the channel's pixels

    base = fakeraw.copy_night(sim_night.baseraw, sim_night.date, tmp_path / "raw",
                              edit={7: exptime_zero, 12: drop_red_amp, 8: saturate_farred})
    out = tmp_path / "out"
    for ch in ("red", "farred"):  # the bundles are reused, not rebuilt
        (out / "CALS").mkdir(parents=True, exist_ok=True)
        name = f"cal_{sim_night.date}_{ch}.fits"
        shutil.copy(reduced / "CALS" / name, out / "CALS" / name)
    with caplog.at_level(logging.WARNING):
        rc = main(["-d", sim_night.date, "-s", "red,farred", "--baseraw", str(base),
                   "--output", str(out)])
    assert rc == 1  # exposures were lost: the exit status says so (issue 13)
    import json

    summary = json.loads((out / "NIGHTS" / sim_night.date / "summary.json").read_text())
    skipped = {(o["obsid"], o["channel"]): o for o in summary["outcomes"]
               if o["kind"] == "science" and o["status"] == "skipped"}
    assert set(skipped) == {(12, "red"), (7, "red"), (7, "farred")}
    assert "EXPTIME 0.0 is not a positive number" in skipped[7, "red"]["reason"]
    text = caplog.text
    assert "amplifier 066LU of channel red is missing (not in lrs20000012.tar)" in text
    assert "lrs20000007 exp01 red" in text and "EXPTIME 0.0 is not a positive number" in text
    assert "lrs20000007.tar" in text
    assert "lrs20000008 exp01 farred" in text and "saturated" in text

    def multi(folder, obsid, channel):
        return out / folder / multi_name(sim_night.date, obsid, 1, channel)

    assert not multi("HET18-2-100", 12, "red").exists()
    assert not multi("STANDARDS", 7, "red").exists()
    assert not multi("STANDARDS", 7, "farred").exists()
    assert multi("HET18-2-100", 12, "farred").exists()
    assert multi("STANDARDS", 8, "red").exists()
    _, header = read_product(MULTI_LAYOUT, multi("STANDARDS", 8, "farred"))
    assert header["SATFLAG"] is True and header["SATFRAC"] > 0.1
    _, header = read_product(MULTI_LAYOUT, multi("STANDARDS", 8, "red"))
    assert "SATFLAG" not in header
