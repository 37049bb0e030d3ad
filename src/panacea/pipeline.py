"""Night reduction: which frames, which calibrations, caching, and the order of work.

This is the one place that decides what to run; the stages themselves are pure functions.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from astropy.io import fits

from . import __version__, fluxcal, instrument
from .archive import Archive
from .calbundle import (
    SCIENCE_EXTENSIONS,
    BundleError,
    CalibrationBundle,
    bundle_path,
    content_fingerprint,
    file_digest,
    read_bundle,
    write_bundle,
)
from .calibration import CalibrationOptions, StageTimer, calibrate_channel, plan_calibration
from .errors import NoDataError, PanaceaError
from .inventory import format_inventory
from .io_utils import header_number
from .exposure_products import (
    DEFAULT_CUBES,
    SPECTRUM_LAYOUT,
    FluxScale,
    Written,
    write_exposure_products,
)
from .joined import CHANNEL_ORDER, combine_exposures, join_channels, write_joined
from .products import product_folder
from .science import ChannelCalibration, ExposureResult, ScienceOptions, reduce_exposure

if TYPE_CHECKING:  # the operations layer above passes these in; no import upwards
    from .ops.config import RunConfig, Selection
    from .ops.ledger import Ledger
    from .ops.summary import NightSummary

log = logging.getLogger(__name__)


def calibration_for(
    archive: Archive,
    date: str,
    channel: instrument.Channel,
    options: CalibrationOptions,
    root: Path,
    force: bool = False,
    tag: str = "",
    load: bool = True,
) -> CalibrationBundle:
    """The channel's calibration bundle: reused from ``root/CALS`` when its inputs, options,
    ``tag`` (the configuration hash) and the pipeline version are unchanged, else built from
    raw frames and written atomically. A reused bundle has ``meta["_reused"]`` set. A built
    one is returned as stored (read back) unless ``load`` is False (then as computed: for a
    caller that needs only its fingerprint; a reused one then holds no arrays)."""
    plan = plan_calibration(archive, date, channel, options)
    path = bundle_path(root, date, channel.name)
    described = f"{options.describe()};config={tag}"
    fingerprint = content_fingerprint(plan.inputs, plan.sources, described)
    if path.exists() and not force:
        try:
            # without ``load`` only the header is read (every HDU's checksum still checked)
            bundle = read_bundle(path, names=None if load else ())
            if bundle.fingerprint == fingerprint:
                log.info("%s %s: reusing calibration %s", date, channel.name, path)
                bundle.meta["_reused"] = True
                return bundle
            log.info("%s %s: inputs, options or pipeline version changed since %s was "
                     "written; rebuilding", date, channel.name, path)
        except BundleError as err:
            log.warning("%s; not reused, rebuilding it", err)
    bundle = calibrate_channel(archive, date, channel, options, plan=plan)
    bundle.meta["OPTIONS"] = described
    bundle.fprint = fingerprint
    write_bundle(bundle, path)
    log.info("%s %s: wrote %s", date, channel.name, path)
    if not load:
        return bundle
    # the science uses the bundle as stored (some extensions are quantised within stated
    # bounds), so a first run and a rerun that reuses the bundle give the same products
    del bundle  # not held while the stored one is read (a few frames' worth of memory)
    return read_bundle(path)


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
                   options: ScienceOptions, response: tuple,
                   conditions: dict, timer: StageTimer | None = None,
                   result: ExposureResult | None = None,
                   cubes: tuple[str, ...] | bool = DEFAULT_CUBES, tag: str = "") -> Written:
    """Reduce one exposure of one channel (unless ``result`` is given) and write its
    products, flux calibrated with ``response`` (response, label) and the guider."""
    timer = timer if timer is not None else StageTimer()
    if result is None:
        result = reduce_exposure(night, exposure, cal, options, timer)
    t0 = time.perf_counter()
    scale = FluxScale(response[0], response[1], guider(conditions, night, exposure),
                      telluric=response[2] if len(response) > 2 else None,
                      airmass=header_number(result.header, "AIRMASS") or 0.0)
    written = write_exposure_products(result, scale, cal, _folder(root, exposure),
                                      _described(options, tag), cubes=cubes)
    timer.add("write", t0)
    return written


def _folder(root: Path, exposure) -> Path:
    is_standard = instrument.match_standard(exposure.object) is not None
    return product_folder(root, exposure.program, is_standard)


def _described(options: ScienceOptions, tag: str = "") -> dict:
    out = {"sky": options.sky_method, "correct_ftf": options.correct_ftf,
           "source_x": options.source_x, "source_y": options.source_y,
           "central_wave": options.central_wave, "wavelength_bin": options.wavelength_bin}
    if tag:
        out["config"] = tag  # hash of the run configuration (panacea-lrs2 config)
    return out


def science_exposures(night, selection: Selection) -> list:
    """Exposures to treat as science: frame types ``selection.kinds`` (``sci``, plus
    ``eng``/``flt``/``drk`` on request), whose OBJECT contains ``selection.object`` when
    given (case-insensitive)."""
    out = [e for e in night.exposures() if e.ftype in selection.kinds]
    if selection.object:
        out = [e for e in out if selection.object.lower() in e.object.lower()]
    return out


def _standards_dir(run: RunConfig) -> Path | None:
    if run.flux.standards_dir:
        return Path(run.flux.standards_dir)
    default = Path(run.baseraw) / "standards"
    return default if default.is_dir() else None


def _derive_response(night, result: ExposureResult, cal: ChannelCalibration, run: RunConfig,
                     conditions: dict) -> tuple[tuple | None, str]:
    """The channel response from a reduced standard-star exposure as (response, label,
    (telluric transmission, airmass of the standard)), and why not (None and the reason,
    logged, when the star or its reference spectrum is missing)."""
    exposure = result.frame.exposure
    ch = cal.channel
    name = instrument.match_standard(exposure.object)
    if result.source is None:
        log.warning("%s %s: standard %s not detected; no response from it", exposure.name,
                    ch.name, name)
        return None, f"standard {name} not detected"
    folder = _standards_dir(run)
    path = fluxcal.standard_file(folder, name) if folder is not None else None
    if path is None:
        where = (folder if folder is not None
                 else "no standards folder (--standards-dir, or {baseraw}/standards)")
        log.warning("%s %s: no reference spectrum m%s.dat.txt for standard %s in %s; no "
                    "response from it", exposure.name, ch.name, name.lower(), name, where)
        return None, f"no reference spectrum m{name.lower()}.dat.txt in {where}"
    try:
        ref_wave, ref_flam = fluxcal.read_standard(path)
        cond = guider(conditions, night, exposure)
        src = result.source
        fit = fluxcal.derive_response(ch.grid, src.spectrum, src.error**2, ref_wave, ref_flam,
                                      ch.resolution, cond.area_cm2, cond.transparency)
    except PanaceaError as err:
        log.warning("%s %s: response not derived: %s", exposure.name, ch.name, err)
        return None, f"response not derived: {err}"
    label = f"{name} {exposure.date} obs {exposure.obsid}"
    log.info("%s %s: response from %s (fit RMS %.2f%%)", exposure.name, ch.name, label,
             100 * fit.rms)
    out = response_path(run.output, exposure.date, ch.name)
    airmass = header_number(result.header, "AIRMASS") or 0.0
    fluxcal.write_response(out, ch.grid, fit.response, {"STANDARD": name,
                                                        "OBSID": exposure.obsid,
                                                        "AIRMASS": (airmass, "of the standard"),
                                                        **fluxcal.response_cards(fit)},
                           telluric=fit.telluric)
    return (fit.response, label, (fit.telluric, airmass)), ""


def response_path(root: str | Path, date: str, channel: str) -> Path:
    """``{root}/CALS/response_{date}_{channel}.fits``: the response a standard gave."""
    return Path(root) / "CALS" / f"response_{date}_{channel}.fits"


def _slot_of(obj: str) -> str | None:
    """The IFU slot a standard was placed on, from OBJECT (``HD_19445_056_E`` -> ``056``)."""
    m = re.search(r"_(0\d\d)(?:_|$)", obj)
    return m.group(1) if m else None


def _standard_exposures(archive, night, run: RunConfig, channel) -> tuple:
    """The night (or the configured standard-star night) and its standard exposures for a
    channel."""
    snight = night
    sdate = run.flux.standard_star_date
    if sdate and sdate != night.date:
        snight = archive.night(sdate)
    stds = [e for e in snight.exposures(ftype="sci")
            if instrument.match_standard(e.object) is not None and e.has_channel(channel)
            and _slot_of(e.object) in (None, channel.ifuslot)]
    if run.flux.standard_star_obsid is not None:
        stds = [e for e in snight.exposures() if e.obsid == run.flux.standard_star_obsid
                and e.has_channel(channel)]
    return snight, stds


def file_stamp(path: str | Path, cache: dict | None = None) -> str:
    """The name and cheap content digest (:func:`calbundle.file_digest`) of a raw file, once
    per path when a ``cache`` is given."""
    path = Path(path)
    if cache is None or path not in cache:
        stamp = f"{path.name}:{file_digest(path)}"
        if cache is None:
            return stamp
        cache[path] = stamp
    return cache[path]


def exposure_fingerprint(exposures, *parts: str, cache: dict | None = None) -> str:
    """Fingerprint of the raw files of ``exposures`` (each tarball or loose file once) and
    the strings ``parts`` (calibration fingerprint, response, configuration hash, version)."""
    stamps = sorted({file_stamp(f.source, cache) for e in exposures for f in e.files.values()})
    h = hashlib.sha1("\n".join([*stamps, *parts, __version__]).encode())
    return h.hexdigest()[:16]


def _error_file(err: Exception) -> str | None:
    """The file an error names, when it carries one."""
    for attr in ("file", "path", "filename"):
        value = getattr(err, attr, None)
        if value:
            return str(value)
    return None


def open_night(run: RunConfig, date: str, summary: NightSummary) -> Archive | None:
    """The archive with night ``date`` indexed, or None (recorded as a night failure) when
    the night cannot be read."""
    archive = Archive(run.baseraw, windows=run.calibration.windows)
    try:
        night = archive.night(date)
    except PanaceaError as err:
        log.error("night %s: %s", date, err)
        summary.fail_night(str(err), nodata=isinstance(err, NoDataError))
        archive.close()
        return None
    for problem in night.problems:  # unreadable tarballs: their exposures are lost
        summary.add("raw", "failed", reason=str(problem), file=_error_file(problem))
    return archive


def _announce(run: RunConfig, night) -> list:
    """Log the night's inventory and its science exposures; return them."""
    for line in format_inventory(night).splitlines():
        log.info("%s", line)
    science = science_exposures(night, run.selection)
    obj = run.selection.object
    log.info("night %s: %d science exposures to reduce%s: %s", night.date, len(science),
             f" matching {obj!r}" if obj else "",
             ", ".join(f"{e.name} {e.object}" for e in science) or "none")
    return science


def channel_calibration(run: RunConfig, archive: Archive, date: str, channel_name: str,
                        summary: NightSummary) -> str | None:
    """Task 1 of a channel: its calibration bundle, built or reused (``CALS``).

    Returns the bundle's fingerprint, which the channel's later tasks check the stored
    bundle against; None when the calibration failed (recorded in ``summary``, with every
    science exposure of the channel skipped for it).
    """
    channel = instrument.get_channel(channel_name)
    root = Path(run.output)
    try:
        bundle = calibration_for(archive, date, channel, run.calibration, root,
                                 force=run.force, tag=run.calibration_hash, load=False)
    except PanaceaError as err:
        log.error("%s %s: calibration failed: %s", date, channel.name, err)
        summary.add("calibration", "failed", channel=channel.name, reason=str(err),
                    file=_error_file(err))
        for exposure in science_exposures(archive.night(date), run.selection):
            if exposure.amps_of(channel):
                summary.add("science", "skipped", channel=channel.name,
                            exposure=exposure.name, obsid=exposure.obsid,
                            exp=exposure.exp, reason="no calibration for the channel")
        return None
    summary.add("calibration", "up-to-date" if bundle.meta.get("_reused") else "written",
                channel=channel.name, products=[str(bundle_path(root, date, channel.name))])
    return bundle.fingerprint


#: The last calibration this process read: (path, mtime, size, fingerprint) -> calibration.
#: A worker given several exposures of one channel reads (and decompresses) it once.
_last_calibration: dict[tuple, ChannelCalibration] = {}


def load_calibration(root: str | Path, date: str, channel: str,
                     fingerprint: str) -> ChannelCalibration:
    """The stored calibration of a channel for the science, checked to be the one its
    calibration task made (``fingerprint``); the last one read is kept for the next
    exposure of the same channel in this process.

    Raises
    ------
    BundleError
        When the stored bundle is unreadable or another run replaced it since.
    """
    path = bundle_path(root, date, channel)
    try:
        st = path.stat()
    except OSError as err:
        raise BundleError(f"{path}: calibration missing since its task wrote it "
                          f"({err.strerror})") from None
    key = (str(path), st.st_mtime_ns, st.st_size, fingerprint)
    if key not in _last_calibration:
        _last_calibration.clear()  # one at a time: the previous one's memory goes first
        bundle = read_bundle(path, names=SCIENCE_EXTENSIONS)  # checksums of the whole file
        if bundle.fingerprint != fingerprint:
            raise BundleError(f"{path}: replaced by another run since its calibration task "
                              f"(fingerprint {bundle.fingerprint}, not {fingerprint})")
        _last_calibration[key] = ChannelCalibration.from_bundle(bundle, str(path))
        log.debug("%s: read for the science (process %d)", path.name, os.getpid())
    return _last_calibration[key]


@dataclass
class ChannelResponse:
    """What a channel's response task hands on to its science tasks (small, picklable).

    Attributes
    ----------
    response : tuple
        (response array on the channel grid or None, label, (telluric, airmass) or None).
    ident : str
        The label and a digest of the array: part of the science fingerprints.
    done : dict
        Exposures of the night whose science products the task wrote from the standards it
        reduced (exposure name -> (primary header, flux unit), or None without a spectrum).
    """

    response: tuple
    ident: str
    done: dict = field(default_factory=dict)


def channel_response(run: RunConfig, archive: Archive, date: str, channel_name: str,
                     cal_fp: str, summary: NightSummary,
                     ledger: Ledger, conditions: dict | None = None) -> ChannelResponse:
    """Task 2 of a channel: its response from the night's standards (reused when the ledger
    says its inputs are unchanged), else ``--response-dir``, else the bundled default.

    The standards reduced here that are also science exposures of the night get their
    products written now (the reduction is not done twice). ``conditions`` may hold the
    guider conditions of exposures already read (the :func:`guider` cache, e.g. the
    runner's): a standard's guider frames are otherwise read here, 0.1-0.2 s of CPU.
    """
    channel = instrument.get_channel(channel_name)
    night = archive.night(date)
    stamps: dict = {}
    conditions = {} if conditions is None else conditions
    results, response = _response(run, archive, night, channel, cal_fp, summary, ledger,
                                  conditions, stamps)
    ident = response[1] + (
        "" if response[0] is None
        else hashlib.sha1(np.ascontiguousarray(response[0], float).tobytes()).hexdigest())
    out = ChannelResponse(response, ident)
    science = {e.name: e for e in science_exposures(night, run.selection)}
    for name, result in results.items():
        exposure = science.get(name)
        if exposure is None or not exposure.amps_of(channel):
            continue
        key, fp = science_fingerprint(run, exposure, channel.name, cal_fp, ident, stamps)
        out.done[name] = reduce_science(run, night, exposure, channel.name, cal_fp, response,
                                        key, fp, summary, ledger, result=result,
                                        conditions=conditions)
    del results
    return out


def science_fingerprint(run: RunConfig, exposure, channel: str, cal_fp: str, response_id: str,
                        stamps: dict | None = None) -> tuple[str, str]:
    """The ledger key and inputs fingerprint of one exposure-channel's science products.

    Raises
    ------
    OSError
        When a raw file of the exposure cannot be read.
    """
    key = f"science {exposure.name} {channel}"
    return key, exposure_fingerprint([exposure], cal_fp, response_id, run.config_hash,
                                     str(run.cubes), cache=stamps)


def reduce_science(run: RunConfig, night, exposure, channel: str, cal_fp: str,
                   response: tuple, key: str, fp: str, summary: NightSummary,
                   ledger: Ledger, result: ExposureResult | None = None,
                   conditions: dict | None = None) -> tuple | None:
    """Task 3: one exposure of one channel reduced (unless ``result`` is given), flux
    calibrated and written; the outcome goes to ``summary`` and ``ledger`` (under ``key``
    with fingerprint ``fp``). Returns (primary header, flux unit) when a source spectrum was
    written (for the join of its observation), else None."""
    item = {"channel": channel, "exposure": exposure.name, "obsid": exposure.obsid,
            "exp": exposure.exp}
    try:
        cal = load_calibration(run.output, night.date, channel, cal_fp)
        written = write_exposure(night, exposure, cal, Path(run.output), run.science,
                                 response, conditions if conditions is not None else {},
                                 result=result, cubes=run.cubes, tag=run.config_hash)
    except PanaceaError as err:
        log.error("%s %s: skipped: %s", exposure.name, channel, err)
        summary.add("science", "skipped", reason=str(err), file=_error_file(err), **item)
        return None
    ledger.record(key, fp, summary.add("science", "written",
                                       products=[str(p) for p in written.paths], **item))
    return None if written.spectrum is None else (written.header, written.unit)


def join_night(run: RunConfig, night, science: list, joins: dict,
               summary: NightSummary) -> None:
    """Combine exposures and join channels of every observation in ``joins`` (those with a
    spectrum written now); the joined files of the others are recorded as up to date."""
    root = Path(run.output)
    for obsid, (header, unit) in sorted(joins.items()):
        try:
            path = _write_joined(root, night.date, obsid, header, unit, night)
        except (PanaceaError, OSError, ValueError) as err:
            log.error("obs %d: joined spectrum not written: %s", obsid, err)
            summary.add("joined", "failed", obsid=obsid, reason=str(err))
            continue
        summary.add("joined", "written", obsid=obsid, products=[str(path)])
    _keep_joined(root, night.date, science, joins, summary)


def _keep_joined(root: Path, date: str, science, joins, summary) -> None:
    """Record as up to date the joined spectra of observations none of whose exposures was
    rewritten in this run."""
    done = {o.obsid for o in summary.outcomes if o.kind == "science" and o.produced}
    for obsid in sorted(done - set(joins)):
        exposure = next(e for e in science if e.obsid == obsid)
        path = _folder(root, exposure) / f"joined_{date}_{obsid:07d}.fits"
        if path.is_file():
            summary.add("joined", "up-to-date", obsid=obsid, products=[str(path)])


def _response(run: RunConfig, archive, night, channel, cal_fp: str, summary, ledger,
              conditions, stamps) -> tuple[dict, tuple]:
    """The channel's response (array, label): from the night's standards (reused from
    ``CALS`` when the ledger says its inputs are unchanged), else ``--response-dir``, else
    the bundled default. Also the standards' reduced results, to be written as science."""
    date = night.date
    results: dict = {}
    snight, stds = _standard_exposures(archive, night, run, channel)
    key = f"response {date} {channel.name}"
    path = response_path(run.output, date, channel.name)
    fp = None
    if stds:
        fp = exposure_fingerprint(stds, cal_fp, run.config_hash,
                                  str(run.flux), cache=stamps)
        kept = None if run.force else ledger.current(key, fp)
        if kept is not None and path.is_file():
            try:
                with fits.open(path) as hdul:
                    label = (f"{hdul[0].header.get('STANDARD')} {date} obs "
                             f"{hdul[0].header.get('OBSID')}")
                    telluric = _telluric_of(hdul)
                response = (fluxcal.read_response(path, channel.grid), label, telluric)
                ledger.record(key, fp, summary.add("response", "up-to-date",
                                                   channel=channel.name, products=kept))
                return results, response
            except (PanaceaError, OSError) as err:
                log.warning("%s: unreadable (%s); deriving the response again", path, err)
    reasons = []
    # read only now: a response reused above needs no calibration
    cal = load_calibration(run.output, date, channel.name, cal_fp) if stds else None
    for exposure in stds:
        try:
            result = reduce_exposure(snight, exposure, cal, run.science)
        except PanaceaError as err:
            log.error("%s %s: standard skipped: %s", exposure.name, channel.name, err)
            summary.add("standard", "skipped", channel=channel.name, exposure=exposure.name,
                        obsid=exposure.obsid, exp=exposure.exp, reason=str(err),
                        file=_error_file(err))
            continue
        if snight is night:
            results[exposure.name] = result
        derived, why = _derive_response(snight, result, cal, run, conditions)
        if derived is not None:
            ledger.record(key, fp, summary.add("response", "written", channel=channel.name,
                                               exposure=exposure.name, obsid=exposure.obsid,
                                               exp=exposure.exp, products=[str(path)]))
            return results, derived
        reasons.append(f"{exposure.name}: {why}")
    if stds:
        summary.add("response", "skipped", channel=channel.name,
                    reason="; ".join(reasons) or "no standard reduced")
    return results, _fallback_response(run, date, channel)


def _telluric_of(hdul: fits.HDUList) -> tuple[np.ndarray, float] | None:
    """The telluric transmission a response file holds and its standard's airmass."""
    if "TELLURIC" not in hdul:
        return None
    return (np.asarray(hdul["TELLURIC"].data, float),
            header_number(hdul[0].header, "AIRMASS") or 0.0)


def _fallback_response(run: RunConfig, date: str, channel) -> tuple[np.ndarray | None, str]:
    """The response without a usable standard: ``--response-dir``, else the bundled one."""
    if run.flux.response_dir:
        found = fluxcal.response_from_dir(run.flux.response_dir, channel.name, channel.grid)
        if found is not None:
            return found, f"{run.flux.response_dir}/response_{channel.name}.fits"
    if run.flux.default_response:
        found = fluxcal.default_response(channel.name, channel.grid)
        if found is not None:
            log.warning("%s %s: no standard star response; using the bundled default "
                        "response (transparency and area still from the guider)",
                        date, channel.name)
            return found, "bundled default response"
    log.warning("%s %s: no standard star response, no --response-dir response and "
                "no default response: spectra stay in electron/s/cm2/Angstrom",
                date, channel.name)
    return None, "none"


def _write_joined(root, date, obsid, header, unit, night) -> Path:
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
                version = fits.getheader(path).get(SPECTRUM_LAYOUT.version_card)
                if version != SPECTRUM_LAYOUT.version:
                    log.warning("%s: spectrum layout version %s, not %s (an older run's); "
                                "left out of the join", path, version, SPECTRUM_LAYOUT.version)
                    continue
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
    return path
