"""Night QA: thresholds, arc residuals against a known shift, the report of the simulated
night against the simulator's truth, the metrics table, and a damaged night whose
dead amplifier, missing arc lamp and cloud turn the right rows warn or fail."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from panacea.qa.metrics import arc_residuals, judge, metrics_table

DATE = "20181108"


def _rows(doc: dict, channel: str, obsid: int | None = None, exp: int | None = None
          ) -> dict[str, dict]:
    """Metric rows (name -> row) of a channel, or of one exposure of it."""
    if obsid is None:
        scope = next(c for c in doc["channels"] if c["channel"] == channel)
    else:
        scope = next(e for e in doc["exposures"] if e["channel"] == channel
                     and e["obsid"] == obsid and e["exp"] == exp)
    return {m["name"].split("[")[0]: m for m in scope["metrics"]}


def test_judge_levels():
    table = {"a": {"warn_above": 1.0, "fail_above": 2.0},
             "b": {"abs": True, "warn_above": 1.0, "fail_above": 2.0},
             "c": {"abs_from": 1.0, "warn_above": 0.05, "fail_above": 0.25},
             "d": {"warn_below": 0.7, "fail_below": 0.4},
             "e": {"warn_if": ["bundled default"]}}
    assert [judge("a", v, thresholds=table).status for v in (0.5, 1.5, 2.5)] == [
        "pass", "warn", "fail"]
    assert judge("b", -1.5, thresholds=table).status == "warn"
    assert judge("b", -1.5, thresholds=table).value == -1.5  # shown with its sign
    assert [judge("c[RL/RU]", v, thresholds=table).status for v in (1.01, 0.9, 0.02)] == [
        "pass", "warn", "fail"]
    assert [judge("d", v, thresholds=table).status for v in (0.9, 0.5, 0.3)] == [
        "pass", "warn", "fail"]
    assert judge("e", "bundled default response", thresholds=table).status == "warn"
    assert judge("e", "FEIGE_34 20181108 obs 7", thresholds=table).status == "pass"
    assert judge("a", float("nan"), thresholds=table).status == "info"
    assert judge("unknown", 3.0, thresholds=table).status == "info"


def test_bundled_thresholds_cover_judged_metrics():
    """Every threshold entry names its unit and at least one level."""
    from panacea.qa.metrics import load_thresholds

    for name, rule in load_thresholds().items():
        assert "unit" in rule, name
        assert any(k.startswith(("warn", "fail")) for k in rule), name


def test_arc_residuals_recover_a_known_offset():
    """Gaussian arc lines (FWHM 4.3 px) placed 0.3 px redward of where the solution puts
    them, at sub-pixel phases: the residual is 0.3 px x dispersion within 0.005 px (a
    windowed centroid is off by up to 0.1 px at some phases); blended pairs may be lost."""
    ncol, nfib = 2064, 12
    cols = np.arange(ncol, dtype=float)
    disp = 1.1 + 1e-5 * cols  # Angstrom per px, slowly varying
    wave0 = 4700.0 + np.cumsum(disp) - disp[0]
    rng = np.random.default_rng(3)
    at = 100 + 130 * np.arange(15) + rng.uniform(0, 1, 15)  # every sub-pixel phase
    lines = np.interp(at, cols, wave0)
    wave = np.tile(wave0, (nfib, 1)) + rng.uniform(-2, 2, (nfib, 1))  # per-fiber offsets
    sigma = 4.3 / 2.3548
    arc = np.full((nfib, ncol), 20.0)
    for f in range(nfib):
        for line in lines:
            c = np.interp(line, wave[f], cols) + 0.3
            arc[f] += 5000.0 * np.exp(-0.5 * ((cols - c) / sigma) ** 2)
    column, resid = arc_residuals(wave, arc, lines)
    local = np.interp(column, cols, disp)
    ok = np.isfinite(resid)
    assert ok.all()
    np.testing.assert_allclose((resid / local)[ok], 0.3, atol=0.005)


def test_good_night_report(reduced, sim_night):
    """The night run wrote metrics.json and the pages; nothing fails on a clean night, and
    the metrics agree with the simulator's truth (source positions and FWHM are stated at
    each channel's reference wavelength; test_source checks them against truth)."""
    night = reduced / "NIGHTS" / DATE
    doc = json.loads((night / "metrics.json").read_text())
    assert {c["channel"] for c in doc["channels"]} == {"uv", "orange", "red", "farred"}
    statuses = [m["status"] for s in doc["channels"] + doc["exposures"] for m in s["metrics"]]
    assert "fail" not in statuses
    assert statuses.count("warn") <= 2
    truth = {(e["obsid"], e["exp"]): e for e in sim_night.night_truth()["exposures"]}
    for e in doc["exposures"]:
        rows = {m["name"].split("[")[0]: m for m in e["metrics"]}
        t = truth[(e["obsid"], e["exp"])]
        assert rows["transparency"]["value"] == pytest.approx(t["transparency"], abs=0.02)
        assert rows["amp_ratio"]["value"] == pytest.approx(1.0, abs=0.05)
        assert rows["sky_chi_continuum"]["value"] == pytest.approx(1.0, abs=0.1)
    for ch in ("uv", "orange", "red", "farred"):
        rows = _rows(doc, ch)
        assert rows["read_noise"]["value"] == pytest.approx(3.0, abs=0.6)
        assert rows["arc_lamps_missing"]["value"] == 0
        assert rows["wave_resid_rms"]["value"] < 0.1
    assert _rows(doc, "farred")["dead_fibers"]["value"] == 2  # the farred RU amp's two
    pngs = sorted((night / "qa").glob("*.png"))
    assert len(pngs) >= 4 * 4 + len(doc["exposures"]) * 2
    html = (night / "report.html").read_text()
    for png in pngs:
        if png.stem.startswith(("trace", "wave", "ftf", "response")):
            assert f"qa/{png.name}" in html


def test_metrics_table(reduced, tmp_path):
    out = tmp_path / "metrics.csv"
    rows = metrics_table(reduced, out)
    with open(out) as fh:
        back = list(csv.DictReader(fh))
    assert len(back) == len(rows) > 100
    assert {r["date"] for r in back} == {DATE}
    assert any(r["metric"] == "transparency" and r["obsid"] == "12" for r in back)


# --------------------------------------------------------------------------- damaged night


def _kill_amp(tar_path: Path, markers: tuple[str, ...]) -> None:
    """Rewrite the amp file whose member name contains all ``markers``: bias (its own overscan
    level per row) and read noise only, as an amplifier that delivers no signal."""
    members = []
    with tarfile.open(tar_path) as tar:
        for m in tar.getmembers():
            data = tar.extractfile(m).read() if m.isfile() else None
            if data is not None and all(k in m.name for k in markers):
                with fits.open(io.BytesIO(data)) as hdul:
                    raw = hdul[0].data.astype(float)
                    over = raw[:, -64:]
                    rng = np.random.default_rng(5)
                    dead = (np.median(over, axis=1)[:, None]
                            + rng.normal(0, over.std(), raw.shape))
                    hdul[0].data = np.clip(np.round(dead), 0, 65535).astype(np.uint16)
                    buf = io.BytesIO()
                    hdul.writeto(buf)
                data = buf.getvalue()
                m.size = len(data)
            members.append((m, data))
    with tarfile.open(tar_path, "w") as tar:
        for m, data in members:
            tar.addfile(m, io.BytesIO(data) if data is not None else None)


@pytest.fixture(scope="module")
def damaged_night(tmp_path_factory, monkeypatch_module):
    """An orange-only night without the Cd lamp, a cloud (transparency 0.3) over science
    exposure 2 and amplifier RL dead in science exposure 1; reduced through the command
    line."""
    from panacea.cli import main
    from panacea.simulate import NightConfig, night

    plan = night.plan_night

    def cloudy(cfg):
        plans = plan(cfg)
        for p in plans:
            if p.kind == "science" and p.exp == 2:
                p.transparency = 0.3
        return plans

    monkeypatch_module.setattr(night, "plan_night", cloudy)
    base = tmp_path_factory.mktemp("damaged")
    cfg = NightConfig(date=DATE, seed=21, channels=("orange",), n_bias=3, n_twilight=2,
                      n_flat=1, arcs=("hg", "fear"), standard=None, n_science=2,
                      extended=False)
    night.simulate_night(cfg, base, workers=1)
    _kill_amp(base / DATE / "lrs2" / "lrs20000012.tar", ("/exp01/", "_056RL_"))
    out = tmp_path_factory.mktemp("damaged_reduced")
    rc = main(["-d", DATE, "-s", "orange", "--baseraw", str(base), "--output", str(out)])
    return out, rc


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_damaged_night_flags_the_right_rows(damaged_night):
    out, rc = damaged_night
    assert rc == 0  # every product was written: the damage is for QA to flag
    doc = json.loads((out / "NIGHTS" / DATE / "metrics.json").read_text())
    assert doc["status"] == "fail"
    cal = _rows(doc, "orange")
    assert cal["arc_lamps_missing"]["value"] == 1
    assert cal["arc_lamps_missing"]["status"] == "warn"
    assert "missing cd" in cal["arc_lamps"]["value"]
    assert cal["read_noise"]["status"] == "pass"  # the biases were fine
    dead, cloud = _rows(doc, "orange", 12, 1), _rows(doc, "orange", 12, 2)
    assert dead["amp_ratio"]["status"] == "fail"
    assert dead["amp_ratio"]["value"] < 0.2
    assert dead["transparency"]["status"] == "pass"
    assert cloud["transparency"]["status"] == "fail"
    assert cloud["transparency"]["value"] == pytest.approx(0.3, abs=0.03)
    assert cloud["amp_ratio"]["status"] == "pass"
    for rows in (dead, cloud):
        assert rows["response_used"]["status"] == "warn"  # no standard: bundled response
    html = (out / "NIGHTS" / DATE / "report.html").read_text()
    assert 'class="fail">fail' in html and 'class="warn">warn' in html


def test_report_command_rebuilds(damaged_night, tmp_path):
    from panacea.cli import main

    out, _ = damaged_night
    report = out / "NIGHTS" / DATE / "report.html"
    report.unlink()
    table = tmp_path / "all.csv"
    assert main(["report", "-d", DATE, "--output", str(out), "--table", str(table)]) == 0
    assert report.exists() and table.stat().st_size > 0
    assert main(["report", "-d", DATE, "--output", str(tmp_path / "nowhere")]) == 2
    assert main(["report", "-d", "20181109", "--output", str(out)]) == 2  # no products


def test_report_reuses_up_to_date_channel_fragments(damaged_night):
    """The channel task left its channel's fragment; the night report reuses it (no plot
    redrawn), recomputes it to the same metrics when a product changed, and rebuilds it
    when it is missing."""
    import os

    from panacea.qa.channel_report import fragment_path
    from panacea.qa.report import write_night_report

    out, _ = damaged_night
    night = out / "NIGHTS" / DATE
    frag = fragment_path(out, DATE, "orange")  # the damaged night is orange only
    assert frag.exists()
    before = json.loads((night / "metrics.json").read_text())
    stamp = {p: p.stat().st_mtime_ns for p in (night / "qa").glob("*.png")
             if not p.name.startswith("joined_")}
    t0 = frag.stat().st_mtime_ns
    write_night_report(out, DATE)
    assert frag.stat().st_mtime_ns == t0
    assert all(p.stat().st_mtime_ns == t for p, t in stamp.items())
    multi = next(out.glob(f"*/multi_{DATE}_*_exp01_orange.fits"))
    os.utime(multi, ns=(multi.stat().st_atime_ns, multi.stat().st_mtime_ns + 10**9))
    write_night_report(out, DATE)
    assert frag.stat().st_mtime_ns != t0
    assert json.loads((night / "metrics.json").read_text()) == before
    frag.unlink()
    write_night_report(out, DATE)
    assert frag.exists()
    assert json.loads((night / "metrics.json").read_text()) == before
