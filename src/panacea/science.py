"""Reduction of one science exposure of one channel, up to the flux calibration.

Order of work: bias, pixel flat, cosmic rays, trace shift, optimal extraction with the
fiber profile, sky model on each fiber's own wavelengths, rectification onto the channel
grid, then the source (:mod:`panacea.source`) and, when a star is found, the sky again
without its fibers. Spectra are in electrons per second per Angstrom, divided by each
fiber's fiber-to-fiber; :mod:`panacea.exposure_products` applies the flux scale and writes
the products.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np
from astropy.io import fits

from . import instrument
from .archive import Exposure, NightIndex
from .calbundle import CalibrationBundle
from .ccd import Mask, read_channel
from .calibration import StageTimer
from .cosmics import detect_cosmics
from .errors import PanaceaError
from .extract import optimal
from .profile import FiberProfile
from .rectify import rectify
from .refraction import Weather, header_weather
from .sky import SkyModel, sky_model
from .skywave import SkyShift, apply_shift, measure_sky_shift
from .source import Source, analyse
from .trace import TraceError, TraceSolution, measure_shift

log = logging.getLogger(__name__)

#: A frame with more than this fraction of saturated pixels is flagged in the header.
MAX_SATURATED_FRACTION = 0.02
#: Rounds of the sky refit with fixed sky fibers, weighted by the first sky model from the
#: start (on the benchmark night one round gives the sky means of two cold-started ones
#: to 0.03 % of the sky).
REFIT_ROUNDS = 1
#: Fewest sky fibers a sky refit may use.
MIN_SKY_FIBERS = 40
#: Object light (fraction of the sky) above which a fiber leaves the sky in a refit.
MAX_OBJECT_LIGHT = 0.003


@dataclass
class ScienceOptions:
    """Choices for the science reduction."""

    sky_method: str = "spline"
    cosmic_method: str = "fiber"
    correct_ftf: bool = False
    source_x: float | None = None
    source_y: float | None = None
    central_wave: float | None = None
    wavelength_bin: float = 10.0


def _finite_or_zero(value) -> float:
    """``value`` as a float, 0.0 when missing or not finite."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return 0.0
    return v if np.isfinite(v) else 0.0


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
    source: str
    #: scatter (px) of the arc lines about the wavelength solution (bundle WAVERMS): the
    #: floor of a sky line's offset error in :func:`panacea.skywave.measure_sky_shift`
    arc_rms: float = 0.0

    @classmethod
    def from_bundle(cls, bundle: CalibrationBundle, source: str = "") -> ChannelCalibration:
        """From a bundle holding at least :data:`panacea.calbundle.SCIENCE_EXTENSIONS`."""
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
                   # native byte order; the bundle's own array when it is that already
                   masterbias=np.asarray(b["masterbias"], np.float32),
                   bias_variance=np.broadcast_to(bias_var, b["masterbias"].shape),
                   read_variance=(rn[amp] ** 2)[:, None],
                   pixelflat=np.asarray(b["pixelflat"], np.float32), profile=profile,
                   source=source,
                   arc_rms=_finite_or_zero(b.meta.get("WAVERMS")))

    @cached_property
    def noise_floor(self) -> np.ndarray:
        """Variance (e-^2) of every flattened pixel at zero signal: read noise and master
        bias noise over the pixel flat squared (the same for every exposure)."""
        return ((self.read_variance + self.bias_variance) / self.pixelflat**2).astype(
            np.float32)

    def trace_solution(self) -> TraceSolution:
        n = self.trace.shape[0]
        return TraceSolution(trace=self.trace, dead=self.dead, rms=np.zeros(n),
                             ncols_used=np.full(n, self.trace.shape[1]),
                             sigma=np.full(n, 1.3), columns=np.zeros(0),
                             centroids=np.zeros((n, 0)))


@dataclass
class ScienceFrame:
    """One exposure of one channel reduced on its own pixels (before rectification)."""

    exposure: Exposure
    channel: instrument.Channel
    exptime: float
    header: fits.Header
    image: np.ndarray  # bias-subtracted frame (e-)
    flattened: np.ndarray  # divided by the pixel flat (e-)
    pixel_variance: np.ndarray  # float32 variance of ``flattened`` (e-^2)
    pixel_mask: np.ndarray  # bool: saturated or otherwise bad before cosmic rays
    cosmics: np.ndarray  # bool (nrow, ncol)
    shift: float
    trace: np.ndarray  # (280, ncol) rows in this frame
    flux: np.ndarray  # (280, ncol) electrons per column
    variance: np.ndarray  # (280, ncol)
    read_variance: np.ndarray  # (280, ncol) ``variance`` at zero signal (read and bias noise)
    frac: np.ndarray  # (280, ncol) fraction of the profile on usable pixels
    sky: SkyModel
    ftf: np.ndarray  # (280, ncol) fiber-to-fiber used (re-derived with correct_ftf)
    timer: StageTimer
    wave: np.ndarray | None = None  # (280, ncol) wavelengths after the sky's refinement
    wshift: SkyShift | None = None  # the sky's offset from the arc solution


def process_frame(night: NightIndex, exposure: Exposure, cal: ChannelCalibration,
                  options: ScienceOptions | None = None,
                  timer: StageTimer | None = None) -> ScienceFrame:
    """Bias, pixel flat, cosmic rays, trace shift, optimal extraction and sky model of one
    exposure and channel, all on the frame's own pixels.

    Raises
    ------
    PanaceaError
        The frame cannot be read, or EXPTIME is missing or not positive.
    """
    options = options or ScienceOptions()
    timer = timer or StageTimer()
    ch = cal.channel
    t0 = time.perf_counter()
    frame = read_channel(night, exposure, ch)
    exptime = exposure.exptime
    if exptime is None or exptime <= 0:
        raise PanaceaError(f"{exposure.name} {ch.name}: {exposure.exptime_problem()}; "
                           "exposure skipped", file=exposure.file(ch.ifuslot).location)
    header = frame.header.copy()
    saturated = float(((frame.mask & Mask.SATURATED) > 0).mean())
    if saturated > MAX_SATURATED_FRACTION:
        log.warning("%s %s: %.1f%% of pixels saturated; reduced but flagged", exposure.name,
                    ch.name, 100 * saturated)
        header["SATFLAG"] = (True, "large saturated area")
    header["SATFRAC"] = (round(saturated, 5), "fraction of saturated pixels")
    bias_sub = frame.image - cal.masterbias
    image = bias_sub / cal.pixelflat
    variance = frame.variance + cal.bias_variance
    variance /= cal.pixelflat**2
    bad = frame.mask != 0
    pixel_mask = bad.copy()
    del frame  # the raw planes: frame-sized arrays are freed as soon as they are used
    timer.add("read", t0)

    t0 = time.perf_counter()
    cosmics = detect_cosmics(image, variance, bad, method=options.cosmic_method)
    bad |= cosmics
    timer.add("cosmics", t0)

    t0 = time.perf_counter()
    try:
        shift = measure_shift(image, cal.trace_solution(), variance, bad, profile=cal.profile,
                              cosmics_masked=True)
    except TraceError as err:
        log.warning("%s %s: trace shift not measured (%s); using 0", exposure.name, ch.name,
                    err)
        shift = 0.0
    trace = cal.trace + shift
    # the extraction works in float32 (and the cosmic-ray finder before it): rounded once
    # here, the float64 frame is freed
    variance = variance.astype(np.float32)
    timer.add("shift", t0)

    t0 = time.perf_counter()
    first, weights = cal.profile.weights(trace)
    # the noise floor of every pixel, independent of its data: weights built from the data
    # (or from the master bias noise in it) would favour low pixels and bias the fluxes
    floor = cal.noise_floor
    # what the overscan leaves of the bias's row-to-row drift (a few per cent of a faint
    # sky per fiber) is fitted between the fibers of each amplifier and removed
    amp_rows = cal.profile.amp_rows
    ext = optimal(image, variance, bad, first, weights, read_variance=floor,
                  row_segments=tuple(range(0, image.shape[0] + 1, amp_rows)))
    del first, weights, bad
    flux, fvar, frac, offset, read_var = ext
    del ext
    image -= offset  # both frames are this function's own
    bias_sub -= offset * cal.pixelflat
    rms = float(np.linalg.norm(offset)) / np.sqrt(offset.size)
    del offset
    header["ROWOFFS"] = (round(rms, 4), "RMS of offsets fitted between fibers (e-)")
    timer.add("extract", t0)

    t0 = time.perf_counter()
    wshift = measure_sky_shift(flux, np.where(frac < 0.5, 0.0, fvar), cal.wave, ~cal.dead,
                               arc_rms=cal.arc_rms)
    wave = apply_shift(cal.wave, wshift)
    timer.add("skywave", t0)

    t0 = time.perf_counter()
    sky, ftf = _sky(flux, fvar, read_var, frac, cal, options, header,
                    exposure.name, wave=wave)
    timer.add("sky", t0)
    return ScienceFrame(exposure=exposure, channel=ch, exptime=float(exptime), header=header,
                        image=bias_sub, flattened=image, pixel_variance=variance,
                        pixel_mask=pixel_mask, cosmics=cosmics, shift=float(shift),
                        trace=trace, flux=flux, variance=fvar,
                        read_variance=read_var, frac=frac, sky=sky, ftf=ftf,
                        timer=timer, wave=wave, wshift=wshift)


def _sky(flux, fvar, read_var, frac, cal, options, header, name, sky_fibers=None,
         n_iter: int = 4, object_light=None, start=None, wave=None
         ) -> tuple[SkyModel, np.ndarray]:
    """Sky model of a frame and the fiber-to-fiber to use with it (on the wavelengths
    ``wave``, default the calibration's)."""
    sky = sky_model(flux, fvar, cal.wave if wave is None else wave, cal.ftf, cal.dead,
                    positions=instrument.fiber_positions(), mask=frac < 0.5,
                    method=options.sky_method, sky_fibers=sky_fibers, n_iter=n_iter,
                    read_variance=read_var, object_light=object_light, start=start)
    ftf = cal.ftf
    if options.correct_ftf:
        if sky.relative is None:
            log.warning("%s %s: --correct_ftf needs the spline sky; fiber-to-fiber kept", name,
                        cal.channel.name)
        else:
            ftf = cal.ftf * sky.relative
            header["FTFCORR"] = (True, "fiber-to-fiber re-derived from this frame's sky")
    return sky, ftf


def refit_sky(sf: ScienceFrame, cal: ChannelCalibration, object_light: np.ndarray,
              options: ScienceOptions | None = None) -> ScienceFrame:
    """The sky of ``sf`` fitted again on sky fibers whose object light (a fraction of their
    sky, e.g. from a star's PSF fit) is below :data:`MAX_OBJECT_LIGHT`: the sky model's own
    rejection keeps a star's wings when the sky is faint."""
    options = options or ScienceOptions()
    t0 = time.perf_counter()
    use = sf.sky.sky_fibers & (object_light < MAX_OBJECT_LIGHT)
    if use.sum() < MIN_SKY_FIBERS:  # keep the fibers with the least object light
        order = np.argsort(np.where(sf.sky.sky_fibers, object_light, np.inf))
        use = np.zeros_like(use)
        use[order[:MIN_SKY_FIBERS]] = True
        use &= sf.sky.sky_fibers
    # the sky fibers are fixed now, and the first model gives the weights from the start:
    # fewer rounds (pixel clipping and weights only)
    sky, ftf = _sky(sf.flux, sf.variance, sf.read_variance, sf.frac, cal, options, sf.header,
                    sf.exposure.name, sky_fibers=use, n_iter=REFIT_ROUNDS,
                    object_light=object_light, start=sf.sky.sky, wave=sf.wave)
    sf.timer.add("sky", t0)
    return replace(sf, sky=sky, ftf=ftf)


def rectified(sf: ScienceFrame, cal: ChannelCalibration
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Observed spectra, sky and error per fiber on the channel grid, electron/s/Angstrom,
    divided by the fiber-to-fiber (0 in bad bins and dead fibers)."""
    live = ~cal.dead
    ftf = np.where(live[:, None] & (sf.ftf > 0), sf.ftf, 1.0)
    nvar = np.where(sf.frac < 0.5, 0, sf.variance) / ftf**2  # 0 marks a bad native pixel
    wave = cal.wave if sf.wave is None else sf.wave
    obs, obs_var, sky = rectify(sf.flux / ftf, nvar, wave, sf.channel.grid,
                                also=(sf.sky.sky / ftf,))
    good = (obs_var > 0) & live[:, None]
    scale = 1.0 / sf.exptime
    return (np.where(good, obs, 0.0) * scale, np.where(good, sky, 0.0) * scale,
            np.sqrt(np.where(good, obs_var, 0.0)) * scale)


@dataclass
class ExposureResult:
    """One exposure of one channel reduced: frame products, rectified spectra (electrons per
    second per Angstrom, after fiber-to-fiber) and the source, if one was found."""

    frame: ScienceFrame
    observed: np.ndarray
    sky: np.ndarray
    error: np.ndarray
    source: Source | None
    weather: Weather

    @property
    def header(self) -> fits.Header:
        return self.frame.header


def _sky_error(sf: ScienceFrame, err: np.ndarray) -> np.ndarray:
    """Error of the sky model per fiber and bin: the fibers' noise averaged over the sky
    fibers that built it."""
    return err / np.sqrt(max(int(sf.sky.sky_fibers.sum()), 1))


def reduce_exposure(night: NightIndex, exposure: Exposure, cal: ChannelCalibration,
                    options: ScienceOptions | None = None, timer: StageTimer | None = None
                    ) -> ExposureResult:
    """Reduce one exposure of one channel: frame, extraction, sky, rectification, and the
    source (detection, PSF, refraction, extraction). When a point source is found its PSF
    tells which fibers hold its light, and the sky is fitted again without them.

    Raises
    ------
    PanaceaError
        The frame cannot be read, or EXPTIME is missing or not positive.
    """
    options = options or ScienceOptions()
    t_start = time.perf_counter()
    sf = process_frame(night, exposure, cal, options, timer)
    t0 = time.perf_counter()
    obs, sky, err = rectified(sf, cal)
    sf.timer.add("rectify", t0)
    weather = header_weather(sf.header)
    xy = instrument.fiber_positions()
    forced = ((options.source_x, options.source_y)
              if options.source_x is not None and options.source_y is not None else None)
    parangle = float(sf.header.get("PARANGLE", 0.0))

    def find(obs, sky, err, previous=None):
        try:
            return analyse(obs - sky, err, sky, _sky_error(sf, err), sf.channel.grid, xy,
                           parangle, weather, options.central_wave, options.wavelength_bin,
                           forced, previous=previous)
        except (ValueError, np.linalg.LinAlgError) as exc:  # never lose the exposure
            log.warning("%s %s: source analysis failed (%s); no source", exposure.name,
                        sf.channel.name, exc)
            sf.header["HISTORY"] = f"source analysis failed: {exc}"[:70]
            return None

    t0 = time.perf_counter()
    src = find(obs, sky, err)
    sf.timer.add("source", t0)
    if src is not None and options.sky_method == "spline":
        light = (src.weights * np.maximum(src.spectrum, 0.0)[None, :]).sum(axis=1)
        sf = refit_sky(sf, cal, light / np.maximum(sky.sum(axis=1), 1e-30), options)
        t0 = time.perf_counter()
        obs, sky, err = rectified(sf, cal)
        sf.timer.add("rectify", t0)
        # measured again: with the star's wings in the first sky, the wings looked narrower
        # (FWHM -2 % and flux -1 % in uv when only the spectrum was extracted again)
        t0 = time.perf_counter()
        src = find(obs, sky, err, previous=src) or src
        sf.timer.add("source", t0)
    header = sf.header
    header["EXPSHIFT"] = (round(sf.shift, 4), "trace shift of this frame (px)")
    header["NCOSMIC"] = (int(sf.cosmics.sum()), "pixels flagged as cosmic rays")
    ws = sf.wshift or SkyShift()
    header["WSHIFT"] = (round(ws.shift, 4), "sky-line shift from the arc solution (px)")
    header["WSHIFTE"] = (round(ws.error, 4), "1-sigma error of WSHIFT (px)")
    header["WSHIFTN"] = (ws.nlines, "sky lines used for WSHIFT")
    header["WSHIFTM"] = (ws.method, "WSHIFT method: lines, xcorr or none")
    if ws.rejected:  # measured, but applying it would not pay (skywave._worth_applying)
        header["WSHIFTE"] = (round(ws.rejected[1], 4), "1-sigma error of WSHIFTU (px)")
        header["WSHIFTU"] = (round(ws.rejected[0], 4), "sky shift measured, not applied (px)")
    header["WSTRETCH"] = (round(ws.stretch, 4), "sky-line stretch, px at the ends")
    for i, c in enumerate(ws.coeffs):  # the full offset curve, for readers of the product
        header[f"WSLEG{i}"] = (round(float(c), 5), f"sky offset Legendre coefficient {i} (px)")
    header["SKYMETH"] = (options.sky_method, "sky model")
    header["SKYCHI2"] = (round(float(sf.sky.chi2_dof_sky), 3), "chi2/dof of sky fibers")
    header["NSKYFIB"] = (int(sf.sky.sky_fibers.sum()), "fibers used for the sky")
    header["CALFILE"] = (Path(cal.source).name[:50], "calibration bundle")
    for note in weather.notes:
        header["HISTORY"] = f"refraction: {note}"
    log.info("%s %s: shift %+.3f px, %d cosmic-ray pixels, sky chi2/dof %.2f from %d fibers, "
             "%s (%.1f s)", exposure.name, sf.channel.name, sf.shift, int(sf.cosmics.sum()),
             sf.sky.chi2_dof_sky, int(sf.sky.sky_fibers.sum()),
             "no source" if src is None else f"source at ({src.psf.x:.2f}, {src.psf.y:.2f})",
             time.perf_counter() - t_start)
    return ExposureResult(sf, obs, sky, err, src, weather)

