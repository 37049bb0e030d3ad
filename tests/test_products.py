"""Product layouts: the multi file keeps the order downstream tools read by position."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from panacea.products import (
    MULTI_LAYOUT,
    ProductError,
    multi_name,
    product_folder,
    read_product,
    write_product,
)


def test_multi_layout_order():
    assert MULTI_LAYOUT.names == (
        "observed_spectra", "sky_spectra", "skysub_spectra", "error_spectra", "collapsed_image",
        "fiber_positions", "extracted_spectrum", "adr", "bigw", "image", "flattened_image",
        "trace", "cosmics", "unrectified_spectra")
    assert multi_name("20181108", 12, 1, "uv") == "multi_20181108_0000012_exp01_uv.fits"


def test_product_folders(tmp_path):
    assert product_folder(tmp_path, "HET18-2-100", False) == tmp_path / "HET18-2-100"
    assert product_folder(tmp_path, None, True) == tmp_path / "STANDARDS"
    assert product_folder(tmp_path, None, False) == tmp_path / "ORPHANS"


def test_round_trip_keeps_raw_cards_and_units(tmp_path):
    raw = fits.Header()
    raw["OBJECT"] = "SN2018abc"
    raw["EXPTIME"] = 900.0
    raw["BZERO"] = 32768  # raw uint16 layout cards must not reach the float product
    raw["BSCALE"] = 1
    spectra = np.ones((280, 2064))
    path = write_product(MULTI_LAYOUT, {"observed_spectra": spectra,
                                        "cosmics": np.zeros((4, 4), bool)},
                         tmp_path / "m.fits", raw, options={"sky": "spline"})
    with fits.open(path) as hdul:
        assert [h.name.lower() for h in hdul] == list(MULTI_LAYOUT.names)
        assert hdul[0].data.dtype == np.dtype(">f4")
        assert hdul[12].data.dtype == np.uint8
        assert all(h.header["BUNIT"] is not None for h in hdul)
    arrays, header = read_product(MULTI_LAYOUT, path)
    assert header["OBJECT"] == "SN2018abc" and header["PAN OPT SKY"] == "spline"
    assert np.array_equal(arrays["observed_spectra"], spectra)
    assert "BZERO" not in header
    with pytest.raises(ValueError):
        write_product(MULTI_LAYOUT, {"nonsense": spectra}, tmp_path / "x.fits")
    with fits.open(path, mode="update") as hdul:
        hdul[0].header["MULTIVER"] = 0
    with pytest.raises(ProductError, match="layout version"):
        read_product(MULTI_LAYOUT, path)


def test_compressed_images_keep_wavelengths_exact_and_frames_within_the_step(tmp_path):
    from panacea.products import NOISE_STEP

    rng = np.random.default_rng(2)
    bigw = (3640.0 + np.cumsum(np.full((64, 2064), 0.487), axis=1)
            + rng.normal(0, 0.01, (64, 1))).astype(np.float32)
    image = rng.normal(100.0, 3.0, (64, 2064)).astype(np.float32)
    image[10, 10] = 6.0e4  # a saturated star or cosmic ray keeps its value
    path = write_product(MULTI_LAYOUT, {"bigw": bigw, "image": image,
                                        "cosmics": (image > 110).astype(np.uint8)},
                         tmp_path / "c.fits")
    with fits.open(path) as hdul:
        assert isinstance(hdul["BIGW"], fits.CompImageHDU)
        assert np.array_equal(hdul["BIGW"].data, bigw)
        err = hdul["IMAGE"].data - image
        assert np.abs(err).max() <= 0.5 * NOISE_STEP + 1e-3
        assert np.std(err) < 0.1
        assert np.array_equal(hdul["COSMICS"].data, (image > 110).astype(np.uint8))


def test_frozen_array_is_compressed_once_and_reads_back_the_same(tmp_path, monkeypatch):
    import panacea.products as products

    bigw = (3640.0 + np.cumsum(np.full((64, 2064), 0.487), axis=1)).astype(np.float32)
    bigw.flags.writeable = False  # as ChannelCalibration holds it
    calls = []
    real = products._compressed
    monkeypatch.setattr(products, "_compressed",
                        lambda data, kind: calls.append(kind) or real(data, kind))
    paths = [write_product(MULTI_LAYOUT, {"bigw": bigw}, tmp_path / f"f{i}.fits",
                           units={"bigw": f"unit{i}"}) for i in range(2)]
    assert calls == ["wavelength"]
    for i, path in enumerate(paths):
        with fits.open(path, checksum=True) as hdul:
            hdu = hdul["BIGW"]
            assert isinstance(hdu, fits.CompImageHDU)
            assert np.array_equal(hdu.data, bigw)
            assert hdu.header["BUNIT"] == f"unit{i}"
            assert list(hdu.header["COMMENT"]) == [MULTI_LAYOUT.extensions[8].description]
    # a writeable array (or a read-only view of one) is compressed every time
    live = np.array(bigw)
    for data in (live, live.view()):
        data.flags.writeable = data is live
        write_product(MULTI_LAYOUT, {"bigw": data}, tmp_path / "g.fits")
    assert calls == ["wavelength"] * 3
