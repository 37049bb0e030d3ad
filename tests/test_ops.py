"""Operations layer: summary and exit codes, lock, configuration, dates, ledger, reruns."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import yaml

from panacea.cli import main
from panacea.ops import config
from panacea.ops.cli_config import parse_dates
from panacea.ops.config import ConfigError
from panacea.ops.ledger import Ledger, new_nights, raw_stamp
from panacea.ops.lock import LockHeld, NightLock
from panacea.ops.summary import EXIT_INCOMPLETE, EXIT_OK, NightSummary, night_folder


# ------------------------------------------------------------------ summary and exit codes


def test_summary_counts_exit_code_and_json(tmp_path):
    s = NightSummary("20181108", tmp_path)
    s.add("calibration", "written", channel="uv", products=["cal.fits"])
    s.add("science", "up-to-date", channel="uv", exposure="e1", obsid=12, exp=1)
    s.add("response", "skipped", channel="uv", reason="no reference spectrum")
    assert s.exit_code() == EXIT_OK  # a response fallback loses no product
    s.add("science", "skipped", channel="uv", exposure="e2", obsid=13, exp=1,
          reason="EXPTIME missing", file="/raw/lrs20000013.tar:member.fits")
    assert s.exit_code() == EXIT_INCOMPLETE
    assert s.last_line() == ("night 20181108: 1 written, 1 up-to-date, 2 skipped, "
                             "0 failed -> exit 1")
    path = s.write()
    assert path == tmp_path / "NIGHTS" / "20181108" / "summary.json"
    data = json.loads(path.read_text())
    assert data["exit_code"] == 1 and data["counts"]["skipped"] == 2
    bad = [o for o in data["outcomes"] if o["kind"] == "science" and o["status"] == "skipped"]
    assert bad[0]["file"].endswith("member.fits") and bad[0]["reason"] == "EXPTIME missing"
    assert not list(path.parent.glob("*.part"))
    with pytest.raises(ValueError, match="status"):
        s.add("science", "lost")


def test_night_failure_is_incomplete(tmp_path):
    s = NightSummary("20181108", tmp_path)
    s.fail_night("tarball unreadable")
    assert s.exit_code() == EXIT_INCOMPLETE and "tarball unreadable" in s.last_line()


# ------------------------------------------------------------------ lock


def test_second_run_gets_exit_3_naming_the_holder(tmp_path, caplog):
    with NightLock(tmp_path, "20181108"):
        with pytest.raises(LockHeld, match=f"pid {os.getpid()}"):
            NightLock(tmp_path, "20181108").acquire()
        with caplog.at_level(logging.ERROR):
            rc = main(["-d", "20181108", "--baseraw", str(tmp_path / "raw"), "--output",
                       str(tmp_path), "-s", "uv"])
        assert rc == 3
        assert "another run holds this night" in caplog.text and "--wait" in caplog.text
    NightLock(tmp_path, "20181108").acquire()  # released, and not left stale


def test_wait_blocks_until_the_lock_is_free(tmp_path):
    lock = NightLock(tmp_path, "20181108")
    lock.acquire()
    threading.Timer(0.5, lock.release).start()
    t0 = time.perf_counter()
    # the night has no data: exit 2 once the lock is had
    rc = main(["-d", "20181108", "--baseraw", str(tmp_path / "raw"), "--output", str(tmp_path),
               "-s", "uv", "--wait"])
    assert rc == 2 and time.perf_counter() - t0 >= 0.4


# ------------------------------------------------------------------ configuration


def test_config_override_key_by_key(tmp_path, capsys):
    user = tmp_path / "mine.yaml"
    user.write_text("science:\n  sky_method: template\ncalibration:\n  windows: {arc: 3}\n")
    assert main(["config", "--config", str(user)]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["science"]["sky_method"] == "template"
    assert shown["calibration"]["windows"] == {"bias": 1, "twi": 7, "flt": 7, "arc": 3}
    assert shown["science"]["wavelength_bin"] == config.bundled()["science"]["wavelength_bin"]


@pytest.mark.parametrize("text, message", [
    ("science:\n  sky_methd: spline\n", "unknown configuration key 'science.sky_methd'"),
    ("executor:\n  slurm: {cores: two}\n", "executor.slurm.cores must be int, got 'two'"),
    ("science:\n  correct_ftf: 1\n", "science.correct_ftf must be bool"),
    ("science:\n  sky_method: median\n", "science.sky_method must be one of spline, template"),
    ("calibration: 3\n", "calibration must be a mapping"),
    ("- a list\n", "must be a mapping of sections"),
    ("science: [\n", "not valid YAML"),
])
def test_bad_configuration_is_exit_2_naming_the_key(tmp_path, caplog, text, message):
    user = tmp_path / "bad.yaml"
    user.write_text(text)
    with caplog.at_level(logging.ERROR):
        rc = main(["-d", "20181108", "--config", str(user), "--output", str(tmp_path)])
    assert rc == 2
    assert message in caplog.text and str(user) in caplog.text


def test_config_hash_follows_product_settings_only():
    base = config.bundled()
    h = config.config_hash(base)
    other = config.merge(config.bundled(), {"executor": {"jobs": 7}})
    assert config.config_hash(other) == h
    changed = config.merge(config.bundled(), {"science": {"wavelength_bin": 12.0}})
    assert config.config_hash(changed) != h
    cal = ("calibration",)
    assert config.config_hash(changed, cal) == config.config_hash(base, cal)


def test_run_config_takes_command_line_over_file(tmp_path):
    from panacea.cli import reduce_parser
    from panacea.ops.cli_config import run_config_from_args

    user = tmp_path / "c.yaml"
    user.write_text("science: {wavelength_bin: 20.0}\narchive: {output: /elsewhere}\n")
    args = reduce_parser().parse_args(["-d", "20181108", "--config", str(user), "-wb", "5",
                                       "-uf", "--jobs", "3"])
    run = run_config_from_args(args)
    assert run.science.wavelength_bin == 5.0 and run.output == Path("/elsewhere")
    assert run.calibration.use_flat and run.executor.jobs == 3 and run.dates == ("20181108",)
    with pytest.raises(ConfigError, match="exactly one of"):
        run_config_from_args(reduce_parser().parse_args(["--dates", "20181108", "-d",
                                                         "20181108"]))


def test_parse_dates():
    assert parse_dates("20181130:20181202,20181101") == (
        "20181130", "20181201", "20181202", "20181101")
    assert parse_dates("20181101,20181101") == ("20181101",)
    with pytest.raises(ConfigError, match="20180230"):
        parse_dates("20180228:20180230")
    with pytest.raises(ConfigError, match="ends before"):
        parse_dates("20181102:20181101")


# ------------------------------------------------------------------ ledger


def test_ledger_current_needs_same_fingerprint_and_files(tmp_path):
    from panacea.ops.summary import Outcome

    product = tmp_path / "out" / "P" / "a.fits"
    product.parent.mkdir(parents=True)
    product.write_bytes(b"x")
    with Ledger(tmp_path / "out" / "ledger.sqlite") as ledger:
        ledger.record("science e1 uv", "fp1", Outcome("science", "20181108", "written",
                                                      products=[str(product)]))
        assert ledger.current("science e1 uv", "fp1") == [str(product)]
        assert ledger.current("science e1 uv", "fp2") is None
        assert ledger.current("science e2 uv", "fp1") is None
    # the tree moved: paths are kept relative to it
    shutil.move(tmp_path / "out", tmp_path / "moved")
    with Ledger(tmp_path / "moved" / "ledger.sqlite") as ledger:
        assert ledger.current("science e1 uv", "fp1") == [str(tmp_path / "moved/P/a.fits")]
        (tmp_path / "moved" / "P" / "a.fits").unlink()
        assert ledger.current("science e1 uv", "fp1") is None


def test_new_nights_from_ledger(tmp_path, fakeraw):
    base = tmp_path / "raw"
    fakeraw.write_tiny_exposure(base, "20181108", 1, "zro")
    fakeraw.write_tiny_exposure(base, "20181110", 1, "zro")
    (base / "20181109").mkdir()  # no lrs2 folder: not a night
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        assert new_nights(ledger, base, "h") == ["20181108", "20181110"]
        ledger.night_done("20181108", raw_stamp(base, "20181108"), 0)
        ledger.night_done("20181110", raw_stamp(base, "20181110"), 1)  # incomplete
        assert new_nights(ledger, base, "h") == ["20181110"]
        tar = next((base / "20181108" / "lrs2").glob("*.tar"))
        os.utime(tar, ns=(0, tar.stat().st_mtime_ns + 10**9))  # raw input changed
        assert new_nights(ledger, base, "h") == ["20181108", "20181110"]


# ------------------------------------------------------------------ reruns on a real night


def _mtimes(root: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*.fits")}


def test_rerun_rewrites_nothing_and_resumes_only_the_unfinished(reduced, sim_night, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reduced, out)
    argv = ["-d", sim_night.date, "-s", "uv", "--baseraw", str(sim_night.baseraw),
            "--output", str(out), "--jobs", "1"]
    before = _mtimes(out)
    assert main(argv) == 0
    assert _mtimes(out) == before  # nothing rewritten, calibrations included
    summary = json.loads((night_folder(out, sim_night.date) / "summary.json").read_text())
    statuses = {(o["kind"], o["status"]) for o in summary["outcomes"]}
    assert statuses == {("calibration", "up-to-date"), ("response", "up-to-date"),
                        ("science", "up-to-date"), ("joined", "up-to-date")}
    log = night_folder(out, sim_night.date) / f"panacea_{sim_night.date}.log"
    assert "products up to date" in log.read_text()

    # as after a run killed before this exposure-channel was written: only it is redone
    lost = next(out.glob(f"*/multi_{sim_night.date}_0000012_exp01_uv.fits"))
    lost.unlink()
    assert main(argv) == 0
    after = _mtimes(out)
    rewritten = {p for p in after if after[p] != before.get(p)}
    assert lost in rewritten
    assert {p.name for p in rewritten} <= {
        p.name for p in lost.parent.glob(f"*{sim_night.date}_0000012*")} | {
        f"joined_{sim_night.date}_0000012.fits"}
    assert not any(p.parent.name == "CALS" for p in rewritten)


# ------------------------------------------------------------------ internal errors, progress


def test_a_bug_in_a_task_is_exit_4_with_a_hint(good_archives, tmp_path, monkeypatch, caplog):
    from panacea import pipeline

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(pipeline, "channel_calibration", broken)
    with caplog.at_level(logging.ERROR):
        rc = main(["-d", "20181108", "-s", "uv,orange", "--baseraw", str(good_archives["tar"]),
                   "--output", str(tmp_path), "--jobs", "1"])
    assert rc == 4
    assert "internal error: ZeroDivisionError" in caplog.text and "please report" in caplog.text
    assert "Traceback" not in caplog.text
    summary = json.loads((night_folder(tmp_path, "20181108") / "summary.json").read_text())
    assert [o["channel"] for o in summary["outcomes"] if o["status"] == "failed"] == [
        "uv", "orange"]


def test_progress_lines_without_a_terminal(caplog):
    import io

    from panacea.ops.console import ConsoleProgress

    progress = ConsoleProgress(2, 2, stream=io.StringIO())  # not a TTY: log lines
    with caplog.at_level(logging.INFO):
        progress.channel_done("20181108", "uv")
        progress.night_done("20181108", 0, NightSummary("20181108", "."))
    assert "20181108 uv done (1/4 channels)" in caplog.text
    assert "1/2 nights done" in caplog.text
    assert progress.bar is None


def test_output_that_is_a_file_is_exit_2(tmp_path, caplog):
    out = tmp_path / "afile"
    out.write_text("not a folder")
    with caplog.at_level(logging.ERROR):
        rc = main(["-d", "20181108", "--baseraw", str(tmp_path), "--output", str(out)])
    assert rc == 2 and f"{out} is a file, not a folder" in caplog.text  # before any work
