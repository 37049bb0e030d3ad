"""Wavelength solutions on randomized nights (issue 12): arcs with a low-order change of a
few px, missing, unlisted and blended lines; judged against the simulator's truth."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest

from panacea import instrument
from panacea import wavelength as wv
from panacea.archive import Archive
from panacea.ccd import read_channel


def _randomized_arcs(base, seed: int, channel: str):
    """Arcs of one channel on randomized night ``seed`` (only arcs and one bias simulated,
    about 4 s), extracted on the true traces, with the channel's truth."""
    from panacea.simulate import NightConfig, simulate_night
    from panacea.simulate.truth import load_channel

    cfg = NightConfig(date="20181108", seed=seed, channels=(channel,), n_bias=1,
                      n_twilight=0, n_flat=0, standard="", n_science=0, extended=False,
                      randomize=True)
    simulate_night(cfg, base, workers=1)
    truth = load_channel(base, cfg.date, channel)
    night = Archive(base).night(cfg.date)
    frames: dict[str, list] = {}
    for exp in night.exposures(ftype="cmp", channel=channel):
        frame = read_channel(night, exp, channel)
        lamp = instrument.ARC_OBJECTS[str(frame.header["OBJECT"]).strip().lower()]
        frames.setdefault(lamp, []).append(frame)
    return wv.arc_spectra_from_frames(frames, truth.trace, 3.0), truth


def _cal_rms(wave: np.ndarray, truth) -> float:
    """RMS (px) against truth over live fibers, columns 50..ncol-50 (as the benchmark)."""
    err = ((wave - truth.wavelength) / truth.dispersion)[~truth.dead][:, 50:-50]
    return float(np.sqrt(np.mean(err**2)))


@pytest.fixture(scope="module")
def orange_seed3(tmp_path_factory):
    """Orange on seed 3: its blue end (columns < 770) holds only lines that the global
    identification misses by 0.4-0.7 px while the red lines sit within 0.3 px."""
    return _randomized_arcs(tmp_path_factory.mktemp("orange3"), 3, "orange")


def test_blue_lines_survive_a_low_order_change(orange_seed3, caplog):
    """Regression: the start of the final centroid pass came from a degree-2 polynomial of
    the first pass's offsets along the columns, which the red lines' pattern pulled 1-3 px
    away from the blue lines; those were lost, the model extrapolated over 770 columns and
    missed the truth by 5.5 px RMS (the log said 112 % of the detector had no lines)."""
    arcs, truth = orange_seed3
    with caplog.at_level(logging.WARNING, logger="panacea.wavelength"):
        sol = wv.solve_wavelength(arcs, "orange", truth.dead)
    rms = _cal_rms(sol.wave, truth)
    assert rms < 0.22  # measured 0.209 (main: 5.54); the 0.2 px ripple is not sampled
    used = sol.lines.status == "used"
    assert np.any(used & (sol.lines.expected < 400))  # Hg 4916 at column 317
    assert np.nanmedian(sol.rms_pix) < 0.15
    for rec in caplog.records:  # a fraction of the detector is never above 100 %
        for pct in re.findall(r"(\d+)% of the detector", rec.getMessage()):
            assert int(pct) <= 100


def test_a_model_that_misses_the_lines_is_refused(orange_seed3):
    """A linear model leaves px residuals: the solver refuses it, naming the channel."""
    arcs, truth = orange_seed3
    with pytest.raises(wv.WavelengthError, match=r"orange: .*median fiber RMS"):
        wv.solve_wavelength(arcs, "orange", truth.dead, deg_x=1, choose=False)


def test_line_residuals_follow_the_ripple(tmp_path):
    """uv on seed 3 (ripples 0.19 px with periods of 150-600 px, 20 lines): interpolating the
    polynomial's residuals between the lines, chosen by the held-out lines, halves the error
    against truth; at the lines the model keeps following the measurements."""
    arcs, truth = _randomized_arcs(tmp_path, 3, "uv")
    sol = wv.solve_wavelength(arcs, "uv", truth.dead)
    assert sol.choice["interp"] and sol.choice["method"] == "cv+lines"
    assert sol.choice["interp_cv"][1] < sol.choice["interp_cv"][0]
    rms = _cal_rms(sol.wave, truth)
    assert rms < 0.055  # measured 0.0485; the polynomial alone 0.0858 (main)
    # the column model and the wavelengths agree: column(wave) returns the pixel centres
    cols = np.array([sol.column(sol.wave[k, 200:1900:100], np.array([k]))[0]
                     for k in (10, 140, 270)])
    assert np.allclose(cols, np.arange(200, 1900, 100)[None, :], atol=0.003)
    line_rms = sol.line_table()[sol.lines.status == "used", 3]
    assert np.median(line_rms) < 0.05
