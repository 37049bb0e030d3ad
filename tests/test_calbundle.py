"""Calibration bundle layout, round trip and atomic writing."""

from __future__ import annotations

import os

import numpy as np
import pytest
from astropy.io import fits

from panacea.calbundle import (
    CAL_NAMES,
    SCIENCE_EXTENSIONS,
    BundleError,
    CalibrationBundle,
    bundle_path,
    read_bundle,
    write_bundle,
)


def _bundle():
    rng = np.random.default_rng(0)
    arrays = {
        "wavelength": np.linspace(3640, 4645, 280 * 64).reshape(280, 64),
        "trace": rng.uniform(0, 100, (280, 64)),
        "dead": np.zeros(280, np.uint8),
        "rdnoise": np.array([3.1, 2.9]),
    }
    return CalibrationBundle("20181108", "uv", arrays, inputs=["b", "a"], meta={"NDEAD": 0})


def test_layout_starts_with_the_known_extensions():
    assert CAL_NAMES[:14] == ("wavelength", "trace", "flat", "bigw", "masterbias", "xypos",
                              "dead", "arcspec", "twispec", "flatspec", "bigf", "masterarc",
                              "masterflat", "response")


def test_round_trip(tmp_path):
    path = bundle_path(tmp_path, "20181108", "uv")
    write_bundle(_bundle(), path)
    with fits.open(path) as hdul:
        assert [h.name.lower() for h in hdul] == list(CAL_NAMES)
        assert all("BUNIT" in h.header for h in hdul)
        assert hdul[0].header["PANVER"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as any file the user writes
    back = read_bundle(path)
    assert np.array_equal(back["wavelength"], _bundle()["wavelength"])
    assert back.inputs == ["b", "a"] and back.fingerprint == _bundle().fingerprint
    assert back.meta["NDEAD"] == 0


def _flip_data_byte(path, extname: str) -> None:
    """Invert one byte in the middle of extension ``extname``'s data, in place."""
    data = bytearray(path.read_bytes())
    with fits.open(path) as hdul:
        hdu = hdul[extname]
        at = hdu._data_offset + hdu._data_size // 2
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_science_reads_only_its_extensions_but_checks_the_whole_file(tmp_path):
    path = tmp_path / "cal.fits"
    bundle = _bundle()
    bundle.arrays["masterarc"] = np.ones((16, 64), np.float32)  # not read by the science
    write_bundle(bundle, path)
    back = read_bundle(path, names=SCIENCE_EXTENSIONS)
    assert set(back.arrays) == {"wavelength", "trace", "dead", "rdnoise"}
    assert np.array_equal(back["trace"], bundle["trace"])
    assert "masterarc" in read_bundle(path).arrays
    _flip_data_byte(path, "MASTERARC")  # a byte of the unread masterarc changed
    with pytest.raises(BundleError, match=r"\(masterarc\) fails its data checksum"):
        read_bundle(path, names=SCIENCE_EXTENSIONS)
    write_bundle(bundle, path)
    with pytest.raises(BundleError, match=r"cal\.fits: no extension \['wavelenght'\]"):
        read_bundle(path, names=("wavelenght",))


def test_bad_bundles_are_refused(tmp_path):
    path = tmp_path / "cal.fits"
    write_bundle(_bundle(), path)
    with fits.open(path, mode="update") as hdul:
        hdul[0].header["CALVERS"] = 99
    with pytest.raises(BundleError, match="layout version"):
        read_bundle(path)
    (tmp_path / "junk.fits").write_bytes(b"not fits")
    with pytest.raises(BundleError, match="junk.fits"):
        read_bundle(tmp_path / "junk.fits")


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "cal.fits"
    write_bundle(_bundle(), path)
    before = path.read_bytes()
    broken = _bundle()
    broken.arrays["notalayer"] = np.zeros(3)
    with pytest.raises(ValueError):
        write_bundle(broken, path)
    assert path.read_bytes() == before
    assert not list(tmp_path.glob("*.part"))


def test_header_only_read_still_checks_every_hdu(tmp_path):
    """``names=()`` (the rerun's fingerprint check) reads no array but refuses a changed
    byte of any extension."""
    path = tmp_path / "cal.fits"
    bundle = _bundle()
    write_bundle(bundle, path)
    head = read_bundle(path, names=())
    assert head.arrays == {} and head.fingerprint == bundle.fingerprint
    assert head.meta["NDEAD"] == 0 and head.inputs == ["b", "a"]
    _flip_data_byte(path, "WAVELENGTH")
    with pytest.raises(BundleError, match=r"\(wavelength\) fails its data checksum"):
        read_bundle(path, names=())
