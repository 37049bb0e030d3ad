"""The night simulator: archive layout, headers, orientation, truth consistency, CLI."""

from __future__ import annotations

import tarfile

import numpy as np
import pytest
from astropy.io import fits

from panacea import instrument as inst
from panacea.archive import Archive
from panacea.ccd import read_channel
from panacea.cli import main
from panacea.extract import boxcar
from panacea.fluxcal import guider_header
from panacea.inventory import format_inventory
from panacea.simulate import NightConfig, simulate_night
from panacea.simulate import night as simnight
from panacea.simulate import spectra as sp
from panacea.simulate.truth import load_exposure


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as err:
        main(["-h"])
    assert err.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--date", "--sides", "--baseraw", "--use_flat", "--correct_ftf",
                 "--central_wave", "--wavelength_bin", "--source_x", "--standard_star_obsid"):
        assert flag in out
    with pytest.raises(SystemExit):
        main(["simulate", "-h"])
    assert "--seed" in capsys.readouterr().out


def test_night_layout_and_inventory(sim_night):
    night = Archive(sim_night.baseraw).night(sim_night.date)
    obs = night.observations()
    truth = sim_night.night_truth()
    assert len(night.files) == 8 * len(truth["exposures"])
    kinds = {e.ftype for e in night.exposures()}
    assert kinds == {"zro", "twi", "flt", "cmp", "sci"}
    arcs = {e.object.lower() for e in night.exposures(ftype="cmp")}
    assert arcs <= set(inst.ARC_OBJECTS) and {inst.ARC_OBJECTS[a] for a in arcs} == {
        "hg", "cd", "fear"}
    assert inst.match_standard(obs[7][0].object) == "FEIGE_34"
    assert obs[12][0].program == "HET18-2-100" and obs[7][0].program is None
    text = format_inventory(night)
    assert "Hg_B" in text and "SN2018abc" in text and "guider frames" in text
    # the standard's reference spectrum and the guider tarballs
    ref = np.loadtxt(sim_night.baseraw / "standards" / "mfeige34.dat.txt")
    assert ref.shape[1] == 2 and np.all(np.diff(ref[:, 0]) > 0)
    guiders = night.guider_files()
    assert {g.camera for g in guiders} == {"gc1", "gc2"}
    h = guider_header(night.read_bytes(guiders[0]))  # the real two-HDU layout
    assert {"GUIDLOOP", "TRANSPAR", "X_STRT", "Y_STRT", "PHI_STRT", "MJD"} <= set(h)


def test_raw_format(sim_night):
    night = Archive(sim_night.baseraw).night(sim_night.date)
    bias = night.exposures(ftype="zro")[0]
    raw = fits.getdata(__import__("io").BytesIO(night.read_bytes(bias.file("056", "LL"))),
                       do_not_scale_image_data=True)
    h = bias.header("056", "LL")
    assert raw.shape == (1032, 2128) and h["BZERO"] == 32768 and h["BITPIX"] == 16
    truth = sim_night.truth("uv")
    adu = raw.astype(float) + 32768
    # overscan noise is the true read noise in ADU
    over = adu[:, 2070:] - np.median(adu[:, 2070:], axis=1, keepdims=True)
    assert np.std(over) == pytest.approx(truth.rdnoise[0] / truth.gain[0], rel=0.05)
    assert h["GAIN"] == pytest.approx(truth.gain[0])


def test_fiber_order_and_orientation(sim_night):
    """A source at IFU fiber ID n lands in stitched fiber 280 - n; wavelength rises rightward."""
    night = Archive(sim_night.baseraw).night(sim_night.date)
    sci = night.exposures(ftype="sci")
    plan = next(p for p in sim_night.night_truth()["exposures"] if p["kind"] == "science")
    exp = next(e for e in sci if e.obsid == plan["obsid"])
    xy = inst.fiber_positions()  # IFU position of stitched fiber k (IFU ID 280 - k)
    for name in ("orange",):  # 5000 A, the simulator's refraction reference, is in orange
        truth = sim_night.truth(name)
        frame = read_channel(night, exp, name)
        flux, _ = boxcar(frame.image, truth.trace + plan["trace_shift"], 3.0)
        near = np.abs(truth.wavelength - 5000.0).argmin(axis=1)  # column of 5000 A per fiber
        cols = near[:, None] + np.arange(-60, 61)[None, :]
        signal = np.median(np.take_along_axis(flux, cols, axis=1), axis=1)
        thru = np.where(truth.dead, 1, truth.throughput[:, 1000])
        signal = np.where(truth.dead, 0, signal / thru)
        signal -= np.median(signal)
        core = signal > 0.2 * signal.max()
        centroid = (signal[core, None] * xy[core]).sum(0) / signal[core].sum()
        # the lenslets sample the star coarsely: the centroid lands within a third of a pitch
        assert np.hypot(*(centroid - np.array(plan["source_xy"]))) < 0.2
        assert np.all(np.diff(truth.wavelength, axis=1) > 0)
    # uv Hg arc: 4046 A lies left of 4358 A in every fiber
    hg = next(e for e in night.exposures(ftype="cmp") if e.object.lower().startswith("hg"))
    frame = read_channel(night, hg, "uv")
    truth = sim_night.truth("uv")
    flux, _ = boxcar(frame.image, truth.trace, 3.0)
    med = np.median(flux[~truth.dead], axis=0)
    c4358 = np.argmax(med)
    c4046 = np.argmax(np.where(np.abs(np.arange(med.size) - c4358) > 50, med, 0))
    assert c4046 < c4358
    col = np.argmin(np.abs(truth.wavelength[140] - 4358.33))
    assert abs(c4358 - col) <= 2


def test_truth_is_consistent_with_frames(sim_night):
    """Sky + source truth explains the science frame to the noise level."""
    night = Archive(sim_night.baseraw).night(sim_night.date)
    plan = next(p for p in sim_night.night_truth()["exposures"] if p["kind"] == "science")
    exp = next(e for e in night.exposures(ftype="sci") if e.obsid == plan["obsid"])
    truth = sim_night.truth("orange")
    parts = load_exposure(sim_night.baseraw, sim_night.date, plan["obsid"], plan["exp"], "orange")
    frame = read_channel(night, exp, "orange")
    ch = inst.get_channel("orange")
    bias = inst.stitch(*(inst.orient(truth.bias_adu[a], amp, amp) * truth.gain[a]
                         for a, amp in enumerate(ch.amps)))
    clean = np.where(parts["cosmic"].astype(bool), 0.0, frame.image - bias)
    cols = slice(200, 1800)
    expected = (parts["sky"] + parts["source"])[:, cols].sum()
    # all light of all fibers, up to the pixel flat (mean 1, 1% per pixel) and Poisson noise
    assert clean[:, cols].sum() / expected == pytest.approx(1.0, abs=0.003)
    assert parts["cosmic"].sum() > 100


def test_compressed_and_plain_nights_are_identical(tmp_path):
    kw = {"date": "20190301", "seed": 5, "channels": ("uv",), "n_bias": 2, "n_twilight": 1,
          "n_flat": 0, "arcs": ("hg",), "standard": "", "n_science": 0, "extended": False}
    simulate_night(NightConfig(**kw), tmp_path / "plain", workers=1)
    simulate_night(NightConfig(**kw, compress=True), tmp_path / "gz", workers=1)
    assert (tmp_path / "gz" / "20190301" / "lrs2" / "lrs20000002.tar.gz").exists()
    with tarfile.open(tmp_path / "plain" / "20190301" / "lrs2" / "lrs20000002.tar") as tf:
        assert all(n.endswith("_twi.fits") for n in tf.getnames())
    a = Archive(tmp_path / "plain").night("20190301")
    b = Archive(tmp_path / "gz").night("20190301")
    ea, eb = a.exposures(ftype="twi")[0], b.exposures(ftype="twi")[0]
    fa, fb = read_channel(a, ea, "uv"), read_channel(b, eb, "uv")
    assert np.array_equal(fa.image, fb.image)


def test_cli_simulate_and_inventory(tmp_path, capsys):
    rc = main(["simulate", "--date", "20190302", "--out", str(tmp_path), "--channels", "uv",
               "--n-bias", "2", "--n-twilight", "1", "--n-science", "1", "--no-extended",
               "--workers", "1"])
    assert rc == 0
    assert "simulated night 20190302" in capsys.readouterr().out
    assert main(["inventory", "-d", "20190302", "--baseraw", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "SN2018abc" in out and "bias" in out
    # a date without data exits non-zero with a message naming the folder
    assert main(["inventory", "-d", "20190303", "--baseraw", str(tmp_path)]) == 2
    assert main(["-d", "20190303", "--baseraw", str(tmp_path)]) == 2
    assert main(["-d", "20190302", "--baseraw", str(tmp_path / "nowhere")]) == 2


def test_randomized_psf_sources_standards_and_atmosphere_stay_in_their_ranges():
    """Per seed: PSF family and beta 2.5-4.5, seeing within 0.8-2.5", sources at least the
    drawn margin inside the IFU edge, coarse reference steps, telluric and edges drawn; the
    default night draws none of them."""
    from panacea.simulate import nuisance

    default = nuisance.draw(0, "20181108", False)
    assert default.pwv_mm == default.o2_scale == default.edge_width == 0.0
    assert not default.stellar_lines and default.psf_model == "moffat"
    models = set()
    half = inst.LENSLET_PITCH / 2
    xmax, ymax = inst.fiber_positions().max(axis=0) + half
    for seed in range(12):
        nz = nuisance.draw(seed, "20190101", True)
        models.add(nz.psf_model)
        assert 2.5 <= nz.psf_beta <= 4.5 and abs(nz.psf_beta_slope) <= 0.6
        assert 0.8 <= nz.seeing_range[0] <= nz.seeing_range[1] <= 2.5
        assert nz.reference_step in (1.0, 2.0, 5.0, 10.0) and nz.stellar_lines
        assert 1.0 <= nz.pwv_mm <= 8.0 and nz.edge_width > 0
        plans = simnight.plan_night(simnight.NightConfig("20190101", seed=seed,
                                                         randomize=True))
        for p in plans:
            if p.kind == "science":
                assert nz.seeing_range[0] <= p.seeing <= nz.seeing_range[1]
                assert p.psf_model == nz.psf_model and p.pwv_mm == nz.pwv_mm
                x, y = p.source_xy
                assert abs(x) <= xmax - nz.edge_margin + 1e-9
                assert abs(y) <= ymax - nz.edge_margin + 1e-9
    assert models == {"moffat", "gauss"}


def test_randomized_reference_is_coarse_and_absorption_reaches_the_light(tmp_path):
    from panacea.simulate import nuisance

    nz = nuisance.Nuisances(randomized=True, stellar_lines=True, reference_step=10.0,
                            reference_binned=True)
    table = np.loadtxt(simnight.write_standard(tmp_path, "FEIGE_34", nz))
    assert np.allclose(np.diff(table[:, 0]), 10.0)
    # binned: the H-beta bin holds the mean of the line, shallower than its core
    k = int(np.argmin(np.abs(table[:, 0] - 4860.0)))
    core = sp.flambda_to_ab(sp.standard_flambda("FEIGE_34", np.array([4861.3]), strong_lines=True),
                            np.array([4861.3]))[0]
    assert table[k, 1] < core - 0.05
    w = np.arange(7550.0, 7750.0, 0.1)
    t = sp.telluric_transmission(w, 5.0, 1.0, 1.22)
    assert t.min() < 0.1 and np.all(t <= 1.0)
    assert np.all(sp.telluric_transmission(w, 0.0, 0.0, 1.22) == 1.0)
    ch = inst.get_channel("uv")
    edged = sp.response(ch, ch.grid, (10.0, 15.0)) / sp.response(ch, ch.grid)
    assert edged[0] > 3 and edged[ch.grid.size // 2] == pytest.approx(1.0, abs=1e-6)
