"""Sky coordinates of the LRS2 fibers: pointing from the raw header, orientation, TAN WCS.

Orientation convention
----------------------
IFU coordinates ``(x, y)`` are the arcsec positions of :func:`panacea.instrument.fiber_positions`
(``x`` along the 22-fiber rows, ``y`` across them). On the sky, with
``theta = PARANGLE + SYSTEM_ROTATION_DEG``:

* the IFU **+x** axis points to position angle ``theta`` (east of north);
* the IFU **+y** axis points to position angle ``theta + 90`` (:func:`y_axis_position_angle`);
* parity: **+y lies 90 degrees east of +x**, i.e. when +y points north, +x points **west** --
  the parity of an ordinary sky image displayed north up, east left (``det CD < 0``).

In standard tangent-plane coordinates (xi towards east, eta towards north, arcsec)::

    xi  = sin(theta) * x + cos(theta) * y
    eta = cos(theta) * x - sin(theta) * y

Source of the convention: the existing Panacea pipeline (github ``grzeimann/Panacea``,
``full_lrs2_reduction.py`` with ``astrometry.py``) computes the RA/Dec columns of the
``fiber_positions`` extension with ``Astrometry(TRAJRA, TRAJDEC, PARANGLE, 0, 0, fplane)``: a TAN
projection with ``x_scale = -1``, ``y_scale = +1`` (arcsec), rotation
``rot = 360 - (90 + PARANGLE + 1.07)`` and the pixel ``(ifu.y + x, ifu.x + y)``. Worked out,
that is the formula above (the 1.07 degree "sys_rot" is :data:`SYSTEM_ROTATION_DEG`). It takes
TRAJRA and TRAJDEC in degrees, as the LRS2 facts sheet states. That pipeline also adds the
offset of the IFU slot in the HET focal plane (from an ``fplane.txt`` file this package does
not ship); here TRAJRA,
TRAJDEC are taken as the pointing of the IFU centre (x = y = 0), and a known slot offset can
be passed as ``focal_offset``. The convention has not been verified against stars observed with
LRS2: if real data show a mirrored or rotated field, change only :data:`SYSTEM_ROTATION_DEG`,
:data:`PARITY` or :func:`ifu_to_tangent`; everything else (fiber RA/Dec, cube WCS) follows.

The projection is done exactly (gnomonic formulas), so it stays correct near the celestial
poles and across RA = 0; :func:`celestial_wcs` builds the matching FITS/astropy TAN WCS.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import numpy as np
from astropy.wcs import WCS

log = logging.getLogger(__name__)

#: Fixed rotation (degrees) added to PARANGLE: Panacea's ``sys_rot`` for HET.
SYSTEM_ROTATION_DEG = 1.07
#: Parity of the IFU frame on the sky: ``"west"`` means +x points west when +y points north
#: (+y is 90 degrees *east* of +x), as in a normal north-up, east-left image.
PARITY = "west"
#: Offset (degrees) between PARANGLE and the position angle of the IFU +y axis.
Y_AXIS_PA_OFFSET_DEG = SYSTEM_ROTATION_DEG + 90.0
#: Header cards read by :func:`header_pointing`.
POINTING_CARDS = ("TRAJRA", "TRAJDEC", "PARANGLE")

_ARCSEC = math.pi / (180.0 * 3600.0)


def x_axis_position_angle(parangle: float) -> float:
    """Position angle (degrees east of north, 0..360) of the IFU +x axis.

    ``PARANGLE + 1.07``: 90 degrees west of the +y axis (90 degrees east with the mirrored
    :data:`PARITY` ``"east"``).
    """
    turn = -90.0 if PARITY == "west" else 90.0
    return float((y_axis_position_angle(parangle) + turn) % 360.0)


def y_axis_position_angle(parangle: float) -> float:
    """Position angle (degrees east of north, 0..360) of the IFU +y axis.

    ``PARANGLE + 91.07``; the +x axis lies 90 degrees west of it (see :data:`PARITY`).
    """
    return float((parangle + Y_AXIS_PA_OFFSET_DEG) % 360.0)


def _orientation_matrix(parangle: float) -> np.ndarray:
    """2 x 2 matrix M with ``(xi, eta) = M @ (x, y)`` (both in arcsec); M is its own inverse."""
    theta = math.radians(parangle + SYSTEM_ROTATION_DEG)
    s, c = math.sin(theta), math.cos(theta)
    if PARITY == "west":
        return np.array([[s, c], [c, -s]])
    if PARITY == "east":  # mirrored alternative: +x points east when +y points north
        return np.array([[-s, c], [-c, -s]])
    raise ValueError(f"PARITY must be 'west' or 'east', not {PARITY!r}")


def ifu_to_tangent(xy: np.ndarray, parangle: float,
                   focal_offset: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Standard coordinates (xi east, eta north; arcsec) of IFU positions ``xy`` (..., 2).

    ``focal_offset`` is the IFU-frame position (arcsec) of the IFU centre relative to the
    pointing, for a pointing that is not the IFU centre.
    """
    xy = np.asarray(xy, float) + np.asarray(focal_offset, float)
    return xy @ _orientation_matrix(parangle).T


def tangent_to_ifu(xieta: np.ndarray, parangle: float,
                   focal_offset: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Inverse of :func:`ifu_to_tangent`."""
    m = np.linalg.inv(_orientation_matrix(parangle))
    return np.asarray(xieta, float) @ m.T - np.asarray(focal_offset, float)


def fiber_sky_positions(ra0: float, dec0: float, parangle: float, xy: np.ndarray,
                        focal_offset: tuple[float, float] = (0.0, 0.0)
                        ) -> tuple[np.ndarray, np.ndarray]:
    """RA and Dec (degrees) of IFU positions ``xy`` (arcsec, shape (..., 2)).

    Parameters
    ----------
    ra0, dec0 : float
        Pointing (degrees): the sky position of IFU x = y = 0 (TRAJRA, TRAJDEC).
    parangle : float
        Header PARANGLE (degrees); the orientation follows the module convention.
    xy : array, shape (..., 2)
        IFU positions in arcsec, e.g. :func:`panacea.instrument.fiber_positions`.
    focal_offset : (float, float)
        Position of the IFU centre relative to the pointing in the IFU frame (arcsec).

    Returns
    -------
    ra, dec : arrays of shape ``xy.shape[:-1]``; RA in [0, 360).

    The inverse gnomonic (TAN) projection is evaluated exactly, so positions are right at any
    declination, including next to a pole.
    """
    t = ifu_to_tangent(xy, parangle, focal_offset) * _ARCSEC
    xi, eta = t[..., 0], t[..., 1]
    a0, d0 = math.radians(ra0), math.radians(dec0)
    sd, cd = math.sin(d0), math.cos(d0)
    den = cd - eta * sd
    ra = a0 + np.arctan2(xi, den)
    dec = np.arctan2(sd + eta * cd, np.hypot(xi, den))
    return np.degrees(ra) % 360.0, np.degrees(dec)


def sky_to_ifu(ra: np.ndarray, dec: np.ndarray, ra0: float, dec0: float, parangle: float,
               focal_offset: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """IFU positions (arcsec, shape (..., 2)) of sky positions (degrees): inverse of
    :func:`fiber_sky_positions` (forward gnomonic projection)."""
    a = np.radians(np.asarray(ra, float)) - math.radians(ra0)
    d = np.radians(np.asarray(dec, float))
    d0 = math.radians(dec0)
    cosc = math.sin(d0) * np.sin(d) + math.cos(d0) * np.cos(d) * np.cos(a)
    xi = np.cos(d) * np.sin(a) / cosc
    eta = (math.cos(d0) * np.sin(d) - math.sin(d0) * np.cos(d) * np.cos(a)) / cosc
    return tangent_to_ifu(np.stack([xi, eta], axis=-1) / _ARCSEC, parangle, focal_offset)


def celestial_wcs(ra0: float, dec0: float, parangle: float, *, x_start: float = 0.0,
                  y_start: float = 0.0, pixel_scale: float = 1.0,
                  focal_offset: tuple[float, float] = (0.0, 0.0)) -> WCS:
    """A 2-D TAN WCS (CD matrix with rotation) consistent with :func:`fiber_sky_positions`.

    Zero-based pixel ``(i, j)`` (astropy order: i along x, j along y) is the IFU position
    ``x = x_start + i * pixel_scale``, ``y = y_start + j * pixel_scale`` (arcsec). The defaults
    make pixel coordinates equal to IFU arcsec; for a cube pass its spaxel size and the IFU
    position of spaxel (0, 0).
    """
    if pixel_scale <= 0:
        raise ValueError("pixel_scale must be positive")
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.cunit = ["deg", "deg"]
    w.wcs.crval = [float(ra0) % 360.0, float(dec0)]
    # FITS pixels are 1-based: the tangent point (IFU -focal_offset) sits at this pixel
    w.wcs.crpix = [1.0 + (-focal_offset[0] - x_start) / pixel_scale,
                   1.0 + (-focal_offset[1] - y_start) / pixel_scale]
    w.wcs.cd = _orientation_matrix(parangle) * (pixel_scale / 3600.0)
    w.wcs.radesys = "ICRS"
    w.wcs.set()
    return w


def header_pointing(header: Mapping) -> tuple[float, float, float] | None:
    """``(ra0, dec0, parangle)`` in degrees from TRAJRA, TRAJDEC and PARANGLE, or None.

    TRAJRA is read in degrees (the LRS2 convention; note that HET's TRAJCRA card is in hours
    and is not used). A missing, non-numeric or out-of-range card logs a warning naming it and
    returns None, so callers write products without sky coordinates rather than wrong ones.
    """
    values = {}
    problems = []
    for key in POINTING_CARDS:
        raw = header.get(key) if hasattr(header, "get") else None
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            problems.append(f"{key} missing")
            continue
        try:
            val = float(raw)
        except (TypeError, ValueError):
            problems.append(f"{key}={raw!r} not a number")
            continue
        if not math.isfinite(val):
            problems.append(f"{key}={raw!r} not finite")
            continue
        values[key] = val
    if "TRAJDEC" in values and abs(values["TRAJDEC"]) > 90.0:
        problems.append(f"TRAJDEC={values['TRAJDEC']} outside -90..90")
    if "TRAJRA" in values and not -360.0 <= values["TRAJRA"] <= 360.0:
        problems.append(f"TRAJRA={values['TRAJRA']} outside 0..360")
    if problems:
        log.warning("no sky coordinates for this exposure (%s): fiber RA/Dec and cube WCS "
                    "are left out", "; ".join(problems))
        return None
    return values["TRAJRA"] % 360.0, values["TRAJDEC"], values["PARANGLE"]
