"""Cubes (panacea.cube) and fiber astrometry (panacea.astrometry)."""

from __future__ import annotations

import datetime as dt
import itertools
import logging

import astropy.units as u
import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.wcs import WCS
from scipy.special import erf

from panacea import astrometry, instrument
from panacea.cube import build_cube, cube_name, offset_chunks, write_cube

XY = instrument.fiber_positions()
P = instrument.LENSLET_PITCH
NF = instrument.NFIBERS


def brick_flux(x0, y0, fwhm=1.5, xy=XY):
    """Flux of a unit Gaussian source at (x0, y0) falling on each lenslet.

    The lenslets are 0.59" squares centred on the fibers; with alternate rows offset by half a
    pitch they tile the plane (a brick pattern), so the integrals are exact.
    """
    s = fwhm / 2.3548 * np.sqrt(2.0)
    x0 = np.asarray(x0, float)[..., None]
    y0 = np.asarray(y0, float)[..., None]

    def band(c, c0):
        return 0.5 * (erf((c + P / 2 - c0) / s) - erf((c - P / 2 - c0) / s))

    return band(xy[:, 0], x0) * band(xy[:, 1], y0)  # (..., nfiber)


def centroids(cube):
    """Flux-weighted centroid (x, y) of every plane, ignoring blank spaxels."""
    X, Y = cube.spaxel_xy()
    w = np.nan_to_num(cube.data.astype(float))
    tot = w.sum(axis=(1, 2))
    return (w * X).sum(axis=(1, 2)) / tot, (w * Y).sum(axis=(1, 2)) / tot


def inner(cube, dx=0.0, dy=0.0):
    """Spaxels inside the fiber footprint (with a small inset)."""
    X, Y = cube.spaxel_xy()
    return (np.abs(X) <= 6.195 - dx) & (np.abs(Y) <= 3.54 - dy)


# --------------------------------------------------------------------------- resampling


@pytest.mark.parametrize("x0, y0", [(1.23, -0.71), (-3.4, 1.9)])
def test_point_source_centroid_and_flux(x0, y0):
    flux = brick_flux(x0, y0)
    grid = np.array([5000.0, 5001.0])
    spec = np.repeat(flux[:, None], 2, axis=1) * 100.0
    cube = build_cube(spec, np.ones_like(spec), XY, grid)
    assert cube.data.shape == (2, cube.y.size, cube.x.size)
    assert cube.data.dtype == np.float32
    assert cube.pitch == 0.4 and np.allclose(np.diff(cube.x), 0.4)
    cx, cy = centroids(cube)
    assert np.hypot(cx[0] - x0, cy[0] - y0) < 0.03
    # flux: sum over spaxels times (0.4 / 0.59)^2 is the sum over the fibers
    ratio = np.nansum(cube.data[0]) * (0.4 / 0.59) ** 2 / spec[:, 0].sum()
    assert cube.flux_scale == pytest.approx((0.4 / 0.59) ** 2)
    assert abs(ratio - 1) < 0.01
    # the peak spaxel is the one nearest to the source
    j, i = np.unravel_index(np.nanargmax(cube.data[0]), cube.data[0].shape)
    assert abs(cube.x[i] - x0) <= 0.2 + 1e-9 and abs(cube.y[j] - y0) <= 0.2 + 1e-9
    # per-spaxel values carry that factor
    cube2 = build_cube(spec, np.ones_like(spec), XY, grid, per_spaxel=True)
    assert np.nansum(cube2.data[0]) / spec[:, 0].sum() == pytest.approx(ratio, rel=1e-5)


def test_footprint_constant_and_linear_fields():
    grid = np.array([4000.0, 4001.0])
    const = np.full((NF, 2), 3.7)
    cube = build_cube(const, np.full((NF, 2), 0.1), XY, grid)
    # the grid covers the IFU plus about a lenslet, centred on the IFU centre
    assert cube.x[0] <= -6.195 - 0.5 and cube.x[-1] >= 6.195 + 0.5
    assert cube.y[0] <= -3.54 - 0.5 and cube.y[-1] >= 3.54 + 0.5
    assert np.any(np.isclose(cube.x, 0)) and np.any(np.isclose(cube.y, 0))
    ins = inner(cube)
    vals = cube.data[0][ins]
    assert np.all(np.isfinite(vals))
    assert np.std(vals) / np.mean(vals) < 0.01
    assert np.mean(vals) == pytest.approx(3.7, rel=1e-4)
    # blank beyond half a lenslet diagonal from every fiber, filled within it
    X, Y = cube.spaxel_xy()
    dmin = np.min(np.hypot(X[..., None] - XY[:, 0], Y[..., None] - XY[:, 1]), axis=-1)
    assert np.all(np.isnan(cube.data[0][dmin > P / np.sqrt(2) + 1e-9]))
    assert np.all(np.isfinite(cube.data[0][dmin < P / np.sqrt(2) - 1e-9]))
    # so the cube area is the IFU area (280 lenslets of 0.59" x 0.59") to a few per cent
    area = np.isfinite(cube.data[0]).sum() * 0.4**2
    assert area / (NF * P**2) == pytest.approx(1.0, abs=0.05)
    # a gentle gradient is reproduced inside the footprint
    field = 10.0 + 0.5 * XY[:, 0] - 0.3 * XY[:, 1]
    cube = build_cube(np.repeat(field[:, None], 2, axis=1), np.ones((NF, 2)), XY, grid)
    ins = inner(cube, 0.6, 0.6)
    truth = 10.0 + 0.5 * X - 0.3 * Y
    assert np.max(np.abs(cube.data[0][ins] / truth[ins] - 1)) < 0.01


def test_error_cube_matches_scatter():
    # 600 planes of pure noise: the reported error must match the scatter between planes
    rng = np.random.default_rng(3)
    nw = 600
    sig = np.where(np.arange(NF) % 3 == 0, 2.0, 1.0)[:, None] * np.ones((1, nw))
    spec = rng.standard_normal((NF, nw)) * sig
    cube = build_cube(spec, sig, XY, np.arange(nw, dtype=float) + 4000.0)
    ins = inner(cube, 0.6, 0.6)
    scatter = np.std(cube.data[:, ins], axis=0)
    reported = np.mean(cube.error[:, ins], axis=0)
    assert np.median(scatter / reported) == pytest.approx(1.0, abs=0.05)
    # the variance input gives the same error cube
    cube_v = build_cube(spec, sig**2, XY, cube.wave, variance=True)
    np.testing.assert_allclose(cube_v.error[:, ins], cube.error[:, ins], rtol=1e-5)


def test_refraction_offsets_keep_source_fixed():
    nw = 150
    grid = np.linspace(3640.0, 4645.0, nw)
    dx = 1.3 * ((4000.0 / grid) ** 2 - (4000.0 / 4140.0) ** 2)  # 0.6" of drift
    dy = -0.6 * dx
    x0, y0 = 0.8, -0.4
    spec = brick_flux(x0 + dx, y0 + dy).T  # (nfiber, nwave): the source moves
    err = np.ones_like(spec)
    cube = build_cube(spec, err, XY, grid, offsets=(dx, dy))
    assert cube.adr_corrected and cube.nchunks > 10
    cx, cy = centroids(cube)
    assert np.max(np.hypot(cx - x0, cy - y0)) < 0.03
    assert np.ptp(cx) < 0.03 and np.ptp(cy) < 0.03
    # without the offsets the centroid follows the drift (the check above can fail)
    plain = build_cube(spec, err, XY, grid)
    px, _ = centroids(plain)
    assert np.ptp(px) > 0.4
    np.testing.assert_allclose(px - x0, dx, atol=0.03)


def test_offset_chunks_respect_tolerance():
    dx = np.linspace(0.0, 0.5, 1000)
    dy = np.zeros(1000)
    chunks = offset_chunks(dx, dy, 0.02)
    assert chunks[0][0] == 0 and chunks[-1][1] == 1000
    assert all(a[1] == b[0] for a, b in itertools.pairwise(chunks))
    for start, stop, ox, _ in chunks:
        assert np.max(np.abs(dx[start:stop] - ox)) < 0.02
    assert 20 <= len(chunks) <= 30
    assert len(offset_chunks(np.zeros(50), np.zeros(50))) == 1


@pytest.mark.parametrize("k", [int(np.argmin(np.hypot(XY[:, 0] - 0.3, XY[:, 1] - 0.3))),
                               int(np.argmin(XY[:, 0] + 2 * XY[:, 1]))])  # interior, corner
def test_masked_fiber_pixels_leave_no_holes_or_spikes(k):
    nw = 40
    grid = np.linspace(6500.0, 6540.0, nw)
    field = 5.0 + 3.0 * np.exp(-0.5 * ((XY[:, 0] - 1) ** 2 + XY[:, 1] ** 2) / 4.0**2)
    spec = np.repeat(field[:, None], nw, axis=1)
    err = np.full_like(spec, 0.2)
    ref = build_cube(spec, err, XY, grid)
    bad_spec, bad_err = spec.copy(), err.copy()
    bad_err[k, 10:30] = 0.0          # zero error marks bad pixels ...
    bad_spec[k, 10:30] = 1e6         # ... whose values must be ignored
    bad_err[k, 30:35] = np.nan       # NaN error
    bad_spec[k, 35:] = np.nan        # NaN data
    cube = build_cube(bad_spec, bad_err, XY, grid)
    ins = inner(cube)
    assert np.all(np.isfinite(cube.data[:, ins]))
    assert np.all(np.isfinite(cube.error[:, ins]))
    rel = np.abs(cube.data[:, ins] / ref.data[:, ins] - 1)
    assert rel.max() < 0.01
    np.testing.assert_array_equal(cube.data[:10], ref.data[:10])  # good planes untouched
    # the error changes near the lost fiber only, and moderately
    ratio = cube.error[10:, ins] / ref.error[10:, ins]
    assert np.all((ratio > 0.7) & (ratio < 1.6))
    assert np.mean(np.abs(ratio - 1) < 1e-6) > 0.8
    # a fiber bad everywhere (dead) is interpolated over as well
    dead_err = err.copy()
    dead_err[k] = 0.0
    dead = build_cube(spec, dead_err, XY, grid)
    assert np.all(np.isfinite(dead.data[:, ins]))


def test_cube_is_blank_where_no_good_fiber_is_near():
    grid = np.array([7000.0])
    err = np.ones((NF, 1))
    edge = np.abs(XY[:, 0]) > 4.5  # all fibers near both short ends are bad
    err[edge] = 0.0
    cube = build_cube(np.ones((NF, 1)), err, XY, grid)
    X, _ = cube.spaxel_xy()
    assert np.all(np.isnan(cube.data[0][np.abs(X) > 4.5 + P / np.sqrt(2) + 1e-9]))
    assert np.all(np.isfinite(cube.data[0][inner(cube) & (np.abs(X) < 4.0)]))


# --------------------------------------------------------------------------- astrometry


@pytest.mark.parametrize("parangle", [0.0, 37.5, 211.0])
@pytest.mark.parametrize("dec0", [19.5, 85.0, -89.9])
def test_orientation_convention_with_astropy(parangle, dec0):
    ra0 = 150.0
    centre = SkyCoord(ra0 * u.deg, dec0 * u.deg)
    ra, dec = astrometry.fiber_sky_positions(ra0, dec0, parangle,
                                             np.array([[0.0, 5.0], [5.0, 0.0], [0.0, 0.0]]))
    pts = SkyCoord(ra * u.deg, dec * u.deg)
    assert pts[2].separation(centre).arcsec < 1e-6
    np.testing.assert_allclose(centre.separation(pts[:2]).arcsec, 5.0, atol=1e-4)
    pa_y = centre.position_angle(pts[0]).deg
    pa_x = centre.position_angle(pts[1]).deg
    expected = astrometry.y_axis_position_angle(parangle)
    assert expected == pytest.approx((parangle + 91.07) % 360)
    assert (pa_y - expected + 180) % 360 - 180 == pytest.approx(0, abs=0.01)
    # parity: +x lies 90 degrees west of +y (west when +y points north)
    assert (pa_x - (expected - 90) + 180) % 360 - 180 == pytest.approx(0, abs=0.01)
    assert astrometry.x_axis_position_angle(parangle) == pytest.approx((expected - 90) % 360)


def test_parangle_rotates_the_field():
    ra0, dec0 = 40.0, 10.0
    centre = SkyCoord(ra0 * u.deg, dec0 * u.deg)
    pas = []
    for parangle in (10.0, 40.0):
        ra, dec = astrometry.fiber_sky_positions(ra0, dec0, parangle, np.array([[0.0, 3.0]]))
        pas.append(centre.position_angle(SkyCoord(ra * u.deg, dec * u.deg)).deg[0])
    assert pas[1] - pas[0] == pytest.approx(30.0, abs=0.01)
    # PARANGLE 268.93 puts +y north and +x west (RA decreasing)
    ra, dec = astrometry.fiber_sky_positions(ra0, dec0, 268.93, np.array([[0, 3.0], [3.0, 0]]))
    assert dec[0] > dec0 and abs(ra[0] - ra0) < 1e-8
    assert ra[1] < ra0 and abs(dec[1] - dec0) < 1e-7


@pytest.mark.parametrize("ra0, dec0", [(359.9995, 2.0), (0.0, 89.99), (120.0, -60.0)])
def test_sky_to_ifu_round_trip(ra0, dec0):
    pts = XY + np.array([0.3, -0.2])
    ra, dec = astrometry.fiber_sky_positions(ra0, dec0, 123.0, pts)
    assert np.all((ra >= 0) & (ra < 360))
    back = astrometry.sky_to_ifu(ra, dec, ra0, dec0, 123.0)
    np.testing.assert_allclose(back, pts, atol=1e-6)
    # the celestial WCS in IFU arcsec agrees with the projection
    w = astrometry.celestial_wcs(ra0, dec0, 123.0)
    wr, wd = w.wcs_pix2world(pts[:, 0], pts[:, 1], 0)
    sep = SkyCoord(wr * u.deg, wd * u.deg).separation(SkyCoord(ra * u.deg, dec * u.deg))
    assert sep.arcsec.max() < 1e-5


def test_header_pointing(caplog):
    hdr = fits.Header({"TRAJRA": 150.25, "TRAJDEC": -12.5, "PARANGLE": 33.0})
    assert astrometry.header_pointing(hdr) == (150.25, -12.5, 33.0)
    assert astrometry.header_pointing(dict(hdr, TRAJRA=-10.0))[0] == pytest.approx(350.0)
    del hdr["PARANGLE"]
    with caplog.at_level(logging.WARNING, logger="panacea.astrometry"):
        assert astrometry.header_pointing(hdr) is None
    assert "PARANGLE missing" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="panacea.astrometry"):
        assert astrometry.header_pointing(
            {"TRAJRA": "x", "TRAJDEC": 95.0, "PARANGLE": 1.0}) is None
    assert "TRAJRA" in caplog.text and "TRAJDEC" in caplog.text


# --------------------------------------------------------------------------- files


def _small_cube(nw=30, dec0=None):
    grid = np.linspace(3640.0, 4645.0, 2064)[:nw]
    spec = brick_flux(1.0, 0.5)[:, None] * np.linspace(1, 2, nw)[None, :]
    return build_cube(spec, np.full_like(spec, 0.01), XY, grid)


@pytest.mark.parametrize("ra0, dec0, parangle", [(150.0, 20.0, 75.0), (10.0, 85.0, 300.0),
                                                 (359.9998, -30.0, 0.0)])
def test_written_cube_wcs_round_trip(tmp_path, ra0, dec0, parangle):
    cube = _small_cube()
    raw = fits.Header({"OBJECT": "target", "EXPTIME": 600.0, "CRVAL1": 3640.0,
                       "CDELT1": 0.5, "BZERO": 32768, "TRAJRA": ra0})
    path = write_cube(tmp_path / "c.fits", cube, (ra0, dec0, parangle), header=raw,
                      kind="skysub", options={"cube": True})
    with fits.open(path, checksum=True) as hdul:
        prim, hdr = hdul[0].header, hdul["DATA"].header
        data = hdul["DATA"].data
        assert hdul[0].data is None and hdul.index_of("DATA") == 1
        assert data.dtype.kind == "f" and data.itemsize == 4 and data.shape == cube.data.shape
        assert hdul["ERROR"].data.shape == cube.data.shape
        assert hdr["NAXIS3"] == 30 and hdr["CTYPE3"] == "AWAV"
        assert hdr["CUNIT3"] == "Angstrom" and hdr["BUNIT"] == "erg / (s cm2 Angstrom)"
        assert prim["OBJECT"] == "target" and prim["CUBEKIND"] == "skysub"
        assert "BZERO" not in prim and "PANVER" in prim
        assert "COMMENT" not in prim and "HISTORY" not in prim
        # quantised within a fraction of the noise, errors within 0.5 %
        np.testing.assert_allclose(hdul["ERROR"].data, cube.error, rtol=5e-3)
        ok = np.isfinite(cube.data)
        assert np.array_equal(np.isfinite(data), ok)
        assert np.all(np.abs(data[ok] - cube.data[ok]) <= 0.1 * cube.error[ok])
        assert np.array_equal(fits.getdata(path), data, equal_nan=True)
        assert hdr["CDELT3"] == pytest.approx(cube.wave[1] - cube.wave[0])
        w = WCS(hdr)
        we = WCS(hdul["ERROR"].header)
    # every fiber: world coordinate at its (fractional) spaxel position == its sky position
    px = (XY[:, 0] - cube.x[0]) / cube.pitch
    py = (XY[:, 1] - cube.y[0]) / cube.pitch
    sky, spec = w.pixel_to_world(px, py, np.zeros(NF))
    ra, dec = astrometry.fiber_sky_positions(ra0, dec0, parangle, XY)
    fib = SkyCoord(ra * u.deg, dec * u.deg)
    assert sky.separation(fib).arcsec.max() < 0.05
    # the spaxel nearest to each fiber: its world position is that of its own IFU position
    i, j = np.rint(px).astype(int), np.rint(py).astype(int)
    sky_n, _ = w.pixel_to_world(i, j, np.zeros(NF))
    ra_n, dec_n = astrometry.fiber_sky_positions(
        ra0, dec0, parangle, np.column_stack([cube.x[i], cube.y[j]]))
    assert sky_n.separation(SkyCoord(ra_n * u.deg, dec_n * u.deg)).arcsec.max() < 0.05
    assert sky_n.separation(fib).arcsec.max() < 0.2 * np.sqrt(2) + 0.01
    # and back: fiber sky positions land on their spaxel positions
    bx, by, _ = w.world_to_pixel(fib, spec)
    assert np.max(np.hypot(bx - px, by - py)) * cube.pitch < 0.05
    # spectral axis: air wavelengths of the grid, in Angstrom
    k = np.arange(30)
    _, lam = w.pixel_to_world(np.zeros(30), np.zeros(30), k)
    np.testing.assert_allclose(lam.to_value(u.AA), cube.wave, atol=1e-6)
    assert we.pixel_to_world(0, 0, 5)[1].to_value(u.AA) == pytest.approx(cube.wave[5])


def test_cube_without_pointing_has_ifu_axes(tmp_path):
    cube = _small_cube(nw=5)
    path = write_cube(tmp_path / "c.fits", cube, None, unit="electron / s", with_error=False)
    with fits.open(path) as hdul:
        assert len(hdul) == 2
        w = WCS(hdul[1].header)
        assert hdul[0].header["BUNIT"] == hdul[1].header["BUNIT"] == "electron / s"
    x, y, lam = w.wcs_pix2world(np.array([[0.0, 0.0, 2.0]]), 0)[0]
    assert x == pytest.approx(cube.x[0]) and y == pytest.approx(cube.y[0])
    assert lam == pytest.approx(cube.wave[2] * 1e-10)  # wcslib works in SI
    with pytest.raises(ValueError):
        write_cube(tmp_path / "d.fits", cube, None, kind="raw")


def test_cube_name_uses_observing_date():
    assert cube_name("20181108", 12, 1, "uv", "obs") == "20181108_0000012_exp01_uv_obs_cube.fits"
    assert cube_name(dt.date(2019, 1, 2), "34", 3, "farred", "skysub") == (
        "20190102_0000034_exp03_farred_skysub_cube.fits")
    today = dt.date.today().strftime("%Y%m%d")
    assert today not in cube_name("20181108", 12, 1, "red", "sky")
    with pytest.raises(ValueError):
        cube_name("20181108", 12, 1, "uv", "cube")
    with pytest.raises(ValueError):
        cube_name("2018-11-08", 12, 1, "uv", "obs")
    with pytest.raises(ValueError):
        cube_name("20181108", 12, 1, "green", "obs")
