"""Build the calibration of one channel for one night from raw frames.

Orchestration only: find the frames (bounded search through :class:`panacea.archive.Archive`),
read them, and call the stage modules (bias, trace, profile, wavelength, flat) on arrays.
The result is a :class:`panacea.calbundle.CalibrationBundle`.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

from . import instrument, skyshape
from .archive import Archive, Exposure, NightIndex
from .bias import MasterBias, master_bias
from .calbundle import CalibrationBundle
from .ccd import Frame, Mask, read_channel, read_channel_image
from .combine import combine_frames, frame_level
from .errors import ArchiveError, CalibrationNotFound, FrameError, PanaceaError
from .extract import Aperture, aperture, boxcar
from .flat import fiber_to_fiber, pixel_flat, pixel_map
from .profile import trace_and_profile
from .wavelength import solve_wavelength

log = logging.getLogger(__name__)

#: Aperture half-width (rows) of the boxcar extraction of calibration frames.
CAL_HALF_WIDTH = 3.0
#: A flat whose brightest quarter of pixels is below this many electrons is left out.
MIN_FLAT_LEVEL = 100.0


@dataclass
class CalibrationOptions:
    """Choices that shape a calibration (part of the bundle's fingerprint)."""

    use_flat: bool = False
    overscan: str = "row"
    windows: dict[str, int] | None = None

    def describe(self) -> str:
        return f"use_flat={self.use_flat};overscan={self.overscan};windows={self.windows}"


@dataclass
class StageTimer:
    """Wall time per stage (seconds), for logs and benchmarks."""

    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, t0: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


@dataclass
class CalibrationPlan:
    """The raw exposures a calibration will use, found with a bounded search."""

    bias: list[Exposure]
    flat: list[Exposure]  # twilights, or internal flats with use_flat
    internal: list[Exposure]  # internal flats (for the pixel flat), may be empty
    arcs: dict[str, list[Exposure]]  # lamp -> exposures
    #: the night's on-sky exposures of the channel, whose sky lines constrain the shape of
    #: the wavelength solution (:mod:`panacea.skyshape`)
    onsky: list[Exposure] = field(default_factory=list)

    @property
    def exposures(self) -> list[Exposure]:
        """Every exposure the calibration reads (each once)."""
        exps = (self.bias + self.flat + self.internal
                + [e for v in self.arcs.values() for e in v] + self.onsky)
        return list({e.name: e for e in exps}.values())

    @property
    def inputs(self) -> list[str]:
        return sorted(e.name for e in self.exposures)

    @property
    def sources(self) -> list:
        """Raw files (tarballs or loose FITS files) holding the inputs, sorted."""
        return sorted({f.source for e in self.exposures for f in e.files.values()})


def _lamp(exposure: Exposure) -> str | None:
    return instrument.ARC_OBJECTS.get(exposure.object.lower())


def _header_agrees(exposure: Exposure) -> bool:
    """False (with a warning) when IMAGETYP contradicts the frame type in the file name."""
    try:
        header = exposure.header()
    except ArchiveError as err:
        log.warning("%s left out: %s", exposure.name, err)
        return False
    imagetyp = str(header.get("IMAGETYP", exposure.ftype)).strip().lower()
    if imagetyp and imagetyp != exposure.ftype:
        log.warning("%s: header IMAGETYP %r contradicts file type %r; left out",
                    exposure.name, imagetyp, exposure.ftype)
        return False
    return True


def plan_calibration(
    archive: Archive, date: str, channel: instrument.Channel, options: CalibrationOptions
) -> CalibrationPlan:
    """Find the bias, flat and arc exposures for ``channel`` around ``date``.

    Raises
    ------
    CalibrationNotFound
        When biases, flats or arcs are missing from their whole search window.
    """
    def find(kind: str) -> list[Exposure]:
        window = (options.windows or {}).get(kind)
        match = archive.find_calibration(date, kind, window=window, channel=channel)
        if match.night != date:
            log.info("%s %s: %s taken from night %s", date, channel.name, kind, match.night)
        return [e for e in match.exposures if e.has_channel(channel) and _header_agrees(e)]

    bias = find("bias")
    twi_kind = "flt" if options.use_flat else "twi"
    try:
        flat = find(twi_kind)
    except CalibrationNotFound as err:
        if options.use_flat or not _has_internal_flats(archive, date, channel, options):
            raise
        raise CalibrationNotFound(f"{err}; internal flats exist: rerun with -uf (--use_flat) "
                                  "to trace and flat-field with them", err.kind, err.searched,
                                  err.baseraw) from None
    try:
        internal = flat if options.use_flat else find("flt")
    except CalibrationNotFound:
        internal = []
    arcs: dict[str, list[Exposure]] = {}
    for exposure in find("arc"):
        lamp = _lamp(exposure)
        if lamp is None:
            log.warning("%s: arc OBJECT %r names no known lamp; left out", exposure.name,
                        exposure.object)
        elif lamp in channel.lamps:
            arcs.setdefault(lamp, []).append(exposure)
    if not arcs:
        raise CalibrationNotFound(
            f"no usable arc of lamps {channel.lamps} for {channel.name} near {date}",
            "arc", [date], str(archive.baseraw))
    for kind, found in (("bias", bias), (twi_kind, flat)):
        if not found:
            raise CalibrationNotFound(f"no usable {kind} frames for {channel.name} near {date}",
                                      kind, [date], str(archive.baseraw))
    return CalibrationPlan(bias=bias, flat=flat, internal=internal, arcs=arcs,
                           onsky=_onsky(archive, date, channel))


def _onsky(archive: Archive, date: str, channel: instrument.Channel) -> list[Exposure]:
    """The night's on-sky (``sci``: science and standards) exposures holding ``channel``."""
    try:
        night = archive.night(date)
    except ArchiveError:
        return []
    return [e for e in night.exposures(ftype="sci", channel=channel) if e.has_channel(channel)]


def _has_internal_flats(archive: Archive, date: str, channel: instrument.Channel,
                        options: CalibrationOptions) -> bool:
    window = (options.windows or {}).get("flt")
    try:
        archive.find_calibration(date, "flt", window=window, channel=channel)
    except CalibrationNotFound:
        return False
    return True


def _night(archive: Archive, exposure: Exposure) -> NightIndex:
    return archive.night(exposure.date)


#: Bias stacks up to this size (bytes) are held in memory, larger ones go through a
#: disk-backed file (bounded memory whatever the number of biases).
BIAS_STACK_IN_MEMORY = 256 * 2**20


def build_master_bias(archive: Archive, exposures: list[Exposure], channel: instrument.Channel,
                      overscan: str = "row") -> MasterBias:
    """Master bias from bias exposures (their images only: the variance is measured).

    Each image is stitched straight into its plane of a float32 stack, held in memory up to
    :data:`BIAS_STACK_IN_MEMORY` bytes and in a disk-backed file beyond."""
    frames = list(exposures)
    first = None
    while frames and first is None:  # the first readable bias sets the shape
        e = frames.pop(0)
        try:
            first = read_channel_image(_night(archive, e), e, channel, overscan=overscan)
        except FrameError as err:
            log.warning("bias left out: %s", err)
    if first is None:
        raise PanaceaError(f"{channel.name}: none of the biases "
                           f"{[e.name for e in exposures]} is usable")
    shape = first.shape
    nbytes = (len(frames) + 1) * first.nbytes
    with tempfile.TemporaryDirectory(prefix="panacea-bias-") as tmp:
        if nbytes <= BIAS_STACK_IN_MEMORY:
            stack = np.empty((len(frames) + 1, *shape), np.float32)
        else:
            stack = np.lib.format.open_memmap(f"{tmp}/stack.npy", mode="w+", dtype=np.float32,
                                              shape=(len(frames) + 1, *shape))
        stack[0] = first
        del first
        kept = 1
        for e in frames:
            try:
                image = read_channel_image(_night(archive, e), e, channel, overscan=overscan,
                                           out=stack[kept])
            except FrameError as err:
                log.warning("bias left out: %s", err)
                continue
            if image.shape != shape:
                log.warning("bias left out: %s %s: shape %s differs from the first bias's %s",
                            e.name, channel.name, image.shape, shape)
                continue
            kept += 1
        return master_bias(stack, kept, shape, amp_rows=shape[0] // 2)


def _read_corrected(archive: Archive, exposure: Exposure, channel: instrument.Channel,
                    bias: MasterBias, overscan: str) -> Frame:
    """The exposure's channel read and bias-subtracted (in place, variance included).

    Raises
    ------
    FrameError
        When it cannot be read, or its shape differs from the master bias's.
    """
    frame = read_channel(_night(archive, exposure), exposure, channel, overscan=overscan)
    if frame.image.shape != bias.image.shape:
        raise FrameError(f"{exposure.name} {channel.name}: shape {frame.image.shape} differs "
                         f"from the master bias's {bias.image.shape}")
    frame.image -= bias.image
    frame.variance += bias.variance
    return frame


def master_frame(archive: Archive, exposures: list[Exposure], channel: instrument.Channel,
                 bias: MasterBias, overscan: str, min_level: float = 0.0
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bias-subtracted, cosmic-ray-cleaned combination of exposures (counts of their sum).

    Frames that cannot be read, or whose level is below ``min_level``, are left out with a
    warning. Returns image, variance and a saturation mask.
    """
    images, variances, masks, levels = [], [], [], []
    for e in exposures:
        try:
            f = _read_corrected(archive, e, channel, bias, overscan)
        except FrameError as err:
            log.warning("left out: %s", err)
            continue
        level = frame_level(f.image)
        if level < min_level:
            log.warning("%s: %s far too faint (level %.0f e- < %.0f); left out", e.name,
                        instrument.FRAME_TYPES[e.ftype], level, min_level)
            continue
        if images and f.image.shape != images[0].shape:
            log.warning("%s %s: shape %s differs from the other frames' %s; left out",
                        e.name, channel.name, f.image.shape, images[0].shape)
            continue
        images.append(f.image)
        variances.append(f.variance)
        masks.append((f.mask & Mask.SATURATED) > 0)
        levels.append(level)
    if not images:
        raise PanaceaError(f"{channel.name}: none of {[e.name for e in exposures]} is usable")
    image, var, _ = combine_frames(images, variances, masks, levels=levels)
    saturated = np.any(np.stack(masks), axis=0)
    return image, var, saturated


def calibrate_channel(
    archive: Archive,
    date: str,
    channel: str | instrument.Channel,
    options: CalibrationOptions | None = None,
    plan: CalibrationPlan | None = None,
    timer: StageTimer | None = None,
) -> CalibrationBundle:
    """All calibrations of one channel: master bias, trace, profile, wavelength, flats."""
    ch = channel if isinstance(channel, instrument.Channel) else instrument.get_channel(channel)
    options = options or CalibrationOptions()
    timer = timer or StageTimer()
    t0 = time.perf_counter()
    plan = plan or plan_calibration(archive, date, ch, options)
    timer.add("plan", t0)

    t0 = time.perf_counter()
    bias = build_master_bias(archive, plan.bias, ch, options.overscan)
    timer.add("bias", t0)

    t0 = time.perf_counter()
    flat_img, flat_var, flat_sat = master_frame(archive, plan.flat, ch, bias, options.overscan,
                                                MIN_FLAT_LEVEL)
    timer.add("read flats", t0)

    t0 = time.perf_counter()
    tsol, profile = trace_and_profile(flat_img, flat_var, mask=flat_sat)
    del flat_sat
    timer.add("trace + profile", t0)

    t0 = time.perf_counter()
    # the boxcar weights of the calibration's aperture, built once for every frame below
    ap = aperture(tsol.trace, CAL_HALF_WIDTH, flat_img.shape)
    arcs = {}
    arc_sum = np.zeros_like(flat_img)
    for lamp, exposures in plan.arcs.items():
        img, var, sat = master_frame(archive, exposures, ch, bias, options.overscan)
        flux, fvar = boxcar(img, ap, variance=var)
        if sat.any():
            satfib = boxcar(sat.astype(np.float32), ap)[0] > 0
        else:  # the aperture sums of an empty mask (exactly)
            satfib = np.zeros(flux.shape, bool)
        arcs[lamp] = (flux, fvar, satfib)
        arc_sum += img
        del img, var, sat
    timer.add("read arcs", t0)
    t0 = time.perf_counter()
    wsol = solve_wavelength(arcs, ch, tsol.dead)
    lamps = ",".join(sorted(arcs))
    arcspec = sum(a[0] for a in arcs.values())
    del arcs  # their variances and saturation masks are not needed any more
    timer.add("wavelength", t0)

    t0 = time.perf_counter()
    wave, shape = _sky_shape(archive, plan.onsky, ch, bias, options.overscan, tsol, wsol, ap)
    timer.add("sky shape", t0)

    t0 = time.perf_counter()
    twispec, twivar = boxcar(flat_img, ap, variance=flat_var)
    fflat = fiber_to_fiber(twispec, twivar, wave, tsol.dead)
    dead = tsol.dead | fflat.dead
    timer.add("fiber-to-fiber", t0)

    t0 = time.perf_counter()
    # pixel flat from the internal flat (a smooth lamp spectrum) when there is one, else from
    # the twilight divided by its fitted spectrum; both are photon-limited
    flatspec = None
    if plan.internal and not options.use_flat:
        del flat_var  # the twilight's variance is not needed any more
        int_img, int_var, _ = master_frame(archive, plan.internal, ch, bias, options.overscan,
                                           MIN_FLAT_LEVEL)
        flatspec, _ = boxcar(int_img, ap)
        del ap  # its weights (~55 MB) are not held through the pixel flat
        pflat = pixel_flat(int_img, int_var, tsol.trace, dead=dead)
        del int_img, int_var
    else:
        del ap
        pflat = pixel_flat(flat_img, flat_var, tsol.trace, wave=wave, source=fflat.source,
                           dead=dead)
    timer.add("pixel flat", t0)

    nrow = flat_img.shape[0]
    arrays = {
        "wavelength": wave,
        "trace": tsol.trace,
        "flat": fflat.ftf,
        "bigw": pixel_map(tsol.trace, wave, nrow),
        "masterbias": bias.image,
        "xypos": instrument.fiber_positions(),
        "dead": dead.astype(np.uint8),
        "arcspec": arcspec,
        "twispec": twispec,
        "flatspec": flatspec,
        "bigf": pixel_map(tsol.trace, fflat.ftf, nrow),
        "masterarc": arc_sum,
        "masterflat": flat_img,
        "pixelflat": pflat,
        "profile": profile.to_array(),
        "rdnoise": bias.rdnoise,
        "wavefit": wsol.line_table(),
    }
    arrays = {k: v for k, v in arrays.items() if v is not None}
    meta = {
        "OPTIONS": options.describe(),
        "NBIAS": bias.nframes,
        "NFLAT": len(plan.flat),
        "LAMPS": lamps,
        "WAVERMS": wsol.accuracy,
        "WDEGX": int(wsol.choice["deg_x"]) if wsol.choice else -1,
        "WDEGY": int(wsol.choice["deg_y"]) if wsol.choice else -1,
        "WMODEL": str(wsol.choice["method"]) if wsol.choice else "fixed",
        "WCVRMS": _finite(wsol.choice.get("cv_rms") if wsol.choice else None),
        **_shape_cards(shape),
        "TRACERMS": float(np.nanmedian(tsol.rms)),
        "HALFWID": float(profile.half_width),
        "AMPROWS": int(profile.amp_rows),
        "FIBPAMP": int(profile.fibers_per_amp),
        "NDEAD": int(dead.sum()),
    }
    log.info("%s %s calibrated: %d dead fibers, lamps %s, stage seconds %s", date, ch.name,
             meta["NDEAD"], meta["LAMPS"],
             ", ".join(f"{k} {v:.2f}" for k, v in timer.seconds.items()))
    return CalibrationBundle(date=date, channel=ch.name, arrays=arrays, inputs=plan.inputs,
                             meta=meta)


def _sky_shape(archive: Archive, exposures: list[Exposure], ch: instrument.Channel,
               bias: MasterBias, overscan: str, tsol, wsol,
               ap: Aperture) -> tuple[np.ndarray, skyshape.ShapeFit]:
    """The arc solution corrected by the residual shape that the night's sky lines and the
    arc lines choose (:mod:`panacea.skyshape`), and that shape's fit.

    Each on-sky exposure is read, bias-subtracted and boxcar-extracted on the calibration's
    trace with its aperture ``ap`` (no cosmic-ray cleaning: the line fits clip outliers);
    an unreadable one is left out with a warning."""
    usable = ~tsol.dead
    sky = []
    for e in exposures:
        try:
            frame = _read_corrected(archive, e, ch, bias, overscan)
        except FrameError as err:
            log.warning("%s: left out of the sky-line shape: %s", e.name, err)
            continue
        flux, var = boxcar(frame.image, ap, variance=frame.variance)
        del frame
        sky.append(skyshape.measure_exposure(flux, var, wsol.wave, usable, e.name))
    lines = wsol.lines
    arc = skyshape.arc_residuals(lines.column, wsol.column(lines.wavelength), lines.used,
                                 lines.column_err)
    shape = skyshape.fit_shape(sky, arc, wsol.wave.shape[1])
    if shape.applied:
        log.info("%s: sky lines (%d measurements of %d lines in %d exposures) and %d arc "
                 "lines chose a residual shape (knots every %.0f px, held-out RMS %.4f px "
                 "instead of %.4f px; largest correction %.3f px)", ch.name, shape.nsky,
                 shape.nwave, shape.nexp, shape.narc, shape.spacing, shape.rms,
                 shape.rms_none, shape.largest)
        return skyshape.apply_shape(wsol.wave, shape.offsets, shape.across), shape
    log.info("%s: wavelength shape from the arcs alone: %s", ch.name,
             shape.reason or "no sky exposure")
    return wsol.wave, shape


def _shape_cards(shape: skyshape.ShapeFit) -> dict:
    """Header cards (value, comment) saying how the sky lines shaped the solution."""
    return {
        "WSKYMOD": (shape.method, "sky-line shape: splineN[+fib] or none"),
        "WSKYPRI": (shape.prior, "prior of its spline coefficients (px)"),
        "WSKYNL": (shape.nwave, "distinct sky lines constraining the shape"),
        "WSKYNM": (shape.nsky, "sky-line measurements (lines x groups x exps)"),
        "WSKYNE": (shape.nexp, "on-sky exposures constraining the shape"),
        "WSKYCV": (round(_finite(shape.rms), 5), "held-out sky-line RMS, shape (px)"),
        "WSKYCV0": (round(_finite(shape.rms_none), 5), "held-out sky-line RMS, no shape (px)"),
        "WSKYMAX": (round(shape.largest, 5), "largest shape correction (px)"),
    }


def _finite(value: float | None) -> float:
    """A header-safe number: -1 for a missing or non-finite value."""
    return float(value) if value is not None and np.isfinite(value) else -1.0
