"""Fault injection: one small simulated night (uv only), damaged in copies, one case each.

Every case asserts the message (file and problem named), the exit status, what was still
produced, and that no partial or corrupt product remains. The table of cases is in
docs/faults.md. Damage of single frames and files is tested on the stage that reads them
(fast); what the user sees is tested through the command line in a subprocess, with the
calibration bundle of a reference run copied in so that only the science is redone.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import stat
import tempfile
import time
from pathlib import Path

import faults
from memreader import BytesReader
import numpy as np
import pytest
from astropy.io import fits

from panacea import instrument
from panacea.archive import Archive, NightIndex
from panacea.calbundle import BundleError, content_fingerprint, file_digest, read_bundle
from panacea.calibration import CalibrationOptions, build_master_bias, plan_calibration
from panacea.ccd import read_amp, read_channel
from panacea.errors import CalibrationNotFound, FrameError, WriteError
from panacea.io_utils import remove_stale_parts, write_fits_atomic

DATE = "20181108"
UV = instrument.get_channel("uv")
SCIENCE = "lrs20000012.tar"  # SN2018abc, program HET18-2-100, one exposure
PROGRAM = "HET18-2-100"
#: Command-line options that reduce only obs 12 with the bundled response (no standard).
FAST = ("-s", "uv", "-o", "SN2018", "--standard_star_obsid", "99")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def night(tmp_path_factory) -> Path:
    """The simulated night: uv, 3 biases, 2 twilights, 1 internal flat, 3 arcs, two
    standards and one science exposure, no extended target."""
    from panacea.simulate import NightConfig, simulate_night

    base = tmp_path_factory.mktemp("faultnight")
    cfg = NightConfig(date=DATE, seed=13, channels=("uv",), n_bias=3, n_twilight=2, n_flat=1,
                      n_science=1, extended=False)
    simulate_night(cfg, base, workers=1)
    return base


@pytest.fixture(scope="module")
def reference(night, tmp_path_factory) -> Path:
    """The clean night reduced once (obs 12 only): its calibration bundle is reused."""
    out = tmp_path_factory.mktemp("faultref") / "out"
    run = faults.run_cli("-d", DATE, *FAST, "--baseraw", night, "--output", out)
    assert run.returncode == 0, run.output
    return out


def archive_copy(night: Path, dest: Path, fakeraw, skip=()) -> Path:
    """A copy of the night (tarballs and guider folders linked, so they can be replaced)."""
    fakeraw.copy_night(night, DATE, dest, skip=skip)
    for cam in ("gc1", "gc2"):
        if (night / DATE / cam).is_dir():
            (dest / DATE / cam).symlink_to(night / DATE / cam)
    return dest


def output_with_bundle(reference: Path, dest: Path) -> Path:
    """A product tree holding the reference run's calibration bundle only."""
    (dest / "CALS").mkdir(parents=True)
    shutil.copy2(reference / "CALS" / f"cal_{DATE}_uv.fits", dest / "CALS")
    return dest


def assert_clean(run: faults.Run, out: Path) -> None:
    """No traceback reached the user; no partial file; every product passes its checksums."""
    assert "Traceback" not in run.output, run.output
    assert faults.part_files(out) == []
    for path in Path(out).rglob("*.fits"):
        with fits.open(path, disable_image_compression=True) as hdul:  # the stored bytes
            for hdu in hdul:
                assert hdu.verify_checksum() == 1 and hdu.verify_datasum() == 1, path


def products_of(out: Path, obsid: int) -> list[str]:
    return sorted(p.name for p in Path(out).rglob(f"*_{DATE}_{obsid:07d}_*.fits"))


class Member:
    location = "lrs20000012.tar:lrs20000012/exp01/lrs2/20181108T021543.7_056LL_sci.fits"
    amp = "LL"


# --------------------------------------------------------------------------- tarballs


def test_truncated_tarball_keeps_intact_exposures(night, tmp_path, fakeraw, caplog):
    base = archive_copy(night, tmp_path / "raw", fakeraw)
    tar = base / DATE / "lrs2" / "lrs20000001.tar"
    with __import__("tarfile").open(tar.resolve()) as t:
        third = t.getmembers()[2]  # exposure 2, first amplifier
    faults.truncate(tar, third.offset_data + 1000)
    with caplog.at_level(logging.ERROR):
        index = NightIndex(base, DATE)
    biases = index.exposures(ftype="zro")
    assert [e.exp for e in biases] == [1]  # exposure 1 intact and kept
    assert biases[0].has_channel(UV)
    frame = read_channel(index, biases[0], UV)
    assert np.isfinite(frame.image).all()
    text = " ".join(str(p) for p in index.problems)
    assert f"{tar}: corrupt or truncated tarball" in text
    assert "member truncated" in text and third.name in text


@pytest.mark.parametrize("content, problem", [
    (b"", "empty file (0 bytes)"),
    (b"this is not a tar file " * 100, "neither a tar file nor a gzip, bzip2 or xz"),
    (b"\x1f\x8b\x08\x00" + bytes(range(256)) * 8, "not a readable tarball"),
], ids=["0-byte", "not-a-tar", "gzip-garbage"])
def test_unreadable_tarball_named_and_skipped(night, tmp_path, fakeraw, content, problem):
    base = archive_copy(night, tmp_path / "raw", fakeraw)
    tar = base / DATE / "lrs2" / "lrs20000007.tar"
    faults.replace_file(tar, content)
    index = NightIndex(base, DATE)
    assert 7 not in {e.obsid for e in index.exposures()}
    assert {1, 2, 3, 4, 5, 6, 8, 12} <= {e.obsid for e in index.exposures()}
    assert len(index.problems) == 1
    assert str(index.problems[0]).startswith(f"{tar}: ") and problem in str(index.problems[0])
    assert "\n" not in str(index.problems[0]) and index.problems[0].file == str(tar)


def test_duplicated_exposure_warned_once(tmp_path, fakeraw, caplog):
    ts = f"{DATE}T030000.0"
    items = {fakeraw.member_name(3, 1, ts, "056", a, "sci"): fakeraw.tiny_fits("056", a, "sci",
                                                                              ts)
             for a in ("LL", "LU")}
    folder = tmp_path / DATE / "lrs2"
    folder.mkdir(parents=True)
    fakeraw.write_tar(folder / "lrs20000003.tar", items)
    fakeraw.write_tar(folder / "lrs20000003_copy.tar", items)
    with caplog.at_level(logging.WARNING):
        index = NightIndex(tmp_path, DATE)
    assert len(index.exposures()) == 1 and len(index.files) == 2
    dup = [r.getMessage() for r in caplog.records if "duplicate raw file" in r.getMessage()]
    assert len(dup) == 2 and all("lrs20000003_copy.tar" in m for m in dup)


# --------------------------------------------------------------------------- frames


def _amp(fakeraw, **kw) -> bytes:
    return fakeraw.amp_fits("056", "LL", **kw)


def _blank_scaled() -> bytes:
    """Scaled 16-bit integers (BSCALE 2) that are all BLANK but a corner: NaN once read."""
    data = np.full((1032, 2128), -32768, np.int16)
    data[:5, :5] = 7
    hdu = fits.PrimaryHDU(data)
    hdu.header["BSCALE"] = 2.0
    hdu.header["BLANK"] = -32768
    out = __import__("io").BytesIO()
    hdu.writeto(out)
    return out.getvalue()


@pytest.mark.parametrize("make, problem", [
    (lambda f: b"SIMPLE  = garbage" + bytes(3000), "unreadable FITS file"),
    (lambda f: _amp(f, data=np.ones((100, 300), np.uint16) + np.arange(300, dtype=np.uint16)),
     "unexpected amp shape 100x300"),
    (lambda f: _amp(f, data=np.full((1032, 2128), np.nan, np.float32)), "no finite pixel"),
    (lambda f: _amp(f, data=np.where(np.arange(2128) % 3 == 0, 1.0, np.nan).astype(np.float32)
                    * np.ones((1032, 1))), "of the pixels are finite"),
    (lambda f: _amp(f, data=np.full((1032, 2128), 1000, np.uint16)), "the image is constant"),
    (lambda f: _blank_scaled(), "of the pixels are finite"),
], ids=["garbage", "wrong-shape", "all-nan", "mostly-nan", "constant", "blank-integers"])
def test_bad_frame_refused_with_its_name(fakeraw, make, problem):
    with pytest.raises(FrameError) as err:
        read_amp(BytesReader(make(fakeraw)), Member())
    assert Member.location in str(err.value) and problem in str(err.value)
    assert err.value.file == Member.location  # for the night summary


def test_float_frame_read_with_a_warning(fakeraw, caplog):
    good = fits.getdata(__import__("io").BytesIO(_amp(fakeraw))).astype(np.float64)
    with caplog.at_level(logging.WARNING):
        frame = read_amp(BytesReader(_amp(fakeraw, data=good)), Member())
    assert any("BITPIX -64" in r.getMessage() and Member.location in r.getMessage()
               for r in caplog.records)
    ref = read_amp(BytesReader(_amp(fakeraw)), Member())
    np.testing.assert_allclose(frame.image, ref.image, atol=1e-3)


@pytest.mark.parametrize("card, value, expect", [
    ("GAIN", "0", "header GAIN=0 missing or not positive; using default 0.85"),
    ("RDNOISE", "-3.0", "header RDNOISE=-3.0 missing or not positive; using default 3"),
    ("AMPNAME", "'XY      '", "unknown header AMPNAME 'XY'"),
])
def test_absurd_detector_cards_fall_back(fakeraw, caplog, card, value, expect):
    content = faults.set_card(_amp(fakeraw), card, value)
    with caplog.at_level(logging.WARNING):
        frame = read_amp(BytesReader(content), Member())
    messages = [r.getMessage() for r in caplog.records]
    assert any(expect in m and Member.location in m for m in messages), messages
    if card == "GAIN":  # the facts sheet's default gain, not a zero image
        level = np.median(frame.image[200:800, 100:1900])
        assert level == pytest.approx(instrument.DEFAULT_GAIN * fakeraw.LEVEL["LL"], rel=0.01)


@pytest.mark.parametrize("value, shown", [
    (None, "EXPTIME missing"),
    ("NaN", "EXPTIME NaN (unparsable card)"),
    ("'NaN     '", "EXPTIME 'NaN'"),
    ("-60.0", "EXPTIME -60.0"),
    ("0.0", "EXPTIME 0.0"),
], ids=["missing", "unparsable-NaN", "string-NaN", "negative", "zero"])
def test_absurd_exptime_named(tmp_path, fakeraw, value, shown):
    ts = f"{DATE}T030000.0"
    items = {}
    for a in ("LL", "LU"):
        content = fakeraw.amp_fits("056", a, "sci", "target", ts, drop=("EXPTIME",)
                                   if value is None else (), data=np.zeros((4, 4), np.uint16))
        items[fakeraw.member_name(3, 1, ts, "056", a, "sci")] = (
            content if value is None else faults.set_card(content, "EXPTIME", value))
    fakeraw.write_night(tmp_path, DATE, items)
    exposure = NightIndex(tmp_path, DATE).exposures()[0]
    assert exposure.exptime is None or exposure.exptime == 0
    problem = exposure.exptime_problem()
    assert shown in problem and "is not a positive number of seconds" in problem
    assert "lrs20000003.tar:lrs20000003/exp01" in problem


# --------------------------------------------------------------------------- calibrations


def test_garbage_first_bias_member_costs_one_frame(night, tmp_path, fakeraw, caplog):
    base = archive_copy(night, tmp_path / "raw", fakeraw)
    tar = base / DATE / "lrs2" / "lrs20000001.tar"
    first = faults.members_of(tar)[0]
    faults.rewrite_tar(tar, lambda i, name, data: bytes(len(data)) if i == 0 else None)
    archive = Archive(base)
    plan = plan_calibration(archive, DATE, UV, CalibrationOptions())
    with caplog.at_level(logging.WARNING):
        bias = build_master_bias(archive, plan.bias, UV)
    assert bias.image.shape == (2064, 2064) and np.isfinite(bias.image).all()
    left_out = [r.getMessage() for r in caplog.records if "bias left out" in r.getMessage()]
    assert len(left_out) == 1 and f"{tar}:{first}" in left_out[0]


@pytest.mark.parametrize("skip, kind, hint", [
    ((1,), "bias", "no bias (zro) exposures of channel uv within ±1 nights of 20181108"),
    ((4, 5, 6), "arc", "no arc (cmp) exposures of channel uv within ±7 nights"),
    ((2,), "twi", "internal flats exist: rerun with -uf"),
    ((2, 3), "twi", "no twi exposures of channel uv within ±7 nights"),
], ids=["no-bias", "no-arcs", "no-twilights-uf", "no-flats"])
def test_missing_calibration_kind_named(night, tmp_path, fakeraw, skip, kind, hint):
    base = archive_copy(night, tmp_path / "raw", fakeraw, skip=skip)
    with pytest.raises(CalibrationNotFound) as err:
        plan_calibration(Archive(base), DATE, UV, CalibrationOptions())
    assert err.value.kind == kind and hint in str(err.value)
    assert str(base) in str(err.value)
    if skip == (2, 3):
        assert "-uf" not in str(err.value)


def test_no_twilights_cli_suggests_uf(night, tmp_path, fakeraw):
    base = archive_copy(night, tmp_path / "raw", fakeraw, skip=(2,))
    out = tmp_path / "out"
    run = faults.run_cli("-d", DATE, *FAST, "--baseraw", base, "--output", out)
    assert run.returncode == 1
    assert any("calibration failed" in e and "rerun with -uf" in e for e in run.errors)
    assert_clean(run, out)
    assert not (out / "CALS" / f"cal_{DATE}_uv.fits").exists()


def test_bundle_bit_flip_and_older_layout_refused(reference, tmp_path):
    src = reference / "CALS" / f"cal_{DATE}_uv.fits"
    assert read_bundle(src).arrays["wavelength"].shape == (280, 2064)
    flipped = shutil.copy(src, tmp_path / "flipped.fits")
    faults.overwrite(flipped, os.path.getsize(src) // 2, 64)
    with pytest.raises(BundleError, match=r"flipped\.fits: HDU \d+ \(\w+\) fails its") as err:
        read_bundle(flipped)
    assert err.value.file == str(flipped)
    older = tmp_path / "older.fits"
    with fits.open(src) as hdul:
        hdul[0].header["CALVERS"] = 0
        hdul.writeto(older, checksum=True)
    with pytest.raises(BundleError, match=r"older\.fits: calibration bundle layout version 0"):
        read_bundle(older)
    unsummed = tmp_path / "unsummed.fits"
    with fits.open(src, disable_image_compression=True) as hdul:
        for hdu in hdul:
            del hdu.header["CHECKSUM"], hdu.header["DATASUM"]
        hdul.writeto(unsummed)
    with pytest.raises(BundleError, match="has no checksum cards"):
        read_bundle(unsummed)


def test_truncated_bundle_named_and_rebuilt(night, reference, tmp_path):
    out = output_with_bundle(reference, tmp_path / "out")
    bundle = out / "CALS" / f"cal_{DATE}_uv.fits"
    faults.truncate(bundle, os.path.getsize(bundle) // 2)
    stale = out / PROGRAM / f".multi_{DATE}_0000012_exp01_uv.fits.abc123.part"
    stale.parent.mkdir()
    stale.write_bytes(bytes(10_000))
    old = time.time() - 3600
    os.utime(stale, (old, old))
    run = faults.run_cli("-d", DATE, *FAST, "--baseraw", night, "--output", out)
    assert run.returncode == 0, run.output
    assert any(str(bundle) in w and "truncated" in w and "rebuilding" in w
               for w in run.warnings), run.warnings
    assert any(str(stale) in w and "removed a partial file" in w for w in run.warnings)
    rebuilt = read_bundle(bundle)  # verifies the checksums
    ref = read_bundle(reference / "CALS" / f"cal_{DATE}_uv.fits")
    np.testing.assert_array_equal(rebuilt["wavelength"], ref["wavelength"])
    assert products_of(out, 12) == products_of(reference, 12)
    assert_clean(run, out)


def test_fingerprint_follows_content_options_and_version(night, tmp_path, fakeraw):
    base = archive_copy(night, tmp_path / "raw", fakeraw)
    plan = plan_calibration(Archive(base), DATE, UV, CalibrationOptions())
    args = (plan.inputs, plan.sources, CalibrationOptions().describe())
    first = content_fingerprint(*args)
    assert content_fingerprint(*args) == first
    moved = archive_copy(night, tmp_path / "moved", fakeraw)  # same files elsewhere
    plan2 = plan_calibration(Archive(moved), DATE, UV, CalibrationOptions())
    assert content_fingerprint(plan2.inputs, plan2.sources, args[2]) == first
    assert content_fingerprint(*args[:2], "use_flat=True") != first
    assert content_fingerprint(*args, version="999.0") != first
    arc = base / DATE / "lrs2" / "lrs20000004.tar"
    digest = file_digest(arc)
    faults.overwrite(arc, 100, 8)  # a rewritten raw file: new bytes and mtime
    assert file_digest(arc) != digest and content_fingerprint(*args) != first
    arc.unlink()
    assert file_digest(arc) == "missing" and content_fingerprint(*args) != first


# --------------------------------------------------------------------------- science run


def test_damaged_science_costs_only_those_exposures(night, reference, tmp_path, fakeraw):
    base = archive_copy(night, tmp_path / "raw", fakeraw)
    lrs2 = base / DATE / "lrs2"
    faults.replace_file(lrs2 / "lrs20000007.tar", b"")
    faults.replace_file(lrs2 / "lrs20000008.tar", b"garbage " * 4000)
    out = output_with_bundle(reference, tmp_path / "out")
    older = out / PROGRAM / f"spectrum_{DATE}_0000012_exp02_uv.fits"  # an older run's
    older.parent.mkdir()
    hdu = fits.PrimaryHDU(np.ones((6, 2064)))
    hdu.header["SPECVER"] = 0
    hdu.writeto(older, checksum=True)
    run = faults.run_cli("-d", DATE, "-s", "uv", "--standard_star_obsid", "99", "--baseraw",
                         base, "--output", out)
    assert run.returncode == 1, run.output
    assert any(f"{lrs2 / 'lrs20000007.tar'}: empty file" in e for e in run.errors)
    assert any(f"{lrs2 / 'lrs20000008.tar'}: not a readable tarball" in e for e in run.errors)
    assert "2 failed -> exit 1" in run.output.splitlines()[-1]
    assert [p for p in products_of(out, 12) if p != older.name] == products_of(reference, 12)
    assert any(str(older) in w and "layout version 0" in w for w in run.warnings)
    with fits.open(out / PROGRAM / f"joined_{DATE}_0000012.fits") as hdul:
        ref = fits.getdata(reference / PROGRAM / f"joined_{DATE}_0000012.fits", 1)
        for name in ref.names:  # the older file (all ones) not mixed into the join
            np.testing.assert_allclose(hdul[1].data[name], ref[name], rtol=1e-6)
    assert_clean(run, out)


def test_exptime_nan_skips_only_those_exposures(night, reference, tmp_path, fakeraw):
    base = archive_copy(night, tmp_path / "raw", fakeraw)
    lrs2 = base / DATE / "lrs2"
    faults.rewrite_tar(lrs2 / "lrs20000008.tar",
                       lambda i, name, data: faults.set_card(data, "EXPTIME", "NaN"))
    faults.rewrite_tar(lrs2 / "lrs20000012.tar",
                       lambda i, name, data: faults.set_card(data, "EXPTIME", "'NaN'"))
    out = output_with_bundle(reference, tmp_path / "out")
    run = faults.run_cli("-d", DATE, "-s", "uv", "--baseraw", base, "--output", out)
    assert run.returncode == 1, run.output
    for obs, shown in ((8, "EXPTIME NaN (unparsable card)"), (12, "EXPTIME 'NaN'")):
        assert any(f"lrs2{obs:07d} exp01 uv" in e and shown in e
                   and f"lrs2{obs:07d}.tar:lrs2{obs:07d}/exp01" in e for e in run.errors), obs
    assert products_of(out, 8) == [] and products_of(out, 12) == []
    assert f"spectrum_{DATE}_0000007_exp01_uv.fits" in products_of(out, 7)
    assert (out / "STANDARDS" / f"joined_{DATE}_0000007.fits").exists()
    assert_clean(run, out)


def test_night_without_science_writes_calibration_only(night, reference, tmp_path, fakeraw):
    base = archive_copy(night, tmp_path / "raw", fakeraw, skip=(7, 8, 12))
    out = output_with_bundle(reference, tmp_path / "out")
    run = faults.run_cli("-d", DATE, "-s", "uv", "--baseraw", base, "--output", out)
    assert run.returncode == 0, run.output
    assert "0 science exposures to reduce" in run.output
    assert "0 skipped, 0 failed -> exit 0" in run.output.splitlines()[-1]
    assert_clean(run, out)


def test_disk_full_while_writing(night, reference, tmp_path):
    out = output_with_bundle(reference, tmp_path / "out")
    limit = 2_000_000  # bytes per file: the spectrum fits, the multi file does not

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    run = faults.run_cli("-d", DATE, *FAST, "--baseraw", night, "--output", out,
                         preexec_fn=small_disk)
    assert run.returncode == 1, run.output
    assert any(f"{out / PROGRAM}/" in e and "cannot write (" in e
               and ("File too large" in e or "disk full or file-size limit" in e)
               for e in run.errors), run.errors
    assert products_of(out, 12) == [] or all(
        (out / PROGRAM / name).stat().st_size <= limit for name in products_of(out, 12))
    assert_clean(run, out)


def test_write_fits_atomic_failure_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "p.fits"
    write_fits_atomic(fits.HDUList([fits.PrimaryHDU(np.ones(3))]), target)
    before = target.read_bytes()

    def full(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fits.HDUList, "writeto", full)
    with pytest.raises(WriteError, match=r"p\.fits: cannot write \(No space left on device\)"):
        write_fits_atomic(fits.HDUList([fits.PrimaryHDU(np.zeros(3))]), target)
    assert target.read_bytes() == before and faults.part_files(tmp_path) == []


def test_stale_parts_removed_fresh_ones_kept(tmp_path):
    old, fresh = tmp_path / "a" / ".x.fits.1.part", tmp_path / ".y.fits.2.part"
    old.parent.mkdir()
    for p in (old, fresh):
        p.write_bytes(b"x")
    os.utime(old, (time.time() - 600, time.time() - 600))
    keep = tmp_path / "z.fits"
    keep.write_bytes(b"y")
    assert remove_stale_parts(tmp_path, time.time()) == [old]
    assert fresh.exists() and keep.exists() and not old.exists()


def _unprivileged(top: Path, out: Path) -> dict:
    """How to run the command line without the right to write ``out``: as user nobody when
    the tests run as root and nobody can run this interpreter; else as root without any
    capability (setpriv), ``out`` made read-only; else as the current (non-root) user with
    ``out`` read-only."""
    if os.getuid() != 0:
        os.chmod(out, 0o555)
        return {}
    import pwd

    nobody = pwd.getpwnam("nobody")

    def become():
        os.setgid(nobody.pw_gid)
        os.setgroups([])
        os.setuid(nobody.pw_uid)

    try:
        probe = faults.run_cli("--version", preexec_fn=become, cwd=top)
        if probe.returncode == 0:
            return {"preexec_fn": become}
        why = probe.output.strip().splitlines()[-1:]
    except OSError as exc:
        why = str(exc)
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip(f"user nobody cannot run {faults.sys.executable} ({why}) and setpriv "
                    "is missing to drop root's capabilities")
    os.chmod(out, 0o555)
    return {"wrapper": (setpriv, "--inh-caps=-all", "--bounding-set=-all")}


def test_read_only_output_as_unprivileged_user():
    top = Path(tempfile.mkdtemp(prefix="panacea-ro-"))
    try:
        os.chmod(top, 0o755)
        out = top / "LRS2"
        out.mkdir(mode=0o755)
        how = _unprivileged(top, out)
        run = faults.run_cli("-d", DATE, "-s", "uv", "--baseraw", top, "--output", out,
                             cwd=top, **how)
        assert run.returncode == 2, run.output
        assert run.errors == [run.output.strip().splitlines()[-1]]
        assert f"output {out}: not writable" in run.errors[0]
        assert "Traceback" not in run.output and list(out.iterdir()) == []
    finally:
        os.chmod(top, stat.S_IRWXU)
        if (top / "LRS2").exists():
            os.chmod(top / "LRS2", stat.S_IRWXU)
        shutil.rmtree(top, ignore_errors=True)


# --------------------------------------------------------------------------- command line


@pytest.mark.parametrize("args, message", [
    (("-d", "20181340"), "night 20181340 is not a calendar date"),
    (("-d", "20180230"), "night 20180230 is not a calendar date"),
    (("-d", "2018-11-08"), "is not YYYYMMDD"),
    (("-d", DATE, "-s", "uv,blue"), "unknown channel 'blue' in 'uv,blue'"),
    (("-d", DATE, "-s", ""), "no channel given in ''"),
    (("-d", DATE, "-s", "uv,uv"), "channel uv named more than once in 'uv,uv'"),
], ids=["month-13", "feb-30", "format", "unknown-channel", "empty", "duplicate"])
def test_usage_errors_exit_2_in_one_line(tmp_path, args, message):
    run = faults.run_cli(*args, "--baseraw", tmp_path, "--output", tmp_path / "out")
    assert run.returncode == 2 and message in run.output and "Traceback" not in run.output
    assert not (tmp_path / "out").exists() or message.startswith("night")


@pytest.mark.parametrize("make, message", [
    (lambda p: (p / "file").write_text("x") and p / "file", "is a file, not a folder"),
    (lambda p: (p / "file").write_text("x") and p / "file" / "sub", "is a file, not a folder"),
], ids=["output-is-file", "parent-is-file"])
def test_output_location_checked_before_work(tmp_path, make, message):
    out = make(tmp_path)
    run = faults.run_cli("-d", DATE, "-s", "uv", "--baseraw", tmp_path, "--output", out)
    assert run.returncode == 2 and message in run.output and str(tmp_path / "file") in run.output
    assert "Traceback" not in run.output and len(run.errors) == 1

