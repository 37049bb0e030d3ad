"""Reading raw amplifier frames: overscan, trimming, gain, variance, mask and orientation.

A raw LRS2 amplifier file is a uint16 image (BZERO 32768) of ``AMP_ROWS`` rows by
``AMP_DATA_COLS + AMP_OVERSCAN_COLS`` columns, possibly binned; the overscan columns follow
the data unless the header's TRIMSEC/BIASSEC say otherwise. :func:`read_amp` turns one into
a :class:`Frame` in electrons with its variance and a bit mask, oriented so that wavelength
increases to the right; :func:`read_channel` stitches the two amps of a channel.
"""

from __future__ import annotations

import enum
import io
import logging
import re
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from astropy.io import fits
from astropy.stats import SigmaClippedStats
from scipy.ndimage import median_filter
from scipy.signal import savgol_filter

from panacea import instrument
from panacea.errors import FrameError, PanaceaError
from panacea.io_utils import card_text, header_number, header_value

log = logging.getLogger(__name__)

#: Overscan columns (unbinned) skipped next to the data before measuring the level.
OVERSCAN_SKIP = 4
#: Rows in the running median, then in the running line fit, of the per-row overscan level.
OVERSCAN_MEDIAN = 7
OVERSCAN_SMOOTH = 31
#: Binning factors accepted along each axis.
BINNINGS = (1, 2)
#: Header AMPNAME values of LRS2 amplifiers (LR and UL mark reversed columns).
KNOWN_AMPNAMES = ("LL", "LU", "RU", "RL", "LR", "UL")
#: Smallest fraction of finite raw pixels for a frame to be used.
MIN_FINITE_FRACTION = 0.5

_SECTION_RE = re.compile(r"^\s*\[(\d+):(\d+),(\d+):(\d+)\]\s*$")


class Mask(enum.IntFlag):
    """Bit flags of :attr:`Frame.mask`."""

    SATURATED = 1
    BAD_COLUMN = 2
    COSMIC = 4
    NO_DATA = 8


@dataclass
class Frame:
    """A detector frame in electrons.

    Attributes
    ----------
    image : ndarray of float32
        Signal (e-).
    variance : ndarray of float32
        Variance of ``image`` (e-^2).
    mask : ndarray of uint8
        :class:`Mask` bit flags, 0 for good pixels.
    header : astropy.io.fits.Header
        Raw primary header (of the first amp for a channel frame).
    source : str
        Where the data came from (file or tarball member, exposure and channel).
    """

    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    header: fits.Header
    source: str = ""

    def __post_init__(self) -> None:
        self.image = np.asarray(self.image, dtype=np.float32)
        self.variance = np.asarray(self.variance, dtype=np.float32)
        self.mask = np.asarray(self.mask, dtype=np.uint8)
        if not self.image.shape == self.variance.shape == self.mask.shape:
            raise ValueError(f"{self.source}: image, variance and mask shapes differ: "
                             f"{self.image.shape}, {self.variance.shape}, {self.mask.shape}")

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the image (rows, columns)."""
        return self.image.shape


class RawReader(Protocol):
    """Anything that returns the bytes of a raw file (e.g. :class:`panacea.archive.NightIndex`)."""

    def read_bytes(self, rawfile) -> bytes: ...


# --------------------------------------------------------------------------- geometry


def amp_binning(shape: tuple[int, ...], where: str = "") -> tuple[int, int]:
    """Binning (rows, columns) implied by a raw amp's shape.

    Raises
    ------
    FrameError
        When the shape is not a binning in :data:`BINNINGS` of the raw amp geometry.
    """
    full = instrument.AMP_DATA_COLS + instrument.AMP_OVERSCAN_COLS
    nrows, ncols = shape
    ybin = instrument.AMP_ROWS // nrows if nrows and instrument.AMP_ROWS % nrows == 0 else 0
    xbin = full // ncols if ncols and full % ncols == 0 else 0
    if ybin not in BINNINGS or xbin not in BINNINGS:
        raise FrameError(f"{where}: unexpected amp shape {nrows}x{ncols}; expected "
                         f"{instrument.AMP_ROWS}x{full} or a 2x binning of it")
    return ybin, xbin


def _parse_section(text) -> tuple[slice, slice] | None:
    """FITS section ``[x1:x2,y1:y2]`` (1-based, inclusive) as (row, column) slices."""
    m = _SECTION_RE.match(str(text)) if text is not None else None
    if m is None:
        return None
    x1, x2, y1, y2 = map(int, m.groups())
    if x1 < 1 or y1 < 1 or x2 < x1 or y2 < y1:
        return None
    return slice(y1 - 1, y2), slice(x1 - 1, x2)


def amp_sections(header: fits.Header, shape: tuple[int, int], where: str = ""
                 ) -> tuple[slice, slice]:
    """Data columns and overscan columns of a raw amp (all rows are data).

    TRIMSEC/BIASSEC are used when both are present and consistent with the shape (data
    section spanning all rows and ``AMP_DATA_COLS / xbin`` columns, overscan outside it);
    otherwise the overscan is the last ``AMP_OVERSCAN_COLS / xbin`` columns.

    Returns
    -------
    data, overscan : slice
        Column slices.
    """
    _, xbin = amp_binning(shape, where)
    nrows, ncols = shape
    ndata = instrument.AMP_DATA_COLS // xbin
    rule = slice(0, ndata), slice(ndata, ncols)
    texts = header.get("TRIMSEC"), header.get("BIASSEC")
    if texts == (None, None):
        return rule
    trim, bias = (_parse_section(t) for t in texts)
    if trim and bias:
        (trows, tcols), (_, bcols) = trim, bias
        inside = tcols.stop <= ncols and bcols.stop <= ncols
        disjoint = bcols.start >= tcols.stop or bcols.stop <= tcols.start
        if (inside and disjoint and (trows.start, trows.stop) == (0, nrows)
                and tcols.stop - tcols.start == ndata and bcols.stop - bcols.start > 4):
            return tcols, bcols
    log.warning("%s: TRIMSEC=%r BIASSEC=%r do not fit a %dx%d amp; using the last %d columns "
                "as overscan", where, texts[0], texts[1], nrows, ncols, ncols - ndata)
    return rule


def overscan_level(overscan: np.ndarray, mode: str = "row", smooth: int = OVERSCAN_SMOOTH
                   ) -> np.ndarray:
    """Overscan level of every row (ADU).

    Parameters
    ----------
    overscan : ndarray, shape (nrows, ncols)
        Overscan pixels (ADU) with the columns next to the data already removed.
    mode : {'row', 'frame'}
        ``row``: 3-sigma-clipped mean of each row, then a running median of
        :data:`OVERSCAN_MEDIAN` rows (rejects odd rows) and a running straight-line fit over
        ``smooth`` rows (averages the noise down, unbiased by gradients, also at the ends);
        ``frame``: one clipped mean for the whole overscan.
    smooth : int
        Rows in the running line fit (``row`` mode).

    Returns
    -------
    ndarray, shape (nrows,)
        Level to subtract from each row (ADU).
    """
    # the clipped mean alone (astropy's sigma_clipped_stats also computes a median and a
    # standard deviation that are not used)
    if mode == "frame":
        mean = SigmaClippedStats(overscan, sigma=3.0, maxiters=5).mean()
        return np.full(overscan.shape[0], mean)
    if mode != "row":
        raise ValueError(f"overscan mode must be 'row' or 'frame', not {mode!r}")
    mean = SigmaClippedStats(overscan, sigma=3.0, maxiters=5, axis=1).mean()
    level = median_filter(np.asarray(mean, dtype=np.float64), size=OVERSCAN_MEDIAN,
                          mode="nearest")
    window = min(smooth, len(level) - (1 - len(level) % 2))  # odd, at most nrows
    return savgol_filter(level, window, 1, mode="interp") if window > 2 else level


def detector_value(header: fits.Header, key: str, default: float, where: str = "") -> float:
    """Positive header value ``key`` (GAIN in e-/ADU, RDNOISE in e-), else ``default``.

    A missing, non-numeric or non-positive value is replaced by ``default`` with a warning.
    """
    number = header_number(header, key)
    if number is None or number <= 0:
        log.warning("%s: header %s=%s missing or not positive; using default %g",
                    where, key, card_text(header, key), default)
        return default
    return number


# --------------------------------------------------------------------------- reading


def _load(reader: RawReader, rawfile) -> tuple[np.ndarray, fits.Header]:
    """Raw image (ADU, float32, BZERO applied) and primary header of one amp file."""
    where = rawfile.location
    try:
        content = reader.read_bytes(rawfile)
    except PanaceaError as exc:
        raise FrameError(str(exc)) from exc
    try:
        with fits.open(io.BytesIO(content), memmap=False) as hdul:
            header = hdul[0].header  # parsed in memory: stays valid once the file is closed
            raw_bitpix = header.get("BITPIX")
            if header.get("BSCALE", 1) != 1 or header.get("BZERO", 0) not in (0, 32768):
                # astropy rewrites a scaled image's BITPIX/BSCALE/BZERO as it reads the data
                header = header.copy()
            data = hdul[0].data
            data = None if data is None else np.array(data, dtype=np.float32)
    except (OSError, ValueError, TypeError, IndexError, fits.VerifyError) as exc:
        raise FrameError(f"{where}: unreadable FITS file ({exc})") from exc
    if data is None:
        raise FrameError(f"{where}: the primary HDU holds no data")
    if data.ndim != 2:
        raise FrameError(f"{where}: expected a 2-D image, got shape {data.shape}")
    if raw_bitpix != 16:
        log.warning("%s: BITPIX %s, not the 16-bit unsigned integers of raw LRS2 frames; "
                    "read as given", where, raw_bitpix)
    if data.size and raw_bitpix in (8, 16, 32, 64):
        # integers are finite unless scaled with BLANK pixels (NaN): the extremes tell
        lo, hi = data.min(), data.max()
        if np.isfinite(lo) and np.isfinite(hi):
            if lo == hi:
                raise FrameError(f"{where}: the image is constant ({hi:g} ADU everywhere)")
            return data, header
    finite = np.isfinite(data)
    if data.size == 0 or not finite.any():
        raise FrameError(f"{where}: no finite pixel (the image is all NaN or infinite)")
    if finite.mean() < MIN_FINITE_FRACTION:
        raise FrameError(f"{where}: only {100 * finite.mean():.1f}% of the pixels are finite "
                         f"(at least {100 * MIN_FINITE_FRACTION:.0f}% needed)")
    if np.nanmin(data) == np.nanmax(data):
        raise FrameError(f"{where}: the image is constant ({np.nanmax(data):g} ADU everywhere)")
    return data, header


def subtract_overscan(raw: np.ndarray, header: fits.Header, mode: str = "row", where: str = ""
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Trim a raw amp and subtract its overscan level.

    Parameters
    ----------
    raw : ndarray
        Raw amp image (ADU) including the overscan columns.
    header : astropy.io.fits.Header
        Its header (TRIMSEC, BIASSEC).
    mode : {'row', 'frame'}
        See :func:`overscan_level`.

    Returns
    -------
    data, adu : ndarray
        Trimmed raw data (ADU) and trimmed data minus the overscan level (ADU).
    """
    data_cols, bias_cols = amp_sections(header, raw.shape, where)
    skip = OVERSCAN_SKIP // amp_binning(raw.shape, where)[1]
    bias = raw[:, bias_cols]
    level = overscan_level(bias[:, skip:] if bias.shape[1] > skip else bias, mode)
    if not np.all(np.isfinite(level)):
        raise FrameError(f"{where}: the overscan has no valid pixels")
    data = raw[:, data_cols]
    return data, data - level[:, None].astype(np.float32)


def _electrons(adu: np.ndarray, header: fits.Header, where: str, finite: bool = False
               ) -> tuple[np.ndarray, np.ndarray]:
    """Image (e-) and variance (e-^2) from overscan-subtracted ADU; non-finite pixels -> 0.

    ``adu`` (float32) is overwritten by the image when ``finite`` says that all its pixels
    are finite (no pass to find the others).
    """
    gain = detector_value(header, "GAIN", instrument.DEFAULT_GAIN, where)
    rdnoise = detector_value(header, "RDNOISE", instrument.DEFAULT_RDNOISE, where)
    if finite:
        image = np.multiply(adu, gain, out=adu)
    else:
        image = np.where(np.isfinite(adu), gain * adu, 0.0)
    variance = np.maximum(image, 0.0)
    variance += rdnoise**2
    return image, variance


def _check_amp(header: fits.Header, amp: str, where: str) -> None:
    """Warn when CCDPOS + CCDHALF disagree with the amp code of the file name, or AMPNAME
    is none of the amplifier names."""
    ampname = header_value(header, "AMPNAME")
    if ampname is not None and str(ampname).strip().upper() not in KNOWN_AMPNAMES:
        log.warning("%s: unknown header AMPNAME %s (expected one of %s); columns not "
                    "reversed", where, card_text(header, "AMPNAME"), ", ".join(KNOWN_AMPNAMES))
    code = f"{header.get('CCDPOS', '')}{header.get('CCDHALF', '')}".replace(" ", "").upper()
    if code and code != amp:
        log.warning("%s: header CCDPOS+CCDHALF=%s differs from the file name's amp %s; "
                    "orienting as %s", where, code, amp, amp)


def _ampname(header: fits.Header) -> str | None:
    value = header_value(header, "AMPNAME")
    return None if value is None else str(value)


def _bad_pixel_bits(bad_pixel_mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Mask bits from a bad-pixel mask: boolean -> BAD_COLUMN, integer -> bits as given."""
    bpm = np.asarray(bad_pixel_mask)
    if bpm.shape != shape:
        raise ValueError(f"bad-pixel mask shape {bpm.shape} does not match the frame {shape}")
    if bpm.dtype == bool:
        return np.where(bpm, np.uint8(Mask.BAD_COLUMN), np.uint8(0))
    return bpm.astype(np.uint8)


def read_amp(reader: RawReader, rawfile, overscan: str = "row",
             bad_pixel_mask: np.ndarray | None = None) -> Frame:
    """Read one raw amplifier: overscan-subtracted, trimmed, in electrons, oriented.

    Parameters
    ----------
    reader : NightIndex or RawReader
        Supplies the file's bytes (``read_bytes(rawfile)``).
    rawfile : RawFile
        The amplifier file; its ``amp`` code sets the orientation together with the header
        AMPNAME (see :func:`panacea.instrument.orient`).
    overscan : {'row', 'frame'}
        Per-row smoothed overscan level, or one level for the whole frame.
    bad_pixel_mask : ndarray, optional
        In the oriented, trimmed amp geometry: boolean (True flags ``BAD_COLUMN``) or
        integer :class:`Mask` bits, OR-ed into the mask.

    Returns
    -------
    Frame
        ``image`` = GAIN x (ADU - overscan) in e-; ``variance`` = RDNOISE^2 + max(image, 0)
        in e-^2; ``mask`` flags SATURATED where the raw value reached the 16-bit limit and
        NO_DATA where the raw value is not finite.

    Raises
    ------
    FrameError
        Unreadable file, no data, not 2-D, unexpected shape or a constant image.
    """
    planes, header = _amp_planes(reader, rawfile, overscan)
    frame = Frame(*(np.ascontiguousarray(a) for a in planes), header, rawfile.location)
    if bad_pixel_mask is not None:
        frame.mask |= _bad_pixel_bits(bad_pixel_mask, frame.shape)
    return frame


def _amp_planes(reader: RawReader, rawfile, overscan: str, image_only: bool = False
                ) -> tuple[tuple[np.ndarray, ...], fits.Header]:
    """Oriented image (e-, float32), variance (e-^2, float32) and mask (uint8) of one amp
    (views, possibly not contiguous: the caller copies them once), and its header; with
    ``image_only`` the image alone."""
    where = rawfile.location
    try:
        raw, header = _load(reader, rawfile)
        data, adu = subtract_overscan(raw, header, overscan, where)
    except FrameError as err:
        err.file = err.file or where
        raise
    finite = np.isfinite(data) if raw.dtype.kind == "f" else None
    allfinite = finite is None or bool(finite.all())
    if image_only:
        gain = detector_value(header, "GAIN", instrument.DEFAULT_GAIN, where)
        image = (np.multiply(adu, gain, out=adu) if allfinite
                 else np.where(finite, gain * adu, np.float32(0.0)))
        _check_amp(header, rawfile.amp, where)
        return (instrument.orient(image, rawfile.amp, _ampname(header)),), header
    image, variance = _electrons(adu, header, where, finite=allfinite)
    mask = np.where(data >= instrument.SATURATION_ADU, np.uint8(Mask.SATURATED), np.uint8(0))
    if not allfinite:
        mask[~finite] |= np.uint8(Mask.NO_DATA)
    _check_amp(header, rawfile.amp, where)
    ampname = _ampname(header)
    return tuple(instrument.orient(a, rawfile.amp, ampname) for a in (image, variance, mask)), \
        header


def _channel_amps(reader: RawReader, exposure, ch: instrument.Channel, overscan: str,
                  image_only: bool = False) -> list[tuple[tuple[np.ndarray, ...], fits.Header]]:
    """The oriented planes and header of each amp of the channel (see :func:`_amp_planes`)."""
    amps = []
    for amp in ch.amps:
        rawfile = exposure.files.get((ch.ifuslot, amp))
        if rawfile is None:
            others = sorted({f.source.name for f in exposure.files.values()})
            where = f" (not in {', '.join(others)})" if others else ""
            raise FrameError(f"{exposure.name}: amplifier {ch.ifuslot}{amp} of channel "
                             f"{ch.name} is missing{where}")
        amps.append(_amp_planes(reader, rawfile, overscan, image_only))
    return amps


def read_channel_image(reader: RawReader, exposure, channel: str | instrument.Channel,
                       overscan: str = "row", out: np.ndarray | None = None) -> np.ndarray:
    """The stitched image (e-, float32) of one channel of an exposure, without the variance
    and mask of :func:`read_channel` (e.g. for biases, whose variance is measured).

    Parameters
    ----------
    reader, exposure, channel, overscan
        As for :func:`read_channel`.
    out : ndarray of float32, optional
        Where to write the image (e.g. a plane of a stack), when its shape fits.

    Returns
    -------
    ndarray of float32
        Exactly the ``image`` of :func:`read_channel` (``out`` when given and fitting).

    Raises
    ------
    FrameError
        When an amp of the channel is missing or unreadable, or the amps cannot be stitched.
    """
    ch = channel if isinstance(channel, instrument.Channel) else instrument.get_channel(channel)
    ((first,), _), ((second,), _) = _channel_amps(reader, exposure, ch, overscan, True)
    if first.shape != second.shape:
        raise FrameError(f"{exposure.name} {ch.name}: cannot stitch (amp shapes differ: "
                         f"{first.shape} vs {second.shape})")
    shape = (first.shape[0] + second.shape[0], first.shape[1])
    if out is None or out.shape != shape or out.dtype != np.float32:
        out = np.empty(shape, np.float32)
    out[:first.shape[0]] = first
    out[first.shape[0]:] = second
    return out


def read_channel(reader: RawReader, exposure, channel: str | instrument.Channel,
                 overscan: str = "row", bad_pixel_mask: np.ndarray | None = None) -> Frame:
    """Read and stitch the two amplifiers of one channel of an exposure.

    Parameters
    ----------
    reader : NightIndex or RawReader
        Supplies the files' bytes.
    exposure : Exposure
        The exposure (its ``files`` keyed by (ifuslot, amp)).
    channel : str or Channel
        ``uv``, ``orange``, ``red`` or ``farred``.
    overscan : {'row', 'frame'}
        Passed to :func:`read_amp`.
    bad_pixel_mask : ndarray, optional
        In the stitched channel geometry (boolean or :class:`Mask` bits).

    Returns
    -------
    Frame
        First amp in rows ``0..ny-1``, second amp below it (e-, e-^2); header of the first
        amp.

    Raises
    ------
    FrameError
        When an amp of the channel is missing or unreadable.
    """
    ch = channel if isinstance(channel, instrument.Channel) else instrument.get_channel(channel)
    (first, header), (second, _) = _channel_amps(reader, exposure, ch, overscan)
    try:
        # the stitch is the one copy of each oriented plane
        planes = [instrument.stitch(a, b) for a, b in zip(first, second)]
    except ValueError as exc:
        raise FrameError(f"{exposure.name} {ch.name}: cannot stitch ({exc})") from exc
    frame = Frame(*planes, header=header, source=f"{exposure.name} {ch.name}")
    if bad_pixel_mask is not None:
        frame.mask |= _bad_pixel_bits(bad_pixel_mask, frame.shape)
    return frame
