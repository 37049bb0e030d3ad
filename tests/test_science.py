"""Science exposures through the command line into multi_*.fits, against simulator truth."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

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
    assert header["OBJECT"].startswith("FEIGE_34") and header["FLUXCAL"] is False
    with fits.open(reduced / "STANDARDS" / multi_name(sim_night.date, 8, 1, "red")) as hdul:
        assert hdul["OBSERVED_SPECTRA"].header["BUNIT"] == "electron / (s Angstrom)"
        assert hdul[0].header["PANVER"] and hdul[0].header["CALFILE"].endswith("_red.fits")


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
