"""The read contract of ``multi_*`` files, checked the way LRS2Multi reads them.

The tool opens a product by extension *position* (0 spectra, 3 errors with 0 = bad, 5 fiber
positions, 6 extracted spectrum, 7 refraction table of 3 rows), copies the primary header
card by card into a fresh header, reads a handful of cards, and sums fibers in an aperture
that follows the refraction track. Products of the simulated night must pass that with and
without a source.
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from panacea.products import CONTRACT_CARDS, MULTI_CONTRACT, multi_name

#: Aperture radius (arcsec) of the emulated extraction.
APERTURE = 1.5


def copy_cards(header: fits.Header) -> fits.Header:
    """Card-by-card copy into a fresh header, as the tool does (breaks on COMMENT/HISTORY)."""
    out = fits.Header()
    for key in header:
        out[key] = header[key]
    return out


def read_positionally(path) -> dict:
    """What a positional reader takes from a ``multi`` file; fails on any broken promise."""
    with fits.open(path) as f:
        header = copy_cards(f[0].header)
        for ext, (name, shape) in MULTI_CONTRACT.items():
            data = f[ext].data
            assert data is not None, f"{path.name}: extension {ext} ({name}) is empty"
            assert f[ext].name.lower() == name
            assert all(s == "n" or s == d for s, d in zip(shape, data.shape)), (
                f"{path.name}: extension {ext} has shape {data.shape}, promised {shape}")
        spectra = np.array(f[0].data, float)
        error = np.array(f[3].data, float)
        return {"header": header, "spectra": spectra, "error": error,
                "x": np.array(f[5].data[:, 0]), "y": np.array(f[5].data[:, 1]),
                "wave": np.array(f[6].data[0]), "response": np.array(f[6].data[-1]),
                "adr": np.array(f[7].data)}


def aperture_spectrum(product: dict, x0: float, y0: float, radius: float = APERTURE
                      ) -> np.ndarray:
    """Sum of the good fibers within ``radius`` of the source at every wavelength, the
    aperture moved along the refraction table (NaN where no good fiber is inside)."""
    wave, adr = product["wave"], product["adr"]
    dx = np.interp(wave, adr[0], adr[1])
    dy = np.interp(wave, adr[0], adr[2])
    data = np.where(product["error"] > 0, product["spectra"], np.nan)
    d2 = ((product["x"][:, None] - x0 - dx[None, :]) ** 2
          + (product["y"][:, None] - y0 - dy[None, :]) ** 2)
    inside = d2 <= radius**2
    good = inside & np.isfinite(data)
    total = np.where(good, data, 0.0).sum(axis=0) * inside.sum(axis=0) / np.maximum(
        good.sum(axis=0), 1)
    return np.where(good.any(axis=0), total, np.nan)


CASES = [("STANDARDS", 7, "uv", True), ("STANDARDS", 8, "uv", False),
         ("STANDARDS", 8, "orange", False), ("HET18-2-100", 12, "red", True),
         ("HET18-2-100", 12, "farred", True)]


@pytest.mark.parametrize("folder, obsid, channel, has_source", CASES)
def test_positional_reader_gets_finite_spectra(reduced, sim_night, folder, obsid, channel,
                                               has_source):
    path = reduced / folder / multi_name(sim_night.date, obsid, 1, channel)
    product = read_positionally(path)
    header = product["header"]
    for key in CONTRACT_CARDS:
        if key == "QPROG" and folder == "STANDARDS":
            continue  # standards have no program
        assert key in header, f"{path.name}: no {key} card"
    assert isinstance(header["QRA"], str) and header["QRA"].count(":") == 2
    assert header["QDEC"][0] in "+-" and isinstance(header["DATE"], str)
    assert header["TRANSSRC"] == header["AREASRC"] == "guider"
    assert ("SOURCEX" in header) == has_source
    assert np.array_equal(product["wave"], np.linspace(product["wave"][0],
                                                        product["wave"][-1], 2064))
    adr = product["adr"]
    assert adr.shape[0] == 3 and np.all(np.diff(adr[0]) > 0)
    assert adr[0, 0] == product["wave"][0] and adr[0, -1] == product["wave"][-1]
    assert np.abs(adr[1:]).max() < 2.0  # arcsec: a track, not wavelengths
    assert (product["response"] > 0).mean() > 0.9  # flux calibrated: response last
    x0, y0 = (header["SOURCEX"], header["SOURCEY"]) if has_source else (0.0, 0.0)
    spec = aperture_spectrum(product, x0, y0)
    assert np.isfinite(spec).mean() >= 0.95
    # offsets in the thousands of arcsec (what the n x 3 table of layout 1 gave the tool)
    # take the aperture off the IFU: the check can fail
    broken = dict(product, adr=np.vstack([adr[0], adr[0], adr[0]]))
    assert np.isfinite(aperture_spectrum(broken, x0, y0)).mean() < 0.5


def test_source_aperture_agrees_with_the_spectrum_product(reduced, sim_night):
    """The tool's aperture sum of the sky-subtracted fibers around the star follows the
    pipeline's PSF-weighted spectrum (the aperture holds most of the light)."""
    path = reduced / "STANDARDS" / multi_name(sim_night.date, 7, 1, "orange")
    product = read_positionally(path)
    with fits.open(path) as f:
        product["spectra"] = np.array(f[2].data, float)  # skysub_spectra
    header = product["header"]
    spec = aperture_spectrum(product, header["SOURCEX"], header["SOURCEY"], radius=2.5)
    with fits.open(path.with_name(path.name.replace("multi_", "spectrum_"))) as f:
        flux = f[0].data[1]
    ratio = np.nanmedian(spec[200:-200] / flux[200:-200])
    assert 0.85 < ratio < 1.02


def test_card_copy_fails_on_free_text():
    """The emulated card copy is as strict as the tool's: free text in the primary breaks it."""
    header = fits.Header({"OBJECT": "x"})
    header["COMMENT"] = "a note"
    with pytest.raises(Exception):  # noqa: B017 - whatever the tool hits
        copy_cards(header)


def test_every_product_carries_the_queue_cards(reduced, sim_night):
    folder = reduced / "HET18-2-100"
    names = [multi_name(sim_night.date, 12, 1, "orange"),
             f"spectrum_{sim_night.date}_0000012_exp01_orange.fits",
             f"{sim_night.date}_0000012_exp01_orange_skysub_cube.fits",
             f"joined_{sim_night.date}_0000012.fits"]
    for name in names:
        header = fits.getheader(folder / name)
        assert {"COMMENT", "HISTORY"}.isdisjoint(header.keys()), name
        assert header["QOBJECT"] == "SN2018abc" and header["QRA"] == "03:29:12.00", name
        assert header["QDEC"] == "-00:24:00.0" and header["QPROG"] == "HET18-2-100", name
        assert header["DATE"].startswith("2018-11-08T03:00:00"), name
        assert "derived" not in header.comments["QRA"]  # the raw frames carry them now
    for name in ("obs", "sky"):  # the default --cubes writes the sky-subtracted cube only
        assert not (folder / f"{sim_night.date}_0000012_exp01_orange_{name}_cube.fits").exists()
