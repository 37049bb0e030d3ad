"""The QA figures kept per process (sky residual, collapsed IFU, spectrum) are filled again
for each exposure: the PNG of an exposure must not depend on what was drawn before it."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from panacea import instrument
from panacea.qa import plots


def _exposure(seed: int, source: bool) -> dict:
    """Arrays of one made-up exposure, different in scale and shape for each seed."""
    rng = np.random.default_rng(seed)
    grid = np.linspace(4600.0, 7000.0, 1500) + 300 * seed
    nfib = instrument.NFIBERS
    sky = (1 + seed) * (1.0 + np.exp(-0.5 * ((grid - grid[700]) / 3.0) ** 2))
    err = np.full((nfib, grid.size), 0.1 * (1 + seed))
    err[: 20 * seed] = 0.0  # some fibers without data
    sub = rng.normal(0.0, err + 1e-9) * (err > 0)
    use = np.ones(nfib, bool)
    use[::7] = False
    chi = np.where(err > 0, sub / np.where(err > 0, err, 1.0), np.nan)[use]
    lines = np.zeros(grid.size, bool)
    lines[690:711] = True
    level = rng.normal(0.0, 1.0 + seed, nfib)
    header = {"SOURCEX": 2.9 - seed, "SOURCEY": -1.0, "SEEING": 1.2 + seed} if source else {}
    spec = np.vstack([grid, 10 + seed * grid / 1000 + rng.normal(0, 1, grid.size),
                      sky[None, :][0] * 3, np.full(grid.size, 0.5 + seed),
                      np.full(grid.size, 0.1), np.ones(grid.size)])
    spec[3, : 100 * seed] = 0.0
    return {"grid": grid, "sub": sub, "sky": np.broadcast_to(sky, sub.shape), "err": err,
            "use": use, "chi": chi, "lines": lines, "level": level, "header": header,
            "spec": spec}


def _draw(e: dict, folder, tag: str) -> list[bytes]:
    paths = [
        plots.plot_sky_residuals(e["grid"], e["sub"], e["sky"], e["err"], e["use"], e["chi"],
                                 e["lines"], folder / f"sky_{tag}.png", "sky"),
        plots.plot_collapsed(e["level"], e["header"], folder / f"ifu_{tag}.png", "ifu"),
        plots.plot_spectrum(e["spec"], folder / f"spec_{tag}.png", "erg", "spectrum"),
    ]
    return [p.read_bytes() for p in paths]


def test_a_reused_figure_draws_what_a_new_one_draws(tmp_path):
    first, second = _exposure(0, source=True), _exposure(1, source=False)
    plots._FIGURES.clear()
    _draw(first, tmp_path, "a")  # the kept figures now hold the first exposure
    after = _draw(second, tmp_path, "b")
    assert set(plots._FIGURES) == {"sky", "collapsed", "spectrum"}
    plots._FIGURES.clear()  # new figures for the second exposure alone
    fresh = _draw(second, tmp_path, "c")
    assert after == fresh
    # and back: a source again after none (the hidden marker and circle shown again)
    again = _draw(first, tmp_path, "d")
    plots._FIGURES.clear()
    assert again == _draw(first, tmp_path, "e")
    assert again != after  # the figures did change with the data
    assert not list(tmp_path.glob(".*.part"))


def _arc_residuals(seed: int, nline: int) -> tuple:
    rng = np.random.default_rng(seed)
    column = np.linspace(50, 2000, nline)[:, None] + rng.normal(0, 3, (nline, 280))
    resid = rng.normal(0, 0.02 * (1 + seed), (nline, 280))
    resid[0, :40] = np.nan
    return column, resid, np.linspace(4000, 5000, nline)


def test_the_kept_arc_residual_figure_draws_what_a_new_one_draws(tmp_path):
    """Channels with fewer arc lines than the one before hide the extra markers."""
    many, few = _arc_residuals(0, 25), _arc_residuals(1, 12)
    plots._FIGURES.clear()
    plots.plot_wave_residuals(*many, tmp_path / "a.png", "many")
    after = plots.plot_wave_residuals(*few, tmp_path / "b.png", "few").read_bytes()
    plots._FIGURES.clear()
    fresh = plots.plot_wave_residuals(*few, tmp_path / "c.png", "few").read_bytes()
    plots._FIGURES.clear()
    assert after == fresh
    assert (tmp_path / "a.png").read_bytes() != fresh
