"""Night reduction: which frames, which calibrations, caching, and the order of work.

This is the one place that decides what to run; the stages themselves are pure functions.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from . import instrument
from .archive import Archive
from .calbundle import (
    BundleError,
    CalibrationBundle,
    bundle_path,
    inputs_fingerprint,
    read_bundle,
    write_bundle,
)
from .calibration import CalibrationOptions, calibrate_channel, plan_calibration
from .errors import PanaceaError
from .inventory import format_inventory
from .products import MULTI_LAYOUT, multi_name, product_folder, write_product
from .science import UNCALIBRATED_UNITS, ChannelCalibration, ScienceOptions, reduce_exposure

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


def write_multi(night, exposure, cal: ChannelCalibration, root: Path) -> int:
    """Reduce one exposure of one channel and write its ``multi`` file; return 1."""
    arrays, header = reduce_exposure(night, exposure, cal, ScienceOptions())
    is_standard = instrument.match_standard(exposure.object) is not None
    folder = product_folder(root, exposure.program, is_standard)
    path = folder / multi_name(exposure.date, exposure.obsid, exposure.exp, cal.channel.name)
    write_product(MULTI_LAYOUT, arrays, path, header, options={"sky": "spline"},
                  units=UNCALIBRATED_UNITS)
    log.info("%s %s: wrote %s", exposure.name, cal.channel.name, path)
    return 1


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


def reduce_night(args: argparse.Namespace) -> int:
    """Reduce one night for the channels asked for; return the process exit code.

    A channel that fails is reported and the others still run; the exit code is 1 when any
    channel failed.
    """
    archive = Archive(args.baseraw)
    night = archive.night(args.date)
    for line in format_inventory(night).splitlines():
        log.info("%s", line)
    options = CalibrationOptions(use_flat=args.use_flat)
    root = Path(args.output)
    failed = []
    science = science_exposures(night, args)
    log.info("night %s: %d science exposures to reduce%s: %s", args.date, len(science),
             f" matching {args.object!r}" if args.object else "",
             ", ".join(f"{e.name} {e.object}" for e in science) or "none")
    nwritten = 0
    for channel in instrument.parse_channels(args.sides):
        try:
            bundle = calibration_for(archive, args.date, channel, options, root)
        except PanaceaError as err:
            log.error("%s %s: calibration failed: %s", args.date, channel.name, err)
            failed.append(channel.name)
            continue
        cal = ChannelCalibration.from_bundle(
            bundle, str(bundle_path(root, args.date, channel.name)))
        for exposure in science:
            if not any((channel.ifuslot, a) in exposure.files for a in channel.amps):
                log.debug("%s has no %s files", exposure.name, channel.name)
                continue
            try:
                nwritten += write_multi(night, exposure, cal, root)
            except PanaceaError as err:
                log.error("%s %s: skipped: %s", exposure.name, channel.name, err)
    log.info("night %s: %d multi files written under %s (spectra not yet flux calibrated)",
             args.date, nwritten, root)
    archive.close()
    if failed:
        log.error("night %s: channels failed: %s", args.date, ", ".join(failed))
        return 1
    return 0
