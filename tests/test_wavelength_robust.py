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


@pytest.fixture(scope="module")
def orange_seed3(tmp_path_factory):
    """Arcs of the orange channel on randomized night seed 3, extracted on the true traces.
    Its blue end (columns < 770) holds only lines that the global identification misses by
    0.4-0.7 px while the red lines sit within 0.3 px."""
    from panacea.simulate import NightConfig, simulate_night
    from panacea.simulate.truth import load_channel

    base = tmp_path_factory.mktemp("orange3")
    cfg = NightConfig(date="20181108", seed=3, channels=("orange",), n_bias=1, n_twilight=0,
                      n_flat=0, standard="", n_science=0, extended=False, randomize=True)
    simulate_night(cfg, base, workers=1)
    truth = load_channel(base, cfg.date, "orange")
    night = Archive(base).night(cfg.date)
    frames: dict[str, list] = {}
    for exp in night.exposures(ftype="cmp", channel="orange"):
        frame = read_channel(night, exp, "orange")
        lamp = instrument.ARC_OBJECTS[str(frame.header["OBJECT"]).strip().lower()]
        frames.setdefault(lamp, []).append(frame)
    return wv.arc_spectra_from_frames(frames, truth.trace, 3.0), truth


def test_blue_lines_survive_a_low_order_change(orange_seed3, caplog):
    """Regression: the start of the final centroid pass came from a degree-2 polynomial of
    the first pass's offsets along the columns, which the red lines' pattern pulled 1-3 px
    away from the blue lines; those were lost, the model extrapolated over 770 columns and
    missed the truth by 5.5 px RMS (the log said 112 % of the detector had no lines)."""
    arcs, truth = orange_seed3
    with caplog.at_level(logging.WARNING, logger="panacea.wavelength"):
        sol = wv.solve_wavelength(arcs, "orange", truth.dead)
    err = ((sol.wave - truth.wavelength) / truth.dispersion)[~truth.dead][:, 50:-50]
    rms = float(np.sqrt(np.mean(err**2)))
    assert rms < 0.26  # measured 0.229 (main: 5.54); the 0.2 px ripple is not sampled
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
