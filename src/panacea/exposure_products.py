"""Products of one reduced exposure and channel: flux scale, ``multi``, ``spectrum`` and cubes.

The flux scale of an exposure is ``response / (area * transparency)`` with the illuminated
area and transparency from the guider frames (:func:`panacea.fluxcal.guider_conditions`) and
the response of the channel (from the night's standard star, a response directory, or
none: the spectra then stay in electrons per second per cm^2 per Angstrom and the header
says so).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits

from . import instrument
from .astrometry import fiber_sky_positions, header_pointing
from .cube import CUBE_KINDS, build_cube, cube_name, write_cube
from .fluxcal import (
    FLUX_UNIT,
    MIN_TELLURIC,
    RATE_UNIT,
    GuiderConditions,
    telluric_correction,
)
from .products import (
    MULTI_LAYOUT,
    Extension,
    Layout,
    complete_header,
    multi_name,
    write_product,
)
from .refraction import refraction_track
from .science import ExposureResult

log = logging.getLogger(__name__)


#: ``spectrum_{date}_{obsid7}_exp{NN}_{channel}.fits``: one 6 x 2064 image.
SPECTRUM_LAYOUT = Layout("spectrum", 1, "SPECVER", (
    Extension("spectrum", "rows: wavelength (A, air), F_lambda, sky F_lambda (same aperture "
              "and weights), error of F_lambda, error of sky, response (erg/e-)", "mixed",
              "float64", "6 x 2064"),
))


@dataclass
class FluxScale:
    """How count rates of one exposure become fluxes."""

    response: np.ndarray | None  # erg per electron on the channel grid
    response_source: str
    conditions: GuiderConditions
    #: (transmission on the grid, airmass) measured on the night's standard, or None
    telluric: tuple[np.ndarray, float] | None = None
    airmass: float = 0.0  # of the exposure (0: unknown, the standard's is used)

    def telluric_divisor(self, n: int) -> np.ndarray:
        """What the spectra are divided by for the telluric absorption (ones without)."""
        if self.telluric is None or self.response is None:
            return np.ones(n)
        trans, x_std = self.telluric
        x_sci = self.airmass if self.airmass > 0 else x_std
        return telluric_correction(trans, x_std if x_std > 0 else 1.0, x_sci or 1.0)

    @property
    def calibrated(self) -> bool:
        return self.response is not None

    @property
    def unit(self) -> str:
        return FLUX_UNIT if self.calibrated else RATE_UNIT

    def factor(self, n: int) -> np.ndarray:
        """Multiplier of a count rate (e-/s/A) at every grid wavelength."""
        base = 1.0 / (self.conditions.area_cm2 * self.conditions.transparency)
        resp = self.response if self.response is not None else np.ones(n)
        return base * resp / self.telluric_divisor(n)


@dataclass
class Written:
    """Files written for one exposure and channel, and its source spectrum rows."""

    paths: list[Path]
    spectrum: np.ndarray | None  # the six rows of ``spectrum_*`` (None without a source)
    unit: str  # flux unit of the spectra
    header: fits.Header  # primary header of the products


def spectrum_rows(result: ExposureResult, scale: FluxScale) -> np.ndarray | None:
    """The six rows of the ``spectrum`` product (None without a source)."""
    src = result.source
    if src is None:
        return None
    grid = result.frame.channel.grid
    f = scale.factor(grid.size)
    resp = scale.response if scale.response is not None else np.zeros(grid.size)
    return np.vstack([grid, src.spectrum * f, src.sky * f, src.error * f, src.sky_error * f,
                      resp])


def _header(result: ExposureResult, scale: FluxScale) -> fits.Header:
    h = complete_header(result.header)
    c = scale.conditions
    h["FLUXCAL"] = (scale.calibrated, "spectra flux calibrated" if scale.calibrated
                    else "no response: electron/s/cm2/Angstrom")
    h["RESPSRC"] = (scale.response_source[:60], "response used")
    h["MILLUM"] = (round(c.area_cm2, 1), f"illuminated area (cm2), {c.area_source}")
    h["THROUGHP"] = (round(c.transparency, 4), f"transparency, {c.transparency_source}")
    h["TRANSSRC"] = (c.transparency_source, "where THROUGHP came from")
    h["AREASRC"] = (c.area_source, "where MILLUM came from")
    h["NGUIDE"] = (c.n_frames, "guider frames used")
    if scale.telluric is not None and scale.response is not None:
        div = scale.telluric_divisor(scale.response.size)
        h["TELLCOR"] = (True, "telluric absorption divided out (standard)")
        h["TELLMIN"] = (round(float(np.min(div)), 4), "smallest transmission divided out")
        h["TELLNPIX"] = (int(np.sum(div < 0.999)), "pixels corrected for telluric")
        h["TELLSKIP"] = (int(np.sum(scale.telluric[0] < MIN_TELLURIC)),
                         "saturated telluric pixels left uncorrected")
    else:
        h["TELLCOR"] = (False, "telluric absorption not corrected")
    for note in c.notes:
        h["HISTORY"] = note[:70]
    src = result.source
    if src is not None:
        h["SOURCEX"] = (round(src.psf.x, 3), f"source IFU x (arcsec) at {src.ref_wave:.0f} A")
        h["SOURCEY"] = (round(src.psf.y, 3), f"source IFU y (arcsec) at {src.ref_wave:.0f} A")
        h["SOURCEW"] = (round(src.ref_wave, 1), "wavelength of SOURCEX/Y (A)")
        h["SEEING"] = (round(float(np.interp(src.ref_wave, result.frame.channel.grid,
                                             src.fwhm)), 3), "PSF FWHM (arcsec)")
        h["ELLIP"] = (round(src.psf.ellipticity, 3), "PSF ellipticity 1 - b/a")
        _psf_cards(h, src)
        h["SRCSIG"] = (round(src.detection.significance, 1), "detection significance")
        h["DARTRACK"] = (src.track_used, "refraction track used: measured or model")
        h["DARMODEL"] = (round(float(np.ptp(np.hypot(*src.model_track))), 3),
                         "model refraction across the channel (arcsec)")
        if src.measured_track is not None:
            h["DARMEAS"] = (round(float(np.ptp(np.hypot(*src.measured_track))), 3),
                            "measured refraction across the channel (arcsec)")
    else:
        h["SRCFOUND"] = (False, "no source: no spectrum_ product, model refraction")
        h["HISTORY"] = "no source detected: no spectrum_ product"
    return h


def _psf_cards(h: fits.Header, src) -> None:
    """PSFMODEL, PSFBETA, PSFOUT, PSFOUTE: the PSF the data chose and the light it puts
    outside the IFU."""
    h["PSFMODEL"] = (src.psf_model, "PSF profile chosen by chi2: moffat or gauss")
    beta = src.beta
    h["PSFBETA"] = (round(float(beta), 3) if np.isfinite(beta) else 0.0,
                    "Moffat wing index (0: Gaussian)")
    if src.choice is not None:
        h["PSFOUT"] = (round(src.choice.outside, 4), "PSF light outside the IFU (fraction)")
        h["PSFOUTE"] = (round(src.choice.outside_err, 4), "error of PSFOUT, in flux error")
        h["PSFNTRY"] = (len(src.choice.tried), "PSF profiles compared")
    h["SRCEXT"] = (bool(src.extended), "not a point: flux is the light on the IFU")
    h["PSFXTRP"] = (round(src.extrapolated, 4), "flux fraction extrapolated outside IFU")


#: Points of the ``adr`` table (extension 7) along the grid.
ADR_POINTS = 52


def adr_table(grid: np.ndarray, track: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """The refraction table of extension 7: rows wavelength (A), x and y offset (arcsec) at
    ``ADR_POINTS`` grid points from the first to the last."""
    idx = np.unique(np.linspace(0, grid.size - 1, ADR_POINTS).round().astype(int))
    return np.vstack([grid[idx], np.asarray(track[0])[idx], np.asarray(track[1])[idx]])


def model_track(result: ExposureResult) -> tuple[tuple[np.ndarray, np.ndarray], float]:
    """The model refraction track of an exposure without a source (from its header's
    PARANGLE and weather), zero at the channel's central wavelength; and that wavelength."""
    grid = result.frame.channel.grid
    ref = float(grid[grid.size // 2])
    parangle = float(result.header.get("PARANGLE", 0.0) or 0.0)
    return refraction_track(grid, ref, parangle, result.weather), ref


def multi_arrays(result: ExposureResult, scale: FluxScale, cal, pointing=None
                 ) -> tuple[dict[str, np.ndarray], fits.Header, dict[str, str]]:
    """Arrays of ``multi_*.fits`` in physical units, its header and unit overrides.

    ``pointing`` is (RA, Dec, PARANGLE) of the IFU (:func:`header_pointing`), or None.
    ``cal`` is not read any more: ``bigw`` is stored in the calibration bundle only."""
    sf = result.frame
    grid = sf.channel.grid
    f = scale.factor(grid.size)[None, :]
    obs, sky, err = result.observed * f, result.sky * f, result.error * f
    header = _header(result, scale)
    header["CRVAL1"] = (float(grid[0]), "first wavelength of the grid (Angstrom)")
    header["CDELT1"] = (float(grid[1] - grid[0]), "grid step (Angstrom)")
    xy = instrument.fiber_positions()
    positions = np.full((instrument.NFIBERS, 6), np.nan)
    positions[:, :2] = xy
    if pointing is not None:
        positions[:, 4], positions[:, 5] = fiber_sky_positions(*pointing, xy)
    src = result.source
    arrays = {
        "observed_spectra": obs, "sky_spectra": sky, "skysub_spectra": obs - sky,
        "error_spectra": err, "fiber_positions": positions,
        "image": sf.image, "flattened_image": sf.flattened, "trace": sf.trace,
        "cosmics": sf.cosmics, "unrectified_spectra": sf.flux,
    }
    if src is not None:
        det = src.detection
        window = (grid >= det.wave - det.half_width) & (grid <= det.wave + det.half_width)
        sub = np.where(err > 0, obs - sky, 0.0)[:, window]
        cnt = np.maximum((err[:, window] > 0).sum(axis=1), 1)
        values = sub.sum(axis=1) / cnt
        ok = (err[:, window] > 0).any(axis=1).astype(float)
        image = build_cube(values[:, None], ok[:, None], xy, np.array([det.wave]))
        arrays["collapsed_image"] = image.data[0]
        arrays["extracted_spectrum"] = spectrum_rows(result, scale)
        arrays["adr"] = adr_table(grid, src.track)
    else:  # extensions 6 and 7 are always filled: grid, zeros, response; the model track
        rows = np.zeros((6, grid.size))
        rows[0] = grid
        if scale.response is not None:
            rows[5] = scale.response
        arrays["extracted_spectrum"] = rows
        track, ref = model_track(result)
        arrays["adr"] = adr_table(grid, track)
        header["DARREF"] = (round(ref, 1), "wavelength where the adr offsets are 0 (A)")
    units = dict.fromkeys(("observed_spectra", "sky_spectra", "skysub_spectra",
                           "error_spectra", "collapsed_image"), scale.unit)
    units["unrectified_spectra"] = "electron"
    return arrays, header, units


#: Cubes written by default (``--cubes``).
DEFAULT_CUBES = ("skysub",)


def parse_cubes(text: str) -> tuple[str, ...]:
    """The ``--cubes`` value: comma-separated kinds of ``obs``, ``sky``, ``skysub``, or
    ``all`` or ``none``. Raises ValueError naming the bad word."""
    words = [w.strip().lower() for w in text.split(",") if w.strip()]
    if words == ["none"]:
        return ()
    if words == ["all"]:
        return CUBE_KINDS
    bad = [w for w in words if w not in CUBE_KINDS]
    if bad or not words:
        raise ValueError(f"--cubes {text!r}: expected none, all or a comma-separated list of "
                         f"{', '.join(CUBE_KINDS)}")
    return tuple(k for k in CUBE_KINDS if k in words)


def write_exposure_products(result: ExposureResult, scale: FluxScale, cal, folder: Path,
                            options: dict, cubes: tuple[str, ...] | bool = DEFAULT_CUBES
                            ) -> Written:
    """Write ``multi``, ``spectrum`` (with a source) and the cubes of one exposure.

    ``cubes`` lists the kinds of cube to write (of ``obs``, ``sky``, ``skysub``); True
    means all three and False or ``()`` none."""
    e, ch = result.frame.exposure, result.frame.channel
    pointing = header_pointing(result.header)
    arrays, header, units = multi_arrays(result, scale, cal, pointing)
    paths = [write_product(MULTI_LAYOUT, arrays, folder / multi_name(e.date, e.obsid, e.exp,
                                                                      ch.name),
                           header, options=options, units=units)]
    rows = arrays["extracted_spectrum"] if result.source is not None else None
    if rows is not None:
        name = f"spectrum_{e.date}_{e.obsid:07d}_exp{e.exp:02d}_{ch.name}.fits"
        paths.append(write_product(SPECTRUM_LAYOUT, {"spectrum": rows}, folder / name, header,
                                   options=options, units={"spectrum": scale.unit}))
    kinds = CUBE_KINDS if cubes is True else tuple(cubes or ())
    if kinds:
        paths += _write_cubes(result, arrays, header, scale, folder, options, pointing, kinds)
    return Written(paths, rows, scale.unit, header)


def _write_cubes(result, arrays, header, scale, folder, options, pointing, kinds
                 ) -> list[Path]:
    e, ch = result.frame.exposure, result.frame.channel
    xy = instrument.fiber_positions()
    src = result.source
    offsets = None
    if src is not None:
        offsets = (np.asarray(src.track[0]), np.asarray(src.track[1]))
    err = arrays["error_spectra"]
    out = []
    for kind, data in (("obs", arrays["observed_spectra"]), ("sky", arrays["sky_spectra"]),
                       ("skysub", arrays["skysub_spectra"])):
        if kind not in kinds:
            continue
        cube = build_cube(data, err, xy, ch.grid, offsets=offsets)
        out.append(write_cube(folder / cube_name(e.date, e.obsid, e.exp, ch.name, kind), cube,
                              pointing, header=header, unit=scale.unit, kind=kind,
                              options=options))
    return out

