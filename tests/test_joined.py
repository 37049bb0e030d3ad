"""Combining exposures and joining channels."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

from panacea import instrument
from panacea.joined import combine_exposures, join_channels, write_joined


def test_combine_rejects_an_outlier_and_weights_by_variance():
    rng = np.random.default_rng(0)
    truth = np.full(500, 10.0)
    err = [np.full(500, 1.0), np.full(500, 2.0), np.full(500, 1.0)]
    flux = [truth + rng.normal(0, e) for e in err]
    flux[1][100] += 500.0  # cosmic-ray residual
    mean, merr, _ = combine_exposures(flux, err)
    assert abs(mean[100] - 10.0) < 3.0
    assert merr[0] == pytest.approx(1 / np.sqrt(1 + 0.25 + 1))
    assert np.std((mean - truth) / merr) == pytest.approx(1.0, abs=0.1)
    two, _, _ = combine_exposures(flux[:1] + flux[1:2], err[:2])
    assert abs(two[100] - 10.0) < 4.0


def test_join_matches_channels_in_the_overlaps(tmp_path):
    parts = {}
    truth = {}
    for k, name in enumerate(("uv", "orange", "red", "farred")):
        grid = instrument.get_channel(name).grid
        f = 1e-16 * (grid / 5000.0) ** -2
        truth[name] = f
        parts[name] = (grid, f * (1.0 + 0.05 * k), f * 0.01, f * 0.1)
    joined = join_channels(parts)
    wave = joined["wave"]
    assert np.all(np.diff(wave) > 0) and wave[0] < 3650 and wave[-1] > 10490
    model = 1e-16 * (wave / 5000.0) ** -2
    np.testing.assert_allclose(joined["flux"] / model, 1.0, rtol=1e-6)
    assert joined["scales"]["farred"] == pytest.approx(1 / 1.15)
    path = write_joined(tmp_path / "j.fits", joined, "erg / (s cm2 Angstrom)")
    t = Table.read(path)
    assert str(t["wavelength"].unit) == "Angstrom" and len(t) == wave.size
