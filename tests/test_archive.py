"""Tests of the raw archive index (panacea.archive)."""

from __future__ import annotations

import datetime as dt
import logging
import tarfile
import time

import numpy as np
import pytest

from panacea import archive
from panacea.archive import Archive, GuiderFile, NightIndex, RawFile, calibration_nights
from panacea.ccd import read_channel
from panacea.errors import ArchiveError, CalibrationNotFound, NoDataError, PanaceaError

EXAMPLE = "lrs20000012/exp01/lrs2/20181108T021543.7_056LL_sci.fits"


# --------------------------------------------------------------------------- names


def test_parse_member_name():
    rf = RawFile.from_name(EXAMPLE, "/raw/lrs20000012.tar", "20181108", EXAMPLE)
    assert (rf.obsid, rf.exp, rf.ifuslot, rf.amp, rf.ftype) == (12, 1, "056", "LL", "sci")
    assert rf.timestamp == "20181108T021543.7"
    assert rf.time == dt.datetime(2018, 11, 8, 2, 15, 43, 700000, tzinfo=dt.timezone.utc)
    assert rf.date == "20181108" and rf.member == EXAMPLE
    assert rf.channel.name == "uv"
    assert rf.location == f"/raw/lrs20000012.tar:{EXAMPLE}"
    assert RawFile.from_name("./" + EXAMPLE, "x", "20181108").obsid == 12
    assert RawFile.from_name(EXAMPLE.replace("LL_sci", "RL_cmp"), "x", "d").channel.name == "orange"


@pytest.mark.parametrize("name", [
    "lrs20000012/exp01/lrs2/20181108T021543.7_056XX_sci.fits",   # unknown amp
    "lrs2000012/exp01/lrs2/20181108T021543.7_056LL_sci.fits",    # 6-digit obsid
    "lrs20000012/exp01/20181108T021543.7_056LL_sci.fits",        # no lrs2 folder
    "lrs20000012/exp01/lrs2/20181308T021543.7_056LL_sci.fits",   # month 13
    "lrs20000012/exp01/lrs2/20181108T021543.7_056LL_sci.fits.gz",
    "lrs20000012/README.txt",
])
def test_unrecognised_names_are_none(name):
    assert RawFile.from_name(name, "x", "20181108") is None


def test_parse_guider_name():
    g = GuiderFile.from_name("gc1/20181108T021600.0_gc1_sci.fits", "gc1.tar", "20181108", "m")
    assert (g.camera, g.ftype, g.timestamp) == ("gc1", "sci", "20181108T021600.0")
    assert GuiderFile.from_name(EXAMPLE, "x", "20181108") is None


# --------------------------------------------------------------------------- index


def _signature(index):
    return [(e.obsid, e.exp, e.ftype, e.time, tuple(e.files),
             tuple((f.timestamp, f.ftype) for f in e.files.values())) for e in index.exposures()]


def test_formats_give_identical_exposures_and_frames(good_archives, fakeraw):
    indexes = {fmt: NightIndex(base, fakeraw.DATE) for fmt, base in good_archives.items()}
    ref = indexes["tar"]
    assert [(e.obsid, e.exp) for e in ref.exposures()] == [(1, 1), (12, 1)]
    assert all(len(e.files) == 8 for e in ref.exposures())
    for fmt, index in indexes.items():
        assert _signature(index) == _signature(ref), fmt
        assert not index.problems
    sci = {fmt: index.exposures(ftype="sci")[0] for fmt, index in indexes.items()}
    for channel in ("uv", "red"):
        frames = {fmt: read_channel(indexes[fmt], sci[fmt], channel) for fmt in indexes}
        for fmt, frame in frames.items():
            for plane in ("image", "variance", "mask"):
                assert np.array_equal(getattr(frame, plane), getattr(frames["tar"], plane)), fmt
            assert frame.header == frames["tar"].header
    for index in indexes.values():
        index.close()


def test_exposure_properties(good_archives, fakeraw):
    with NightIndex(good_archives["tar"], fakeraw.DATE) as index:
        bias, sci = index.exposures()
        assert (bias.ftype, sci.ftype) == ("zro", "sci")
        assert sci.object == "HD_19445_056_E"
        assert sci.exptime == 60.0 and bias.exptime == 0.0
        assert sci.program == "HET18-3-400" and bias.program is None
        assert sci.time == dt.datetime(2018, 11, 8, 2, 15, 43, 700000, tzinfo=dt.timezone.utc)
        assert sci.header("066", "RL")["AMPNAME"] == "RL"
        assert sci.header(amp="LU")["IFUSLOT"] == 56
        assert sci.header() is sci.header()  # cached
        assert sci.has_channel("farred") and sci.name == "20181108 lrs20000012 exp01"
        with pytest.raises(ArchiveError, match="077"):
            sci.header("077")
        assert index.exposures(ftype="zro") == [bias]
        assert index.exposures(ftype="cmp") == []
        assert index.exposures(channel="orange") == [bias, sci]
        assert index.observations() == {1: [bias], 12: [sci]}
        with pytest.raises(ValueError, match="bias"):
            index.exposures(ftype="bias")


def test_each_tarball_opened_once(good_archives, fakeraw, monkeypatch):
    opened = []
    real_open = tarfile.open

    def counting_open(name, *args, **kwargs):
        opened.append(str(name))
        return real_open(name, *args, **kwargs)

    monkeypatch.setattr(tarfile, "open", counting_open)
    base = good_archives["tar.gz"]
    with NightIndex(base, fakeraw.DATE) as index:
        tarballs = sorted(str(p) for p in (base / fakeraw.DATE / "lrs2").glob("*.tar.gz"))
        assert sorted(opened) == tarballs
        for exposure in index.exposures():  # reading members reuses the open handles
            exposure.header()
            read_channel(index, exposure, "uv")
        assert sorted(opened) == tarballs


def test_handle_cache_reopens_after_eviction(good_archives, fakeraw):
    with NightIndex(good_archives["tar"], fakeraw.DATE, max_open=1) as index:
        bias, sci = index.exposures()
        first = index.read_bytes(bias.file())
        index.read_bytes(sci.file())
        assert index.read_bytes(bias.file()) == first
        index.close()
        assert index.read_bytes(bias.file()) == first  # still usable after close()


def test_guider_files(good_archives, fakeraw):
    with NightIndex(good_archives["tar"], fakeraw.DATE) as index:
        guiders = index.guider_files()
        assert [g.timestamp for g in guiders] == sorted(fakeraw.GUIDER_TIMES)
        assert [g.camera for g in guiders] == ["gc1", "gc2", "gc1"]
        assert len(index.guider_files("gc2")) == 1
        assert index.read_header(guiders[1])["NAXIS1"] == 4
    with NightIndex(good_archives["dir"], fakeraw.DATE) as index:
        assert index.guider_files() == []


def test_read_bytes_of_foreign_file_is_an_error(good_archives, fakeraw):
    with NightIndex(good_archives["tar"], fakeraw.DATE) as index:
        rf = RawFile.from_name(EXAMPLE, "/nowhere/lrs20000012.tar", fakeraw.DATE, EXAMPLE)
        with pytest.raises(ArchiveError, match="not a member"):
            index.read_bytes(rf)


def test_corrupt_tarballs_are_reported_and_skipped(bad_archive, fakeraw, caplog):
    with caplog.at_level(logging.ERROR, logger="panacea.archive"):
        index = NightIndex(bad_archive, fakeraw.BAD_DATE)
    problems = {p.args[0].split(":")[0].rsplit("/", 1)[-1]: p for p in index.problems}
    assert set(problems) == {"lrs20000022.tar", "lrs20000026.tar.gz"}
    assert all(isinstance(p, ArchiveError) and isinstance(p, PanaceaError)
               for p in index.problems)
    assert "lrs20000022.tar" in caplog.text and "lrs20000026.tar.gz" in caplog.text
    assert [e.obsid for e in index.exposures()] == [20, 21, 23, 24, 25]
    assert len(index.observations()[23][0].files) == 1  # junk members skipped
    assert len(index.observations()[20][0].files) == 7
    index.close()


def test_night_without_data(tmp_path, fakeraw):
    with pytest.raises(NoDataError, match=str(tmp_path / "20181231" / "lrs2")):
        NightIndex(tmp_path, "20181231")
    (tmp_path / "20181230" / "lrs2").mkdir(parents=True)
    (tmp_path / "20181230" / "lrs2" / "notes.txt").write_text("nothing here")
    with pytest.raises(NoDataError, match="no LRS2 raw files"):
        NightIndex(tmp_path, "20181230")
    with pytest.raises(NoDataError):
        Archive(tmp_path).night("20181231")
    with pytest.raises(ValueError, match="YYYYMMDD"):
        NightIndex(tmp_path, "2018-12-31")


# --------------------------------------------------------------------------- calibrations


def test_calibration_night_order():
    assert calibration_nights("20181110", 1) == ["20181110", "20181109", "20181111"]
    nights = calibration_nights("20181110", 7)
    assert len(nights) == 15 and nights[:5] == ["20181110", "20181109", "20181111",
                                                "20181108", "20181112"]
    assert nights[-2:] == ["20181103", "20181117"]
    assert calibration_nights("20240722", 2) == ["20240722", "20240723", "20240724"]
    assert calibration_nights("20240721", 2) == ["20240721", "20240720", "20240719"]
    assert calibration_nights(dt.date(2018, 11, 10), 0) == ["20181110"]
    with pytest.raises(ValueError):
        calibration_nights("20181110", -1)


@pytest.fixture(scope="module")
def cal_archive(tmp_path_factory, fakeraw):
    """Nights of tiny files around 20181110 and around the controller change."""
    base = tmp_path_factory.mktemp("raw_cal")
    for date, obsid, ftype in [
        ("20181110", 30, "sci"), ("20181109", 1, "zro"), ("20181109", 2, "cmp"),
        ("20181111", 1, "zro"), ("20181113", 2, "cmp"), ("20181112", 3, "twi"),
        ("20181107", 3, "twi"), ("20240721", 1, "zro"), ("20240722", 4, "flt"),
    ]:
        fakeraw.write_tiny_exposure(base, date, obsid, ftype)
    fakeraw.write_tiny_exposure(base, "20181108", 4, "flt", slots=("066",))
    with Archive(base) as arch:
        yield arch


def test_bias_window_is_one_night(cal_archive):
    match = cal_archive.find_calibration("20181110", "bias")
    assert match.night == "20181109" and match.searched == ["20181110", "20181109"]
    assert match.offset == -1 and [e.ftype for e in match.exposures] == ["zro"]
    with pytest.raises(CalibrationNotFound) as err:
        cal_archive.find_calibration("20181114", "bias")
    assert err.value.searched == ["20181114", "20181113", "20181115"]
    assert "bias" in str(err.value) and "20181113" in str(err.value)
    assert str(cal_archive.baseraw) in str(err.value)


def test_nearest_night_first(cal_archive):
    assert cal_archive.find_calibration("20181110", "twi").night == "20181112"  # +2 before -3
    assert cal_archive.find_calibration("20181111", "arc").night == "20181109"  # -2 before +2
    with pytest.raises(CalibrationNotFound):
        cal_archive.find_calibration("20181111", "arc", window=1)


def test_twilight_window_is_bounded(cal_archive):
    with pytest.raises(CalibrationNotFound) as err:
        cal_archive.find_calibration("20181120", "twi")
    assert err.value.searched == calibration_nights("20181120", 7)
    assert len(err.value.searched) == 15 and err.value.kind == "twi"


def test_channel_filter(cal_archive):
    assert cal_archive.find_calibration("20181110", "flt", channel="red").night == "20181108"
    with pytest.raises(CalibrationNotFound, match="channel uv"):
        cal_archive.find_calibration("20181110", "flt", channel="uv", window=3)


def test_controller_change_is_never_crossed(cal_archive):
    assert cal_archive.find_calibration("20240721", "bias").night == "20240721"
    assert cal_archive.find_calibration("20240722", "flt").night == "20240722"
    with pytest.raises(CalibrationNotFound, match="2024-07-22") as err:
        cal_archive.find_calibration("20240721", "flt")
    assert max(err.value.searched) == "20240721" and len(err.value.searched) == 8
    with pytest.raises(CalibrationNotFound) as err:
        cal_archive.find_calibration("20240722", "bias")
    assert err.value.searched == ["20240722", "20240723"]


def test_missing_baseraw_does_not_hang(tmp_path):
    start = time.monotonic()
    with pytest.raises(CalibrationNotFound, match="does not exist") as err:
        Archive(tmp_path / "nope").find_calibration("20181110", "twi", window=30)
    assert len(err.value.searched) == 61 and str(tmp_path / "nope") in str(err.value)
    assert time.monotonic() - start < 5


def test_archive_caches_nights_and_validates(cal_archive):
    assert cal_archive.night("20181109") is cal_archive.night(dt.date(2018, 11, 9))
    with pytest.raises(ValueError, match="kind"):
        cal_archive.find_calibration("20181110", "dark")
    with pytest.raises(ValueError, match="unknown calibration kinds"):
        Archive("x", windows={"dark": 3})
    assert Archive("x", windows={"bias": 2}).windows["bias"] == 2
    assert archive.DEFAULT_WINDOWS["bias"] == 1
