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
    assert not {"COMMENT", "HISTORY"} & set(fits.getheader(path))
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


def test_compressed_extensions_read_back_within_their_stated_bounds(tmp_path):
    from panacea.products import ERROR_FRACTION, FRAME_STEP, SIGMA_FRACTION, TRACE_STEP

    rng = np.random.default_rng(2)
    sigma = np.full((280, 2064), 0.05)
    sigma[:, :100] = 0.01  # a noisier and a quieter part of every fiber
    sigma[7, 300:310] = 0.0  # bad pixels: the zeros must stay exact
    sky = 10.0 + np.sin(np.arange(2064) / 30.0)[None, :] * np.ones((280, 1))
    obs = sky + rng.normal(0.0, sigma)
    obs[5, 50] = np.nan
    trace = 40.0 + 7.0 * np.arange(280)[:, None] + 1e-4 * np.arange(2064)[None, :]
    image = rng.normal(100.0, 3.0, (64, 2064)).astype(np.float32)
    image[10, 10] = 6.0e4  # a saturated star or cosmic ray keeps its value
    header = fits.Header({"OBJECT": "x", "CALFILE": "cal_20181108_uv.fits"})
    header["HISTORY"] = "a note"
    path = write_product(MULTI_LAYOUT, {"skysub_spectra": obs, "error_spectra": sigma,
                                        "trace": trace, "image": image,
                                        "cosmics": (image > 110).astype(np.uint8)},
                         tmp_path / "c.fits", header)
    with fits.open(path) as hdul:
        assert isinstance(hdul["IMAGE"], fits.CompImageHDU)
        err = hdul["IMAGE"].data - image
        assert np.abs(err).max() <= 0.5 * FRAME_STEP + 1e-3
        assert 0.1 < np.std(err) < 0.2  # dithered: uniform over the step
        assert np.array_equal(hdul["COSMICS"].data, (image > 110).astype(np.uint8))
        # plus the float32 spacing of the readback (1.2e-4 px near row 2000)
        assert np.abs(hdul["TRACE"].data - trace).max() <= 0.5 * TRACE_STEP + 1.3e-4
        assert np.array_equal(hdul["ERROR_SPECTRA"].data == 0, sigma == 0)
        # steps of a fraction of the 1st percentile of the errors (0.01 here)
        assert hdul["ERROR_SPECTRA"].header["QSTEP"] == pytest.approx(0.01 * ERROR_FRACTION)
        # half a step, plus the float32 spacing of the values
        np.testing.assert_allclose(hdul["ERROR_SPECTRA"].data, sigma, rtol=0,
                                   atol=0.51 * 0.01 * ERROR_FRACTION)
        sub = hdul["SKYSUB_SPECTRA"].data
        assert np.isnan(sub[5, 50]) and np.isfinite(sub).sum() == obs.size - 1
        with np.errstate(divide="ignore", invalid="ignore"):
            change = (sub - obs) / sigma
        assert np.nanmax(np.abs(change[:, :100])) <= 0.51 * SIGMA_FRACTION
        assert np.nanstd(change[:, :100]) == pytest.approx(SIGMA_FRACTION / np.sqrt(12),
                                                           rel=0.1)  # dithered
        assert hdul["BIGW"].data is None and hdul["BIGW"].header["CALEXT"] == "bigw"
        assert hdul["BIGW"].header["CALFILE"] == "cal_20181108_uv.fits"
        assert "HISTORY" not in hdul[0].header and "COMMENT" not in hdul[0].header
        assert "a note" in list(hdul[1].header["HISTORY"])


def test_queue_cards_are_derived_from_the_raw_cards_and_say_so():
    from panacea.products import complete_header

    raw = fits.Header({"OBJECT": "SN2018abc", "TRAJRA": 52.3, "TRAJDEC": -0.4,
                       "DATE-OBS": "2018-11-08", "UT": "03:00:00.000"})
    h = complete_header(raw)
    assert h["QRA"] == "03:29:12.00" and h["QDEC"] == "-00:24:00.0"
    assert h.comments["QRA"] == "derived from TRAJRA"
    assert h["QOBJECT"] == "SN2018abc" and h.comments["QOBJECT"] == "derived from OBJECT"
    assert h["DATE"] == "2018-11-08T03:00:00.0"
    assert h.comments["DATE"] == "derived from DATE-OBS and UT"
    raw["RA"], raw["DEC"] = "02:30:00.00", "+00:30:00.0"
    assert complete_header(raw)["QRA"] == "02:30:00.00"
    assert complete_header(raw).comments["QDEC"] == "derived from DEC"
    raw["QRA"], raw["QOBJECT"] = ("01:00:00.00", "queue"), "HIIregion"
    h = complete_header(raw)  # cards a frame carries are kept as they are
    assert h["QRA"] == "01:00:00.00" and h["QOBJECT"] == "HIIregion"


def test_cubes_option(tmp_path):
    from panacea.cli import reduce_parser
    from panacea.ops.cli_config import run_config_from_args
    from panacea.ops.config import ConfigError
    from panacea.exposure_products import DEFAULT_CUBES, parse_cubes

    assert parse_cubes("none") == () and parse_cubes("all") == ("obs", "sky", "skysub")
    assert parse_cubes("skysub, obs") == ("obs", "skysub")
    with pytest.raises(ValueError, match="'skysubb'"):
        parse_cubes("skysubb")
    def run(*extra):
        parser = reduce_parser()
        args = parser.parse_args(["-d", "20181108", "--output", str(tmp_path), *extra])
        return run_config_from_args(args, parser)

    assert run().cubes == DEFAULT_CUBES == ("skysub",)  # the bundled configuration's
    assert run("--cubes", "none").cubes == ()
    with pytest.raises(ConfigError, match="science.cubes: .*'everything'"):
        run("--cubes", "everything")
