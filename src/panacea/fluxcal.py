"""Flux calibration: observing conditions from the guider, standard stars, channel responses.

The flux-calibration chain of LRS2 (see the facts sheet, section 4)::

    F_lambda = rate / (area * transparency) * response

with ``rate`` the extracted count rate (electrons per second per Angstrom), ``area`` the
illuminated mirror area (cm^2) during the exposure, ``transparency`` the sky transparency
and ``response`` (erg per electron) the channel's response at HET's fixed elevation.

* :func:`guider_conditions` averages the guider frames (cameras gc1 and gc2) taken during
  an exposure: the transparency (header TRANSPAR of frames with ``GUIDLOOP = ACTIVE``,
  trusted only within 0.1-1.1) and the illuminated area from the tracker position
  (X_STRT, Y_STRT in metres, :func:`panacea.instrument.illuminated_area`). It never raises:
  missing information falls back to transparency 1 and
  :data:`panacea.instrument.DEFAULT_AREA_CM2`, with a note saying why.
* :func:`standard_file` and :func:`read_standard` find and read reference spectra of
  standard stars (``m{name}.dat.txt``: wavelength in Angstrom, AB magnitude).
* :func:`derive_response` turns the extracted spectrum of a standard into a smooth response:
  the reference is convolved to the instrument's resolution, divided by the count rate, and
  a cubic B-spline in wavelength is fitted to the logarithm of the ratio with iterative
  robust clipping (sky-line residuals do not bend it). The standard's own strong lines
  (``data/stellar_lines.csv``, widened by the reference's tabulation step, where a coarse
  table cannot follow them) and the telluric bands (``data/telluric_bands.csv``) are left
  out; breakpoints are closer near the channel's ends, where dichroic edges turn the
  response steeply. The telluric transmission is measured on the standard (the ratio of
  the smooth response to the raw one inside the bands) and applied to science spectra
  (:func:`telluric_correction`), scaled with airmass.
* :func:`write_response`, :func:`read_response` and :func:`response_from_dir` store
  responses as 2 x N images ``[wavelength, response]`` (the layout of Panacea's packaged
  responses); :func:`flux_calibrate` applies one.
"""

from __future__ import annotations

import datetime as dt
import io
import itertools
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from astropy.io import fits
from scipy.ndimage import binary_dilation, gaussian_filter1d

from panacea import instrument
from panacea.errors import ArchiveError, PanaceaError
from panacea.flat import SplineDesign
from panacea.io_utils import header_number, write_fits_atomic

if TYPE_CHECKING:
    from panacea.archive import GuiderFile, NightIndex

log = logging.getLogger(__name__)

#: Speed of light (Angstrom per second).
C_ANGSTROM = 2.99792458e18
#: Range of guider TRANSPAR values that are trusted.
TRANSPARENCY_RANGE = (0.1, 1.1)
#: Guider loop state of frames taken while guiding.
GUIDING = "ACTIVE"
#: Strong telluric absorption bands (air Angstrom): O2 B and A (all bands, O2 and H2O, are
#: in ``data/telluric_bands.csv``, see :func:`telluric_bands`).
TELLURIC_BANDS: tuple[tuple[float, float], ...] = ((6862.0, 6952.0), (7586.0, 7704.0))
#: Breakpoint spacing (Angstrom) of the response spline within :data:`END_ZONE` Angstrom
#: of a channel's ends, where dichroic edges turn the response steeply.
END_SPACING = 15.0
END_ZONE = 120.0
#: Telluric transmissions below this are not corrected (the science pixel is left as it is
#: and the correction there is flagged by TELLMIN).
MIN_TELLURIC = 0.03
#: Inside the band of saturated O2 lines (``saturates`` in ``data/telluric_bands.csv``: O2
#: A), a transmission measured on the standard below this is flagged as saturated: it is
#: written as 0 (below :data:`MIN_TELLURIC`, so science pixels there are left uncorrected
#: and counted in TELLSKIP). The band's unresolved lines do not scale as T**airmass (the
#: O2 A core corrected from airmass 1.22 to 1.6: +13 to +55 %) and its steep edges turn
#: 0.1 px of wavelength error into -8 %.
SATURATED_BELOW = 0.5
#: Residuals of the response fit (natural log of the ratio) smaller than this are never
#: clipped.
CLIP_FLOOR = 0.01
#: A stellar line inside a telluric band is bridged in the transmission measured on the
#: standard where the band beside it transmits at least this much (fluxcal.bridge_transmission).
BRIDGE_ABOVE = 0.9
#: ... for lines whose tabulated half width is at most this many reference steps.
NARROW_STEPS = 2.0
#: Stellar lines blueward of this (A) are crowded (H-epsilon to H13, Ca H and K): their
#: masks are narrowed to the cores, so that the high Balmer series is not one gap.
CROWDED_BELOW = 4000.0
#: Unit of a response (and of row 1 of a response file).
RESPONSE_UNIT = "erg / electron"
#: Unit of flux-calibrated spectra and cubes, and of count rates per collecting area (what
#: the products hold without a response).
FLUX_UNIT = "erg / (s cm2 Angstrom)"
RATE_UNIT = "electron / (s cm2 Angstrom)"
#: FWHM of a Gaussian over its sigma.
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


# --------------------------------------------------------------------------- guider


@dataclass
class GuiderConditions:
    """Observing conditions of one exposure from the guider frames.

    Attributes
    ----------
    transparency : float
        Mean trusted TRANSPAR of the guided frames (1.0 when unknown).
    area_cm2 : float
        Mean illuminated mirror area (cm^2) of the guided frames
        (:data:`panacea.instrument.DEFAULT_AREA_CM2` when unknown).
    n_frames : int
        Guider frames (both cameras) whose header was read, within the exposure.
    transparency_source, area_source : str
        ``guider`` or ``default``.
    notes : list of str
        Why a default was used, and frames that could not be read.
    """

    transparency: float
    area_cm2: float
    n_frames: int
    transparency_source: str
    area_source: str
    notes: list[str] = field(default_factory=list)


def _utc(time: dt.datetime) -> dt.datetime:
    """``time`` as an aware UTC datetime (a naive one is taken to be UTC already)."""
    if time.tzinfo is None:
        return time.replace(tzinfo=dt.timezone.utc)
    return time.astimezone(dt.timezone.utc)


def _frames_in_window(night: NightIndex, start: dt.datetime, stop: dt.datetime,
                      slack: float) -> list[GuiderFile]:
    """Guider frames of both cameras taken between ``start`` and ``stop`` (+- ``slack`` s)."""
    pad = dt.timedelta(seconds=slack)
    return [g for g in night.guider_files() if start - pad <= _utc(g.time) <= stop + pad]


#: Guider cards real frames keep in extension 1's header (the image HDU); the tracker
#: cards (X_STRT, Y_STRT, PHI_STRT, RHO_STRT, THE_STRT) are in the primary header.
GUIDER_IMAGE_CARDS = ("GUIDLOOP", "MJD", "TRANSPAR")
GUIDER_TRACKER_CARDS = ("X_STRT", "Y_STRT", "PHI_STRT", "RHO_STRT", "THE_STRT")


def guider_header(data: bytes, location: str = "guider frame") -> fits.Header:
    """The guider cards of one frame, each from where real frames keep it.

    Real frames hold the image in extension 1, with GUIDLOOP, MJD and TRANSPAR in that
    extension's header and the tracker cards in the primary header; a single-HDU frame has
    all of them in its primary header. A card missing from its usual HDU is taken from the
    other one. Raises ArchiveError naming ``location`` when the bytes are not FITS."""
    try:
        with fits.open(io.BytesIO(data), lazy_load_hdus=False) as hdul:
            headers = [h.header.copy() for h in hdul[:2]]
    except (OSError, ValueError, IndexError) as exc:
        raise ArchiveError(f"{location}: cannot read guider FITS headers ({exc})") from exc
    prim = headers[0]
    image = headers[1] if len(headers) > 1 else prim
    out = fits.Header()
    for keys, first, second in ((GUIDER_IMAGE_CARDS, image, prim),
                                (GUIDER_TRACKER_CARDS, prim, image)):
        for key in keys:
            for h in (first, second):
                if key in h:
                    out[key] = (h[key], h.comments[key])
                    break
    return out


def _read_guider_headers(night: NightIndex, frames: list[GuiderFile]
                         ) -> tuple[list[fits.Header], list[str]]:
    """Guider cards (:func:`guider_header`) of the frames that can be read, and the
    locations of those that cannot."""
    headers, bad = [], []
    for frame in frames:
        try:
            headers.append(guider_header(night.read_bytes(frame), frame.location))
        except ArchiveError as exc:
            log.warning("guider frame %s unreadable, ignored: %s", frame.location, exc)
            bad.append(frame.location)
    return headers, bad


def guider_conditions(night: NightIndex, start: dt.datetime, exptime: float | None,
                      slack: float = 1.0) -> GuiderConditions:
    """Transparency and illuminated area during one exposure, from the guider frames.

    Parameters
    ----------
    night : NightIndex
        Index of the night (its guider frames are listed on first use).
    start : datetime
        Start of the exposure, UTC (naive values are taken to be UTC), e.g.
        :attr:`panacea.archive.Exposure.time`.
    exptime : float or None
        Exposure time (s); None or negative counts as 0.
    slack : float
        Seconds added on both sides of the window, for rounded time stamps.

    Returns
    -------
    GuiderConditions
        Never raises for missing or unreadable guider data: the defaults are used and
        :attr:`GuiderConditions.notes` says why.
    """
    t0 = _utc(start)
    t1 = t0 + dt.timedelta(seconds=max(float(exptime or 0.0), 0.0))
    span = f"{t0:%Y-%m-%d %H:%M:%S}-{t1:%H:%M:%S} UT"
    notes: list[str] = []
    headers: list[fits.Header] = []
    frames = _frames_in_window(night, t0, t1, slack)
    if not night.guider_files():
        missing = f"no guider frames for night {night.date}"
    elif not frames:
        missing = f"no guider frames during the exposure ({span})"
    else:
        headers, bad = _read_guider_headers(night, frames)
        if bad:
            notes.append(f"{len(bad)} of {len(frames)} guider frames unreadable "
                         f"(first: {bad[0]})")
        missing = "" if headers else f"none of the {len(frames)} guider headers could be read"
    active = [h for h in headers if str(h.get("GUIDLOOP", "")).strip().upper() == GUIDING]
    transparency, t_note = _mean_transparency(active, len(headers), missing)
    area, a_note = _mean_area(active, len(headers), missing)
    notes += [n for n in (t_note, a_note) if n]
    out = GuiderConditions(
        transparency=transparency if t_note is None else 1.0,
        area_cm2=area if a_note is None else instrument.DEFAULT_AREA_CM2,
        n_frames=len(headers),
        transparency_source="guider" if t_note is None else "default",
        area_source="guider" if a_note is None else "default",
        notes=notes,
    )
    for note in notes:
        log.warning("guider %s: %s", span, note)
    log.debug("guider %s: %d frames (%d guiding), transparency %.3f (%s), area %.4g cm2 (%s)",
              span, len(headers), len(active), out.transparency, out.transparency_source,
              out.area_cm2, out.area_source)
    return out


def _mean_transparency(active: list[fits.Header], n_read: int, missing: str = ""
                       ) -> tuple[float, str | None]:
    """Mean trusted TRANSPAR of guided frames, or (nan, note) when there is none.

    ``missing`` says why no header was read at all (empty when some were).
    """
    lo, hi = TRANSPARENCY_RANGE
    values = [header_number(h, "TRANSPAR") for h in active]
    given = [v for v in values if v is not None]
    good = [v for v in given if lo <= v <= hi]
    if good:
        if len(good) < len(given):
            log.debug("%d TRANSPAR values outside %.1f-%.1f ignored", len(given) - len(good),
                      lo, hi)
        return float(np.mean(good)), None
    if missing:
        reason = missing
    elif not active:
        reason = f"no guided (GUIDLOOP={GUIDING}) frame among {n_read}"
    elif not given:
        reason = f"no TRANSPAR card in the {len(active)} guided frames"
    else:
        reason = f"all {len(given)} TRANSPAR values outside {lo}-{hi}"
    return math.nan, f"transparency 1.0 assumed: {reason}"


def _mean_area(active: list[fits.Header], n_read: int, missing: str = ""
               ) -> tuple[float, str | None]:
    """Mean illuminated area of guided frames from X_STRT, Y_STRT, or (nan, note)."""
    xy = [(header_number(h, "X_STRT"), header_number(h, "Y_STRT")) for h in active]
    xy = [(x, y) for x, y in xy if x is not None and y is not None]
    if xy:
        x, y = np.array(xy, float).T
        area = instrument.illuminated_area(x, y)
        area = area[area > 0]
        if area.size:
            return float(np.mean(area)), None
        reason = "tracker positions fall off the primary"
    elif missing:
        reason = missing
    elif not active:
        reason = f"no guided (GUIDLOOP={GUIDING}) frame among {n_read}"
    else:
        reason = f"no X_STRT/Y_STRT tracker cards in the {len(active)} guided frames"
    return math.nan, f"default area {instrument.DEFAULT_AREA_CM2:.4g} cm2 assumed: {reason}"


# --------------------------------------------------------------------------- standards


def standard_filename(name: str) -> str:
    """Reference-spectrum file name of a standard, e.g. ``FEIGE_34`` -> ``mfeige34.dat.txt``."""
    return "m" + "".join(c for c in name.lower() if c.isalnum()) + ".dat.txt"


def standard_file(directory: str | Path, name: str) -> Path | None:
    """The reference spectrum ``m{name}.dat.txt`` of a standard in ``directory``, or None.

    ``name`` is reduced to lower-case letters and digits (``FEIGE_34`` -> ``mfeige34``); a
    file whose name differs only in case is accepted too.
    """
    folder = Path(directory)
    target = standard_filename(name)
    path = folder / target
    if path.is_file():
        return path
    if not folder.is_dir():
        return None
    for candidate in sorted(folder.iterdir()):
        if candidate.name.lower() == target and candidate.is_file():
            return candidate
    return None


def ab_to_flambda(mag: np.ndarray | float, wave: np.ndarray) -> np.ndarray:
    """AB magnitude to F_lambda (erg/s/cm^2/Angstrom) at ``wave`` (Angstrom)."""
    fnu = 10.0 ** (-0.4 * (np.asarray(mag, float) + 48.6))
    return fnu * C_ANGSTROM / np.asarray(wave, float) ** 2


def read_standard(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a reference spectrum: wavelength (Angstrom) and F_lambda (erg/s/cm^2/Angstrom).

    The file holds columns of wavelength and AB magnitude (further columns are ignored;
    ``#`` starts a comment). Rows are sorted by wavelength; repeated wavelengths are dropped.

    Raises
    ------
    PanaceaError
        When the file cannot be read, or holds fewer than two valid rows.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data"
            table = np.loadtxt(path, comments="#", ndmin=2, usecols=(0, 1))
    except (OSError, ValueError, IndexError) as exc:
        raise PanaceaError(f"{path}: cannot read standard-star spectrum ({exc})") from exc
    wave, mag = table[:, 0], table[:, 1]
    ok = np.isfinite(wave) & np.isfinite(mag) & (wave > 0)
    wave, idx = np.unique(wave[ok], return_index=True)
    if wave.size < 2:
        raise PanaceaError(f"{path}: standard-star spectrum holds {wave.size} valid rows "
                           "(need wavelength and AB magnitude columns)")
    return wave, ab_to_flambda(mag[ok][idx], wave)


# --------------------------------------------------------------------------- masks


@dataclass(frozen=True)
class Band:
    """A wavelength interval (air Angstrom) left out of a response fit."""

    name: str
    lo: float
    hi: float
    kind: str  # "stellar" or "telluric"


def _read_table(name: str) -> list[dict[str, str]]:
    from importlib import resources

    text = resources.files("panacea.data").joinpath(name).read_text()
    rows = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    keys = rows[0].split(",")
    return [dict(zip(keys, r.split(","))) for r in rows[1:]]


def stellar_lines(widen: float = 0.0, crowded_scale: float = 1.0) -> list[Band]:
    """Strong stellar lines of flux standards (``data/stellar_lines.csv``) as bands: the
    tabulated half width (times ``crowded_scale`` in the crowded high Balmer series and
    Ca H and K, blueward of :data:`CROWDED_BELOW`), widened by ``widen`` Angstrom on both
    sides."""
    out = []
    for r in _read_table("stellar_lines.csv"):
        w = float(r["wavelength"])
        hw = float(r["half_width"]) * (crowded_scale if w < CROWDED_BELOW else 1.0) + widen
        out.append(Band(r["name"], w - hw, w + hw, "stellar"))
    return out


def telluric_bands() -> list[Band]:
    """Telluric O2 and H2O absorption bands (``data/telluric_bands.csv``)."""
    return [Band(r["name"], float(r["lo"]), float(r["hi"]), "telluric")
            for r in _read_table("telluric_bands.csv")]


def saturating_bands() -> list[Band]:
    """The telluric bands of saturated, unresolved O2 lines (``saturates`` = 1 in
    ``data/telluric_bands.csv``), where a deep transmission is flagged, not corrected."""
    return [Band(r["name"], float(r["lo"]), float(r["hi"]), "telluric")
            for r in _read_table("telluric_bands.csv") if r.get("saturates", "0") == "1"]


def reference_step(ref_wave: np.ndarray) -> float:
    """Typical tabulation step (Angstrom) of a reference spectrum."""
    d = np.diff(np.unique(np.asarray(ref_wave, float)))
    return float(np.median(d)) if d.size else 0.0


# --------------------------------------------------------------------------- response


@dataclass
class ResponseFit:
    """A response derived from a standard star.

    Attributes
    ----------
    wave : ndarray
        The channel grid (Angstrom).
    response : ndarray
        Smooth response (erg per electron) on ``wave``.
    ratio : ndarray
        Raw ratio ``F_ref * area * transparency / rate`` (NaN where not measurable).
    reference : ndarray
        Reference F_lambda convolved to the instrument resolution, on ``wave``.
    used : ndarray of bool
        Pixels that entered the final fit (measurable and not clipped).
    rms : float
        Fractional RMS of ``ratio / response - 1`` over the used pixels.
    n_clipped : int
        Measurable pixels rejected by clipping or by the excluded bands.
    masked : list of Band
        Stellar lines and telluric bands left out of the fit.
    telluric : ndarray
        Telluric transmission measured on the standard (``response / ratio`` inside the
        telluric bands, 1 elsewhere and where not measurable).
    ref_step : float
        Tabulation step (Angstrom) of the reference spectrum.
    sampling : str
        How the reference was read: "point" samples or "binned" means.
    n_bridged : int
        Pixels of ``telluric`` bridged across narrow stellar lines inside telluric bands
        (:func:`bridge_transmission`).
    """

    wave: np.ndarray
    response: np.ndarray
    ratio: np.ndarray
    reference: np.ndarray
    used: np.ndarray
    rms: float
    n_clipped: int
    masked: list[Band] = field(default_factory=list)
    telluric: np.ndarray | None = None
    ref_step: float = 0.0
    sampling: str = "point"
    n_bridged: int = 0


def binned_reference(ref_wave: np.ndarray, ref_flam: np.ndarray):
    """A smooth F_lambda whose means over the reference's bins (edges half way between its
    wavelengths) are the tabulated values: the derivative of a monotone cubic (PCHIP)
    through the cumulative integral at the bin edges. Returns a callable of wavelength."""
    from scipy.interpolate import PchipInterpolator

    rw, rf = np.asarray(ref_wave, float), np.asarray(ref_flam, float)
    mid = 0.5 * (rw[1:] + rw[:-1])
    edges = np.r_[rw[0] - (mid[0] - rw[0]), mid, rw[-1] + (rw[-1] - mid[-1])]
    cum = np.r_[0.0, np.cumsum(rf * np.diff(edges))]
    return PchipInterpolator(edges, cum).derivative()


def convolve_reference(grid: np.ndarray, ref_wave: np.ndarray, ref_flam: np.ndarray,
                       resolution: float, sampling: str = "point") -> np.ndarray:
    """Reference F_lambda seen through the instrument, on ``grid``.

    The reference is resampled onto a uniform grid in ln(wavelength), where a resolving
    power ``R = lambda / FWHM`` is a Gaussian of constant width, and convolved with that
    Gaussian widened by the grid's pixel box (added in quadrature). Grid points within
    three sigma of the ends of the reference (or beyond them) are NaN. ``sampling`` says
    how the table was made: "point" values are interpolated linearly, "binned" (bin means)
    are reconstructed by :func:`binned_reference`, which keeps every bin's mean and so a
    line's depth where linear interpolation of bin means would smear it over two bins.
    """
    grid = np.asarray(grid, float)
    rw, rf = np.asarray(ref_wave, float).ravel(), np.asarray(ref_flam, float).ravel()
    if rw.shape != rf.shape:
        raise ValueError(f"reference wavelength and flux differ in length: {rw.size}, {rf.size}")
    ok = np.isfinite(rw) & np.isfinite(rf) & (rw > 0)
    rw, idx = np.unique(rw[ok], return_index=True)
    rf = rf[ok][idx]
    if rw.size < 2:
        return np.full(grid.shape, np.nan)
    step = float(np.median(np.abs(np.diff(grid)))) if grid.size > 1 else 0.0
    centre = float(np.median(grid))
    sigma_ln = math.sqrt((1.0 / (resolution * FWHM_PER_SIGMA)) ** 2 + (step / centre) ** 2 / 12)
    # sample finely enough for the kernel and for the reference's own structure
    dln = float(np.clip(np.median(np.diff(np.log(rw))), sigma_ln / 50.0, sigma_ln / 6.0))
    half = 5.0 * sigma_ln
    lo = max(math.log(rw[0]), math.log(grid.min()) - half)
    hi = min(math.log(rw[-1]), math.log(grid.max()) + half)
    if hi <= lo:
        return np.full(grid.shape, np.nan)
    ln = np.arange(lo, hi + dln, dln)
    if sampling == "binned" and rw.size > 2:
        fine = binned_reference(rw, rf)(np.exp(ln))
    else:
        fine = np.interp(np.exp(ln), rw, rf)
    smooth = gaussian_filter1d(fine, sigma_ln / dln, mode="nearest")
    out = np.interp(np.log(grid), ln, smooth, left=np.nan, right=np.nan)
    covered = (np.log(grid) >= math.log(rw[0]) + 3 * sigma_ln) & (
        np.log(grid) <= math.log(rw[-1]) - 3 * sigma_ln)
    return np.where(covered, out, np.nan)


def _in_bands(wave: np.ndarray, bands: Sequence[tuple[float, float]], margin: float
              ) -> np.ndarray:
    """Pixels inside the bands that lie at least ``margin`` inside the range of ``wave``.

    A band at the end of the range is left in: excluding it would leave the response there
    to an extrapolation, which is worse than the few clipped pixels of the band.
    """
    out = np.zeros(wave.shape, bool)
    for lo, hi in bands:
        if lo >= wave[0] + margin and hi <= wave[-1] - margin:
            out |= (wave >= lo) & (wave <= hi)
    return out


def spline_knots(x: np.ndarray, good: np.ndarray, spacing: float, min_fraction: float = 0.1,
                 end_spacing: float | None = None, end_zone: float = 0.0) -> np.ndarray:
    """Clamped cubic knot vector on [x[0], x[-1]] with breakpoints about ``spacing`` apart
    (``end_spacing`` apart within ``end_zone`` of both ends, when given).

    Breakpoints are removed where an interval holds fewer than ``min_fraction`` of its
    pixels as ``good`` ones (an excluded band, a masked stretch), merging it with its
    emptier neighbour: every spline piece then rests on data, and a gap at the end of the
    range is bridged by the continuation of the last piece instead of a free one.
    """
    lo, hi = float(x[0]), float(x[-1])
    nint = max(1, int(np.ceil((hi - lo) / spacing)))
    breaks = list(np.linspace(lo, hi, nint + 1))
    if end_spacing is not None and end_zone > 0 and hi - lo > 4 * end_zone:
        inner = [b for b in breaks if lo + end_zone < b < hi - end_zone]
        n_end = max(1, int(np.ceil(end_zone / end_spacing)))
        breaks = sorted(set(np.linspace(lo, lo + end_zone, n_end + 1)) | set(inner)
                        | set(np.linspace(hi - end_zone, hi, n_end + 1)))
        # no breakpoint inside a masked stretch: one cubic piece bridges it, held by the
        # data on both sides, instead of short pieces the data leave free
        # (a short masked stretch with data on both sides keeps its breakpoints: one cubic
        # piece cannot follow a steep end's curvature across it, and clipping then widens
        # the gap: orange's He II 4686 mask beside the blue edge swung the response -4.7 %)
        runs = _runs(~good, x, min_width=end_spacing)
        short = [(a, c) for a, c in _merge_runs(runs, end_spacing) if c - a < 3 * end_spacing]

        def kept(b: float) -> bool:
            in_end = b <= lo + end_zone or b >= hi - end_zone
            return in_end and any(a < b < c for a, c in short)

        breaks = [b for b in breaks if b in (lo, hi) or kept(b)
                  or not any(a < b < c for a, c in runs)]
    per_unit = x.size / (hi - lo)
    bad_runs = _runs(~good, x, min_width=end_spacing) if end_spacing is not None else []
    while len(breaks) > 2:
        counts = np.histogram(x[good], bins=breaks)[0]
        # a bridged masked stretch does not count against its interval
        width = np.diff(breaks) - np.array([
            sum(max(0.0, min(c, b1) - max(a, b0)) for a, c in bad_runs)
            for b0, b1 in itertools.pairwise(breaks)])
        expected = np.maximum(8.0, min_fraction * per_unit * width)
        j = int(np.argmin(counts / expected))
        if counts[j] >= expected[j]:
            break
        if j == 0:
            drop = 1
        elif j == len(counts) - 1:
            drop = len(breaks) - 2
        else:
            drop = j if counts[j - 1] <= counts[j + 1] else j + 1
        del breaks[drop]
    return np.concatenate([[lo] * 3, breaks, [hi] * 3])


def _merge_runs(runs: list[tuple[float, float]], gap: float) -> list[tuple[float, float]]:
    """Runs (first, last) joined where less than ``gap`` separates one from the next."""
    out: list[tuple[float, float]] = []
    for a, c in runs:
        if out and a - out[-1][1] < gap:
            out[-1] = (out[-1][0], c)
        else:
            out.append((a, c))
    return out


def _runs(flag: np.ndarray, x: np.ndarray, min_width: float) -> list[tuple[float, float]]:
    """(first, last) x of every run of True in ``flag`` at least ``min_width`` wide."""
    f = np.r_[False, np.asarray(flag, bool), False]
    d = np.diff(f.astype(int))
    starts, stops = np.flatnonzero(d == 1), np.flatnonzero(d == -1) - 1
    return [(float(x[a]), float(x[b])) for a, b in zip(starts, stops)
            if x[b] - x[a] >= min_width]


def bridge_transmission(grid: np.ndarray, transmission: np.ndarray, holes: np.ndarray,
                        min_level: float = 0.0, side: float = 10.0) -> np.ndarray:
    """``transmission`` bridged across runs of ``holes`` pixels by linear interpolation in
    wavelength (Angstrom, ``grid``) between the pixels on either side.

    A run is bridged only where the median transmission within ``side`` Angstrom on both
    sides of it is at least ``min_level``: beside a shallow stretch of a band, a dip inside
    the run cannot be the atmosphere's, while inside a deep one bridging would drop the
    band's own structure. A run without pixels to measure on one side (at an end of the
    grid, or beside other holes) is left as it is: it would only be extrapolated."""
    out = np.asarray(transmission, float).copy()
    grid = np.asarray(grid, float)
    holes = np.asarray(holes, bool)
    if not holes.any() or holes.all():
        return out
    for lo, hi in _runs(holes, grid, min_width=0.0):
        left = (grid >= lo - side) & (grid < lo) & ~holes
        right = (grid > hi) & (grid <= hi + side) & ~holes
        if not (left.any() and right.any()):
            continue
        levels = [float(np.median(out[m])) for m in (left, right)]
        if min(levels) < min_level:
            continue
        run = (grid >= lo) & (grid <= hi)
        out[run] = np.interp(grid[run], grid[~holes], out[~holes])
    return out


def _robust_sigma(values: np.ndarray) -> float:
    """1.4826 x median absolute deviation."""
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def _clipped_spline(design: SplineDesign, y: np.ndarray, w: np.ndarray, good: np.ndarray,
                    nsigma: float, grow: int, max_iter: int,
                    keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Weighted spline fit with iterative robust clipping (never of the ``keep`` pixels);
    returns (model, used)."""
    used = good.copy()
    model = np.zeros_like(y)
    for _ in range(max_iter):
        model = design.evaluate(design.fit(np.where(used, y, 0.0), np.where(used, w, 0.0)))
        z = (y - model) * np.sqrt(w)
        # residuals within the stated noise are never clipped, even for noise-free data
        scale = max(_robust_sigma(z[used]), 1.0)
        # ... nor those within CLIP_FLOOR of the model: clipping is for sky-line residuals
        # and cosmic rays; a bright standard's few-tenths-of-a-per-cent misfit at a steep end
        # would otherwise be clipped, leave a spline piece without data, and let it swing
        bad = good & (np.abs(z) > nsigma * scale) & (np.abs(y - model) > CLIP_FLOOR)
        if grow > 0:
            bad = binary_dilation(bad, iterations=grow) & good
        if keep is not None:
            bad &= ~keep
        new = good & ~bad
        if np.array_equal(new, used):
            break
        used = new
    return model, used


def derive_response(
    grid: np.ndarray,
    rate: np.ndarray,
    rate_var: np.ndarray,
    ref_wave: np.ndarray,
    ref_flam: np.ndarray,
    resolution: float,
    area_cm2: float,
    transparency: float,
    mask: np.ndarray | None = None,
    *,
    knot_spacing: float = 50.0,
    nsigma: float = 4.0,
    grow: int = 2,
    max_iter: int = 15,
    exclude: Sequence[tuple[float, float]] | None = None,
    mask_lines: bool = True,
    sampling: str = "auto",
) -> ResponseFit:
    """Smooth channel response (erg per electron) from a standard star's spectrum.

    Parameters
    ----------
    grid : ndarray, shape (n,)
        Increasing wavelengths (Angstrom) of the extracted spectrum.
    rate, rate_var : ndarray, shape (n,)
        Total count rate of the star (electrons / s / Angstrom) and its variance.
    ref_wave, ref_flam : ndarray
        Reference spectrum: wavelength (Angstrom), F_lambda (erg/s/cm^2/Angstrom).
    resolution : float
        Resolving power ``lambda / FWHM`` of the line spread.
    area_cm2, transparency : float
        Illuminated area and transparency during the exposure.
    mask : ndarray of bool, optional
        True for pixels to leave out.
    knot_spacing : float
        Spacing (Angstrom) of the spline breakpoints.
    nsigma, grow, max_iter : float, int, int
        Clipping threshold in sigmas of the normalised residuals (the robust scale of the
        residuals over their stated errors, at least 1), pixels rejected either side of a
        clipped one, and most clipping iterations.
    exclude : sequence of (lo, hi), optional
        Further wavelength bands left out of the fit.
    mask_lines : bool
        Leave out the stellar lines (:func:`stellar_lines`, widened by the reference's
        tabulation step) and the telluric bands (:func:`telluric_bands`). Bands are left
        out where they lie at least 10 Angstrom inside the grid (telluric ones:
        ``knot_spacing``); nearer the ends, clipping has to do.
    sampling : {"auto", "point", "binned"}
        How the reference was tabulated (:func:`convolve_reference`). "auto": for tables
        coarser than 3 Angstrom, the one of the two whose stellar lines (masked in the fit;
        telluric absorption there weighs on both alike) follow the smooth response best;
        it decides the measured telluric transmission.

    Returns
    -------
    ResponseFit

    Raises
    ------
    PanaceaError
        When too few pixels are measurable to fit the response.
    ValueError
        For inconsistent inputs (shapes, non-positive area, transparency or resolution).
    """
    grid, rate, rate_var = (np.asarray(a, float) for a in (grid, rate, rate_var))
    if not (grid.ndim == 1 and rate.shape == grid.shape and rate_var.shape == grid.shape):
        raise ValueError(f"grid, rate and rate_var must be 1-D of one length; got "
                         f"{grid.shape}, {rate.shape}, {rate_var.shape}")
    if grid.size < 8 or np.any(np.diff(grid) <= 0):
        raise ValueError("grid must increase strictly and hold at least 8 points")
    if not (area_cm2 > 0 and transparency > 0 and resolution > 0):
        raise ValueError(f"area ({area_cm2}), transparency ({transparency}) and resolution "
                         f"({resolution}) must be positive")
    step = reference_step(ref_wave)
    chosen = "point" if sampling == "auto" else sampling

    def ratio_of(how: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        reference = convolve_reference(grid, ref_wave, ref_flam, resolution, how)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = reference * area_cm2 * transparency / rate
            ok = (np.isfinite(ratio) & (ratio > 0) & np.isfinite(rate_var)
                  & (rate_var > 0) & (rate > 0))
        if mask is not None:
            ok &= ~np.asarray(mask, bool)
        return reference, np.where(ok, ratio, np.nan), ok

    reference, ratio, measurable = ratio_of(chosen)
    masked: list[Band] = []
    if mask_lines:
        # in the crowded high Balmer series the full widths would join into one gap of
        # 300 A beside the channel's steep blue edge: there only the cores, which the line
        # spread and the table's sampling shape differently, are left out
        masked += [b for b in stellar_lines(widen=step, crowded_scale=0.5)
                   if _in_bands(grid, [(b.lo, b.hi)], 10.0).any()]
        for b in telluric_bands():
            if _in_bands(grid, [(b.lo, b.hi)], 10.0).any():
                masked.append(b)
            elif b.hi > grid[0] and b.lo < grid[-1]:
                # across an end: no data beyond it to bridge from, so the response takes
                # the band's envelope in and the transmission below keeps its lines
                masked.append(Band(b.name, b.lo, b.hi, "telluric-end"))
    bands = [(b.lo, b.hi) for b in masked if b.kind != "telluric-end"] + list(exclude or [])
    good = measurable & ~_in_bands(grid, bands, 10.0)
    design = SplineDesign(grid, spline_knots(grid, good, knot_spacing, end_spacing=END_SPACING,
                                             end_zone=END_ZONE))
    if good.sum() < max(2 * design.nbasis, 20):
        raise PanaceaError(f"response: only {int(good.sum())} of {grid.size} pixels usable "
                           f"between {grid[0]:.0f} and {grid[-1]:.0f} A (reference coverage, "
                           f"positive rate and variance)")
    y = np.log(np.where(good, ratio, 1.0))
    w = np.where(good, rate**2 / np.where(good, rate_var, 1.0), 0.0)
    keep = np.zeros(grid.size, bool)
    for b in masked:
        if b.kind == "telluric-end":  # its envelope is the response's to follow
            keep |= (grid >= b.lo) & (grid <= b.hi)
    model, used = _clipped_spline(design, y, w, good, nsigma, grow, max_iter, keep)
    response = np.exp(model)
    resid = ratio[used] / response[used] - 1.0
    rms = float(np.sqrt(np.mean(resid**2))) if resid.size else math.nan
    n_clipped = int(measurable.sum() - used.sum())
    if sampling == "auto" and step > 3.0 and mask_lines:
        # judged over the lines' full widths (wings included)
        lines = measurable & _in_bands(grid, [(b.lo, b.hi) for b in stellar_lines(widen=step)],
                                       0.0)
        if lines.sum() > 20:
            alt = ratio_of("binned")
            keep = lines & alt[2]

            def spread(r):
                return float(np.sqrt(np.mean(np.log(r[keep] / response[keep]) ** 2)))

            if spread(alt[1]) < spread(ratio):
                chosen = "binned"
                reference, ratio, measurable = alt
            log.info("reference sampling: %s (line residual rms point %.2f%%, binned %.2f%%)",
                     chosen, 100 * spread(ratio_of("point")[1]), 100 * spread(alt[1]))
    tell = np.ones(grid.size)
    in_tell = np.zeros(grid.size, bool)
    for b in masked:
        if b.kind.startswith("telluric"):
            in_tell |= (grid >= b.lo) & (grid <= b.hi)
    sel = in_tell & measurable
    tell[sel] = np.clip(response[sel] / ratio[sel], 0.0, 1.5)
    # a stellar line inside a telluric band: response / ratio there is the star's line (which
    # a coarse reference does not hold) as much as the atmosphere's, and dividing it out of
    # the science would print the standard's line on every target (Na D in H2O 5900: -12 %);
    # the transmission is bridged across the line's window from the band on both sides
    # over its core (centre +- (FWHM of the line spread + the reference's step)), for the
    # lines narrow for the table (tabulated half width at most twice its step): a broad
    # Balmer or Paschen line is held by the table and the band's own structure is kept
    cores = [(c - c / resolution - step, c + c / resolution + step)
             for b in masked if b.kind == "stellar"
             and 0.5 * (b.hi - b.lo) - step <= NARROW_STEPS * step
             for c in [0.5 * (b.lo + b.hi)]]
    measured = tell
    tell = bridge_transmission(grid, tell, in_tell & _in_bands(grid, cores, 0.0),
                               min_level=BRIDGE_ABOVE)
    n_bridged = int(np.sum(tell != measured))
    sat = sel & _in_bands(grid, [(b.lo, b.hi) for b in saturating_bands()], 0.0)
    tell[sat & (tell < SATURATED_BELOW)] = 0.0  # flagged: not corrected in the science
    log.info("response %.0f-%.0f A: %d pixels fitted, %d clipped (%d stellar lines and %d "
             "telluric bands masked, reference step %.1f A), rms %.2f%%", grid[0], grid[-1],
             int(used.sum()), n_clipped, sum(b.kind == "stellar" for b in masked),
             sum(b.kind == "telluric" for b in masked), step, 100 * rms)
    return ResponseFit(grid, response, ratio, reference, used, rms, n_clipped, masked, tell,
                       step, chosen, n_bridged)


# --------------------------------------------------------------------------- files


def response_cards(fit: ResponseFit) -> dict:
    """Header cards saying what the response fit left out: MSKSTEL, MSKTELL (numbers of
    stellar lines and telluric bands), MSKFRAC (fraction of the pixels), TELLSAT and TELLBRG
    (transmission pixels flagged saturated, bridged over stellar lines), REFSTEP and one
    MASKnn card per band ("name lo-hi", kind in the comment)."""
    cards: dict = {
        "MSKSTEL": (sum(b.kind == "stellar" for b in fit.masked), "stellar lines masked"),
        "MSKTELL": (sum(b.kind == "telluric" for b in fit.masked), "telluric bands masked"),
        "TELLEND": (sum(b.kind == "telluric-end" for b in fit.masked),
                    "telluric bands across an end, in the response"),
        "MSKFRAC": (round(float(np.mean(~fit.used)), 4), "fraction of pixels not fitted"),
        "REFSTEP": (round(fit.ref_step, 2), "reference tabulation step (A)"),
        "REFSAMP": (fit.sampling, "reference read as point samples or bin means"),
        "RESPRMS": (round(fit.rms, 5), "fractional rms of the fit"),
    }
    if fit.telluric is not None:
        cards["TELLSAT"] = (int(np.sum(fit.telluric < MIN_TELLURIC)),
                            "telluric pixels flagged saturated (uncorrected)")
        cards["TELLBRG"] = (fit.n_bridged, "telluric pixels bridged over stellar lines")
    for i, b in enumerate(fit.masked[:99]):
        what = "in the response" if b.kind == "telluric-end" else "masked"
        cards[f"MASK{i + 1:02d}"] = (f"{b.name} {b.lo:.0f}-{b.hi:.0f}", f"{what} ({b.kind})")
    return cards


def write_response(path: str | Path, wave: np.ndarray, response: np.ndarray,
                   header: dict | None = None, telluric: np.ndarray | None = None) -> Path:
    """Write a response as a 2 x N float64 image ``[wavelength, response]`` (atomic).

    ``header`` adds cards (key -> value or (value, comment)), e.g. the channel and the
    standard it came from (and :func:`response_cards`). ``telluric`` (N values) is written
    as an image extension TELLURIC: the transmission measured on the standard (0 where
    flagged saturated, :data:`SATURATED_BELOW`).
    """
    wave, response = np.asarray(wave, float), np.asarray(response, float)
    if wave.ndim != 1 or wave.shape != response.shape:
        raise ValueError(f"wave and response must be 1-D of one length; got {wave.shape}, "
                         f"{response.shape}")
    hdu = fits.PrimaryHDU(np.stack([wave, response]).astype(np.float64))
    h = hdu.header
    h["BUNIT"] = (RESPONSE_UNIT, "row 1; row 0 is wavelength")
    h["ROW0"] = ("wavelength", "air Angstrom")
    h["ROW1"] = ("response", "erg/e-: F_lambda = e-/s/A/cm2 x response")
    for key, value in (header or {}).items():
        h[key] = value
    hdus = [hdu]
    if telluric is not None:
        t = fits.ImageHDU(np.asarray(telluric, np.float32), name="TELLURIC")
        t.header["BUNIT"] = ("", "transmission at AIRMASS on the primary's wavelengths")
        hdus.append(t)
    return write_fits_atomic(fits.HDUList(hdus), path)


def read_response(path: str | Path, grid: np.ndarray | None = None) -> np.ndarray:
    """Read a response file; return the response, interpolated onto ``grid`` if given.

    Without ``grid`` the stored 2 x N array ``[wavelength, response]`` is returned.

    Raises
    ------
    PanaceaError
        When the file cannot be read, is not a 2 x N image of increasing wavelengths and
        positive finite responses, or does not cover ``grid``.
    """
    path = Path(path)
    try:
        with fits.open(path, memmap=False) as hdul:
            data = hdul[0].data
            data = None if data is None else np.array(data, dtype=float)
    except (OSError, ValueError, IndexError) as exc:
        raise PanaceaError(f"{path}: cannot read response file ({exc})") from exc
    if data is None or data.ndim != 2 or data.shape[0] != 2 or data.shape[1] < 2:
        shape = None if data is None else data.shape
        raise PanaceaError(f"{path}: a response file holds a 2 x N image [wavelength, "
                           f"response]; found shape {shape}")
    wave, resp = data
    if not (np.all(np.isfinite(data)) and np.all(np.diff(wave) > 0) and np.all(resp > 0)):
        raise PanaceaError(f"{path}: response file needs increasing wavelengths and positive, "
                           "finite responses")
    if grid is None:
        return data
    grid = np.asarray(grid, float)
    tol = float(np.median(np.diff(wave)))
    if grid.min() < wave[0] - tol or grid.max() > wave[-1] + tol:
        raise PanaceaError(f"{path}: response covers {wave[0]:.1f}-{wave[-1]:.1f} A, not the "
                           f"grid's {grid.min():.1f}-{grid.max():.1f} A")
    return np.interp(grid, wave, resp)


def response_filename(channel_name: str) -> str:
    """File name of a channel's response, e.g. ``response_uv.fits``."""
    return f"response_{channel_name}.fits"


def response_from_dir(directory: str | Path, channel_name: str, grid: np.ndarray
                      ) -> np.ndarray | None:
    """Response of a channel on ``grid`` from ``directory/response_{channel}.fits``.

    Returns None when the file does not exist; raises :class:`PanaceaError` when it is
    malformed.
    """
    path = Path(directory) / response_filename(channel_name)
    if not path.is_file():
        return None
    return read_response(path, grid)


# --------------------------------------------------------------------------- calibration


def flux_calibrate(rate: np.ndarray, rate_err: np.ndarray, response: np.ndarray,
                   area_cm2: float, transparency: float) -> tuple[np.ndarray, np.ndarray]:
    """F_lambda (erg/s/cm^2/Angstrom) and its error from a count rate (e-/s/Angstrom).

    ``F = rate / (area * transparency) * response``; the arrays broadcast (e.g. 280 x N
    spectra with an N-point response). An error of 0 (a bad pixel) stays 0.
    """
    if not (area_cm2 > 0 and transparency > 0):
        raise ValueError(f"area ({area_cm2}) and transparency ({transparency}) must be "
                         "positive")
    scale = np.asarray(response, float) / (area_cm2 * transparency)
    return np.asarray(rate, float) * scale, np.asarray(rate_err, float) * scale


def telluric_correction(telluric: np.ndarray, airmass_standard: float,
                        airmass_science: float) -> np.ndarray:
    """Divisor of science spectra for the telluric absorption measured on a standard.

    The standard's transmission ``telluric`` scaled to the science airmass as
    ``T ** (X_science / X_standard)``; where the standard's transmission is below
    :data:`MIN_TELLURIC` (saturated bands) the divisor is 1 (not corrected).
    """
    t = np.asarray(telluric, float)
    x = float(airmass_science) / float(airmass_standard) if airmass_standard > 0 else 1.0
    return np.where(t >= MIN_TELLURIC, np.clip(t, MIN_TELLURIC, 1.5) ** x, 1.0)


def default_response(channel_name: str, grid: np.ndarray) -> np.ndarray | None:
    """The response bundled with the package for a channel (None when absent).

    The bundled files are made by ``scripts/default_responses.py`` from a reduced night's
    standard star; they are a fallback for nights without a standard.
    """
    from importlib import resources

    ref = resources.files("panacea.data").joinpath(response_filename(channel_name))
    if not ref.is_file():
        return None
    with resources.as_file(ref) as path:
        return read_response(path, grid)
