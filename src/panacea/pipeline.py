"""Night reduction: which frames, which calibrations, caching, and the order of work.

This is the one place that decides what to run; the stages themselves are pure functions.
"""

from __future__ import annotations

import argparse
import re
import logging
import time
from pathlib import Path

import numpy as np
from astropy.io import fits

from . import fluxcal, instrument
from .archive import Archive
from .calbundle import (
    BundleError,
    CalibrationBundle,
    bundle_path,
    inputs_fingerprint,
    read_bundle,
    write_bundle,
)
from .calibration import CalibrationOptions, StageTimer, calibrate_channel, plan_calibration
from .errors import PanaceaError
from .inventory import format_inventory
from .exposure_products import DEFAULT_CUBES, FluxScale, Written, write_exposure_products
from .joined import CHANNEL_ORDER, combine_exposures, join_channels, write_joined
from .products import product_folder
from .science import ChannelCalibration, ExposureResult, ScienceOptions, reduce_exposure

log = logging.getLogger(__name__)


def calibration_for(
    archive: Archive,
    date: str,
    channel: instrument.Channel,
    options: CalibrationOptions,
    root: Path,
    force: bool = False,
) -> CalibrationBundle:
    """The channel's calibration bundle: reused from ``root/CALS`` when its inputs and options
    are unchanged, else built from raw frames and written atomically."""
    plan = plan_calibration(archive, date, channel, options)
    path = bundle_path(root, date, channel.name)
    fingerprint = inputs_fingerprint(plan.inputs, options.describe())
    if path.exists() and not force:
        try:
            bundle = read_bundle(path)
            if bundle.fingerprint == fingerprint:
                log.info("%s %s: reusing calibration %s", date, channel.name, path)
                return bundle
            log.info("%s %s: inputs changed since %s was written; rebuilding", date,
                     channel.name, path)
        except BundleError as err:
            log.warning("%s; rebuilding it", err)
    bundle = calibrate_channel(archive, date, channel, options, plan=plan)
    write_bundle(bundle, path)
    log.info("%s %s: wrote %s", date, channel.name, path)
    return bundle


def guider(cache: dict, night, exposure) -> fluxcal.GuiderConditions:
    """Transparency and illuminated area of an exposure from the guider frames, read once
    per exposure (``cache`` is kept for the night; every channel and the response share
    it)."""
    key = (night.date, exposure.name)
    if key not in cache:
        cache[key] = fluxcal.guider_conditions(night, exposure.time, exposure.exptime)
        for note in cache[key].notes:
            log.info("%s: %s", exposure.name, note)
    return cache[key]


def write_exposure(night, exposure, cal: ChannelCalibration, root: Path,
                   options: ScienceOptions, response: tuple[np.ndarray | None, str],
                   conditions: dict, timer: StageTimer | None = None,
                   result: ExposureResult | None = None,
                   cubes: tuple[str, ...] | bool = DEFAULT_CUBES) -> Written:
    """Reduce one exposure of one channel (unless ``result`` is given) and write its
    products, flux calibrated with ``response`` (response, label) and the guider."""
    timer = timer if timer is not None else StageTimer()
    if result is None:
        result = reduce_exposure(night, exposure, cal, options, timer)
    t0 = time.perf_counter()
    scale = FluxScale(response[0], response[1], guider(conditions, night, exposure))
    written = write_exposure_products(result, scale, cal, _folder(root, exposure),
                                      _described(options), cubes=cubes)
    timer.add("write", t0)
    return written


def _folder(root: Path, exposure) -> Path:
    is_standard = instrument.match_standard(exposure.object) is not None
    return product_folder(root, exposure.program, is_standard)


def _described(options: ScienceOptions) -> dict:
    return {"sky": options.sky_method, "correct_ftf": options.correct_ftf,
            "source_x": options.source_x, "source_y": options.source_y,
            "central_wave": options.central_wave, "wavelength_bin": options.wavelength_bin}


def science_exposures(night, args: argparse.Namespace) -> list:
    """Exposures to treat as science: ``sci``, plus ``eng``/``flt``/``drk`` on request, whose
    OBJECT contains ``args.object`` when given (case-insensitive)."""
    kinds = {"sci"}
    kinds |= {"eng"} if args.reduce_eng else set()
    kinds |= {"flt"} if args.reduce_flt else set()
    kinds |= {"drk"} if args.reduce_drk else set()
    out = [e for e in night.exposures() if e.ftype in kinds]
    if args.object:
        out = [e for e in out if args.object.lower() in e.object.lower()]
    return out


def _standards_dir(args) -> Path | None:
    if getattr(args, "standards_dir", None):
        return Path(args.standards_dir)
    default = Path(args.baseraw) / "standards"
    return default if default.is_dir() else None


def _derive_response(night, result: ExposureResult, cal: ChannelCalibration, args,
                     conditions: dict) -> tuple[np.ndarray, str] | None:
    """The channel response from a reduced standard-star exposure (None, logged, when the
    star or its reference spectrum is missing)."""
    exposure = result.frame.exposure
    ch = cal.channel
    name = instrument.match_standard(exposure.object)
    if result.source is None:
        log.warning("%s %s: standard %s not detected; no response from it", exposure.name,
                    ch.name, name)
        return None
    folder = _standards_dir(args)
    path = fluxcal.standard_file(folder, name) if folder is not None else None
    if path is None:
        where = (folder if folder is not None
                 else "no standards folder (--standards-dir, or {baseraw}/standards)")
        log.warning("%s %s: no reference spectrum m%s.dat.txt for standard %s in %s; no "
                    "response from it", exposure.name, ch.name, name.lower(), name, where)
        return None
    try:
        ref_wave, ref_flam = fluxcal.read_standard(path)
        cond = guider(conditions, night, exposure)
        src = result.source
        fit = fluxcal.derive_response(ch.grid, src.spectrum, src.error**2, ref_wave, ref_flam,
                                      ch.resolution, cond.area_cm2, cond.transparency)
    except PanaceaError as err:
        log.warning("%s %s: response not derived: %s", exposure.name, ch.name, err)
        return None
    label = f"{name} {exposure.date} obs {exposure.obsid}"
    log.info("%s %s: response from %s (fit RMS %.2f%%)", exposure.name, ch.name, label,
             100 * fit.rms)
    out = Path(args.output) / "CALS" / f"response_{exposure.date}_{ch.name}.fits"
    fluxcal.write_response(out, ch.grid, fit.response, {"STANDARD": name,
                                                        "OBSID": exposure.obsid})
    return fit.response, label


def _slot_of(obj: str) -> str | None:
    """The IFU slot a standard was placed on, from OBJECT (``HD_19445_056_E`` -> ``056``)."""
    m = re.search(r"_(0\d\d)(?:_|$)", obj)
    return m.group(1) if m else None


def _standard_exposures(archive, night, args, channel) -> tuple:
    """The night (or --standard_star_date) and its standard exposures for a channel."""
    snight = night
    if args.standard_star_date and args.standard_star_date != args.date:
        snight = archive.night(args.standard_star_date)
    stds = [e for e in snight.exposures(ftype="sci")
            if instrument.match_standard(e.object) is not None and e.has_channel(channel)
            and _slot_of(e.object) in (None, channel.ifuslot)]
    if args.standard_star_obsid is not None:
        stds = [e for e in snight.exposures() if e.obsid == args.standard_star_obsid
                and e.has_channel(channel)]
    return snight, stds


def reduce_night(args: argparse.Namespace) -> int:
    """Reduce one night for the channels asked for; return the process exit code.

    Per channel: calibration bundle, then the standard stars (the first whose star is found
    gives the response), then every science exposure with its products. Per observation at
    the end: exposures combined and channels joined. A channel that fails is reported and
    the others still run; the exit code is 1 when any channel failed.
    """
    archive = Archive(args.baseraw)
    night = archive.night(args.date)
    for line in format_inventory(night).splitlines():
        log.info("%s", line)
    options = CalibrationOptions(use_flat=args.use_flat)
    root = Path(args.output)
    sci_options = ScienceOptions(correct_ftf=args.correct_ftf, source_x=args.source_x,
                                 source_y=args.source_y, central_wave=args.central_wave,
                                 wavelength_bin=args.wavelength_bin)
    failed = []
    science = science_exposures(night, args)
    log.info("night %s: %d science exposures to reduce%s: %s", args.date, len(science),
             f" matching {args.object!r}" if args.object else "",
             ", ".join(f"{e.name} {e.object}" for e in science) or "none")
    nwritten = 0
    conditions: dict = {}  # guider conditions per exposure, for every channel
    joins: dict[int, tuple[fits.Header, str]] = {}  # observations with a source spectrum
    for channel in instrument.parse_channels(args.sides):
        try:
            bundle = calibration_for(archive, args.date, channel, options, root)
        except PanaceaError as err:
            log.error("%s %s: calibration failed: %s", args.date, channel.name, err)
            failed.append(channel.name)
            continue
        cal = ChannelCalibration.from_bundle(
            bundle, str(bundle_path(root, args.date, channel.name)))
        results = {}
        response: tuple[np.ndarray | None, str] = (None, "none")
        snight, stds = _standard_exposures(archive, night, args, channel)
        for exposure in stds:
            try:
                result = reduce_exposure(snight, exposure, cal, sci_options)
            except PanaceaError as err:
                log.error("%s %s: standard skipped: %s", exposure.name, channel.name, err)
                continue
            if snight is night:
                results[exposure.name] = result
            derived = _derive_response(snight, result, cal, args, conditions)
            if derived is not None:
                response = derived
                break
        if response[0] is None and args.response_dir:
            found = fluxcal.response_from_dir(args.response_dir, channel.name, channel.grid)
            if found is not None:
                response = (found, f"{args.response_dir}/response_{channel.name}.fits")
        if response[0] is None and not getattr(args, "no_default_response", False):
            found = fluxcal.default_response(channel.name, channel.grid)
            if found is not None:
                response = (found, "bundled default response")
                log.warning("%s %s: no standard star response; using the bundled default "
                            "response (transparency and area still from the guider)",
                            args.date, channel.name)
        if response[0] is None:
            log.warning("%s %s: no standard star response, no --response-dir response and "
                        "no default response: spectra stay in electron/s/cm2/Angstrom",
                        args.date, channel.name)
        for exposure in science:
            if not exposure.amps_of(channel):  # an arm that did not observe: no error;
                # one amplifier of two is, and the frame reader says which and where
                log.debug("%s has no %s files", exposure.name, channel.name)
                continue
            try:
                written = write_exposure(night, exposure, cal, root, sci_options, response,
                                         conditions, result=results.get(exposure.name),
                                         cubes=getattr(args, "cubes", DEFAULT_CUBES))
                nwritten += 1
            except PanaceaError as err:
                log.error("%s %s: skipped: %s", exposure.name, channel.name, err)
                continue
            if written.spectrum is not None:
                joins.setdefault(exposure.obsid, (written.header, written.unit))
    for obsid, (header, unit) in joins.items():
        _write_joined(root, args.date, obsid, header, unit, night)
    log.info("night %s: products of %d exposure-channels written under %s", args.date,
             nwritten, root)
    archive.close()
    if failed:
        log.error("night %s: channels failed: %s", args.date, ", ".join(failed))
        return 1
    return 0


def _write_joined(root, date, obsid, header, unit, night) -> None:
    """Combine the exposures and join the channels of one observation from the
    ``spectrum_*`` files in its folder (so that a re-run of some channels still joins all
    the channels reduced so far)."""
    exposure = next(e for e in night.exposures() if e.obsid == obsid)
    folder = _folder(root, exposure)
    rows_by_channel: dict[str, list] = {}
    for name in CHANNEL_ORDER:
        for path in sorted(folder.glob(f"spectrum_{date}_{obsid:07d}_exp*_{name}.fits")):
            try:
                rows = fits.getdata(path).astype(float)
                if fits.getheader(path).get("BUNIT", unit) != unit:
                    log.warning("%s: unit differs from this run's; left out of the join", path)
                    continue
            except (OSError, ValueError) as err:
                log.warning("%s: unreadable (%s); left out of the join", path, err)
                continue
            rows_by_channel.setdefault(name, []).append(rows)
    parts = {}
    for name, rows in rows_by_channel.items():
        flux, err, sky = combine_exposures([r[1] for r in rows], [r[3] for r in rows],
                                           [r[2] for r in rows])
        parts[name] = (rows[0][0], flux, err, sky)
    joined = join_channels(parts)
    path = folder / f"joined_{date}_{obsid:07d}.fits"
    write_joined(path, joined, unit, header)
    log.info("obs %d: exposures combined, channels %s joined into %s", obsid,
             ",".join(parts), path)
