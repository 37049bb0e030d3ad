"""Reduction of one science exposure of one channel to the arrays of ``multi_*.fits``.

Order of work: bias, pixel flat, cosmic rays, trace shift, optimal extraction with the
fiber profile, sky model on each fiber's own wavelengths, rectification onto the channel
grid. Flux calibration is not applied yet: spectra are in electrons per second per Angstrom
(the unit is written into every extension), divided by each fiber's fiber-to-fiber.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits

from . import instrument
from .archive import Exposure, NightIndex
from .calbundle import CalibrationBundle
from .ccd import Mask, read_channel
from .cosmics import detect_cosmics
from .errors import PanaceaError
from .extract import optimal
from .profile import FiberProfile
from .rectify import rectify
from .sky import sky_model
from .trace import TraceError, TraceSolution, measure_shift

log = logging.getLogger(__name__)

#: Unit of the spectra before flux calibration.
COUNT_RATE_UNIT = "electron / (s Angstrom)"
#: A frame with more than this fraction of saturated pixels is flagged in the header.
MAX_SATURATED_FRACTION = 0.02


@dataclass
class ScienceOptions:
    """Choices for the science reduction."""

    sky_method: str = "spline"
    cosmic_method: str = "fiber"


@dataclass
class ChannelCalibration:
    """What the science reduction needs from a calibration bundle."""

    channel: instrument.Channel
    trace: np.ndarray
    dead: np.ndarray
    wave: np.ndarray
    ftf: np.ndarray
    masterbias: np.ndarray
    bias_variance: np.ndarray
    read_variance: np.ndarray  # (nrow, 1): read noise^2 of each row's amp (e-^2)
    pixelflat: np.ndarray
    profile: FiberProfile
    bigw: np.ndarray
    source: str

    @classmethod
    def from_bundle(cls, bundle: CalibrationBundle, source: str = "") -> ChannelCalibration:
        b = bundle
        ncol = b["trace"].shape[1]
        dead = b["dead"].astype(bool)
        profile = FiberProfile.from_array(b["profile"], ncol, int(b.meta["AMPROWS"]),
                                          int(b.meta["FIBPAMP"]), float(b.meta["HALFWID"]),
                                          dead)
        nrow = b["masterbias"].shape[0]
        amp = np.arange(nrow) // int(b.meta["AMPROWS"])
        rn = np.asarray(b["rdnoise"], float)
        bias_var = (rn[amp] ** 2 / max(int(b.meta.get("NBIAS", 1)), 1))[:, None]
        return cls(channel=instrument.get_channel(b.channel), trace=b["trace"].astype(float),
                   dead=dead, wave=b["wavelength"].astype(float), ftf=b["flat"].astype(float),
                   masterbias=b["masterbias"], bias_variance=np.broadcast_to(
                       bias_var, b["masterbias"].shape),
                   read_variance=(rn[amp] ** 2)[:, None], pixelflat=b["pixelflat"],
                   profile=profile, bigw=b["bigw"], source=source)

    def trace_solution(self) -> TraceSolution:
        n = self.trace.shape[0]
        return TraceSolution(trace=self.trace, dead=self.dead, rms=np.zeros(n),
                             ncols_used=np.full(n, self.trace.shape[1]),
                             sigma=np.full(n, 1.3), columns=np.zeros(0),
                             centroids=np.zeros((n, 0)))


def reduce_exposure(night: NightIndex, exposure: Exposure, cal: ChannelCalibration,
                    options: ScienceOptions | None = None
                    ) -> tuple[dict[str, np.ndarray], fits.Header]:
    """Arrays of the ``multi`` product of one exposure and channel, and its header cards.

    Raises
    ------
    PanaceaError
        The frame cannot be read, or EXPTIME is missing or not positive.
    """
    options = options or ScienceOptions()
    ch = cal.channel
    t0 = time.perf_counter()
    frame = read_channel(night, exposure, ch)
    exptime = exposure.exptime
    if exptime is None or exptime <= 0:
        raise PanaceaError(f"{exposure.name} {ch.name} "
                           f"({exposure.file(ch.ifuslot).location}): EXPTIME {exptime} is not "
                           "positive; exposure skipped")
    header = frame.header.copy()
    saturated = (frame.mask & Mask.SATURATED) > 0
    if saturated.mean() > MAX_SATURATED_FRACTION:
        log.warning("%s %s: %.1f%% of pixels saturated; reduced but flagged", exposure.name,
                    ch.name, 100 * saturated.mean())
        header["SATFLAG"] = (True, "large saturated area")
    header["SATFRAC"] = (round(float(saturated.mean()), 5), "fraction of saturated pixels")

    image = (frame.image - cal.masterbias) / cal.pixelflat
    variance = (frame.variance + cal.bias_variance) / cal.pixelflat**2
    bad = frame.mask != 0
    cosmics = detect_cosmics(image, variance, bad, method=options.cosmic_method)
    bad |= cosmics
    try:
        shift = measure_shift(image, cal.trace_solution(), variance, bad, profile=cal.profile)
    except TraceError as err:
        log.warning("%s %s: trace shift not measured (%s); using 0", exposure.name, ch.name,
                    err)
        shift = 0.0
    trace = cal.trace + shift
    first, weights = cal.profile.weights(trace)
    # the noise floor of every pixel, independent of its data: weights built from the data
    # (or from the master bias noise in it) would favour low pixels and bias the fluxes
    floor = (cal.read_variance + cal.bias_variance) / cal.pixelflat**2
    flux, fvar, frac = optimal(image, variance, bad, first, weights, read_variance=floor)
    badfib = frac < 0.5
    sky = sky_model(flux, fvar, cal.wave, cal.ftf, cal.dead,
                    positions=instrument.fiber_positions(), mask=badfib,
                    method=options.sky_method)

    live = ~cal.dead
    ftf = np.where(live[:, None] & (cal.ftf > 0), cal.ftf, 1.0)
    grid = ch.grid
    nvar = np.where(badfib, 0, fvar) / ftf**2  # zero variance marks a bad native pixel
    obs, obs_var = rectify(flux / ftf, nvar, cal.wave, grid)
    sky_r, _ = rectify(sky.sky / ftf, nvar, cal.wave, grid)  # same good bins as the data
    good = (obs_var > 0) & live[:, None]
    obs = np.where(good, obs, 0.0) / exptime
    sky_r = np.where(good, sky_r, 0.0) / exptime
    err = np.where(good, np.sqrt(np.where(good, obs_var, 0.0)), 0.0) / exptime

    positions = np.zeros((instrument.NFIBERS, 6))
    positions[:, :2] = instrument.fiber_positions()
    positions[:, 2:] = np.nan  # focal-plane and sky coordinates arrive with astrometry

    header["EXPSHIFT"] = (round(float(shift), 4), "trace shift of this frame (px)")
    header["NCOSMIC"] = (int(cosmics.sum()), "pixels flagged as cosmic rays")
    header["SKYMETH"] = (options.sky_method, "sky model")
    header["SKYCHI2"] = (round(float(sky.chi2_dof_sky), 3), "chi2/dof of sky fibers")
    header["NSKYFIB"] = (int(sky.sky_fibers.sum()), "fibers used for the sky")
    header["CALFILE"] = (Path(cal.source).name[:50], "calibration bundle")
    header["FLUXCAL"] = (False, "spectra in electron/s/Angstrom, not flux calibrated")
    header["CRVAL1"] = (float(grid[0]), "first wavelength of the grid (Angstrom)")
    header["CDELT1"] = (float(grid[1] - grid[0]), "grid step (Angstrom)")
    arrays = {
        "observed_spectra": obs,
        "sky_spectra": sky_r,
        "skysub_spectra": obs - sky_r,
        "error_spectra": err,
        "fiber_positions": positions,
        "bigw": cal.bigw,
        "image": frame.image - cal.masterbias,
        "flattened_image": image,
        "trace": trace,
        "cosmics": cosmics,
        "unrectified_spectra": flux,
    }
    log.info("%s %s: shift %+.3f px, %d cosmic-ray pixels, sky chi2/dof %.2f from %d fibers "
             "(%.1f s)", exposure.name, ch.name, shift, int(cosmics.sum()), sky.chi2_dof_sky,
             int(sky.sky_fibers.sum()), time.perf_counter() - t0)
    return arrays, header


#: Units of the multi extensions that hold spectra before flux calibration.
UNCALIBRATED_UNITS = {
    "observed_spectra": COUNT_RATE_UNIT,
    "sky_spectra": COUNT_RATE_UNIT,
    "skysub_spectra": COUNT_RATE_UNIT,
    "error_spectra": COUNT_RATE_UNIT,
    "collapsed_image": COUNT_RATE_UNIT,
}
