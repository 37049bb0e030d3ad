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
from numba import njit
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


#: FITS blocks are this many bytes; header cards this many characters.
_BLOCK = 2880
_CARD = 80


def _raw_uint16(content: bytes, where: str) -> tuple[np.ndarray, fits.Header] | None:
    """The raw image as uint16 and the primary header, for the usual raw LRS2 file: a 2-D
    16-bit image with BZERO 32768, BSCALE 1 and no BLANK, all data present. None for
    anything else (read by astropy in :func:`_load`, with its checks and messages).

    The values are exactly astropy's (stored int16 + 32768); the data are decoded from the
    file's bytes in one pass instead of astropy's read, unsigned conversion and float copy.
    """
    end = -1
    for pos in range(0, min(len(content), 40 * _BLOCK), _CARD):
        if content[pos:pos + 8] == b"END     ":
            end = pos + _CARD
            break
    if end < 0 or content[:9] != b"SIMPLE  =":
        return None
    try:
        header = fits.Header.fromstring(content[:end].decode("ascii"))
    except (UnicodeDecodeError, ValueError, fits.VerifyError):
        return None
    try:
        shape = int(header["NAXIS2"]), int(header["NAXIS1"])
        usual = (header["BITPIX"] == 16 and header["NAXIS"] == 2
                 and header.get("BZERO", 0) == 32768 and header.get("BSCALE", 1) == 1
                 and "BLANK" not in header and "PCOUNT" not in header)
    except (KeyError, TypeError, ValueError):
        return None
    start = -(-end // _BLOCK) * _BLOCK
    if not usual or min(shape) < 1 or len(content) < start + 2 * shape[0] * shape[1]:
        return None
    stored = np.frombuffer(content, ">u2", count=shape[0] * shape[1], offset=start)
    # stored int16 + 32768 is the stored bits with the sign bit flipped, as uint16
    raw = np.bitwise_xor(stored, np.uint16(0x8000), dtype=np.uint16).reshape(shape)
    lo, hi = raw.min(), raw.max()
    if lo == hi:
        raise FrameError(f"{where}: the image is constant ({hi:g} ADU everywhere)")
    return raw, header


@njit(cache=True, nogil=True)
def _amp_kernel(raw, c0, c1, level, gain, rdn2, saturation, saturated, flip_rows, flip_cols,
                image, variance, mask, planes):
    """Data columns ``c0:c1`` of a uint16 amp minus the overscan ``level`` of each row
    (float32), times ``gain``: the image (e-) written oriented into ``image``; with
    ``planes`` also the variance ``max(image, 0) + rdn2`` and the mask, ``saturated``
    where the raw value reached ``saturation``.

    Every value is the float32 arithmetic of the array path of :func:`_amp_planes`
    (float32(raw) - float32(level), times float32(gain), plus float32(rdnoise**2))."""
    nrow = raw.shape[0]
    ncol = c1 - c0
    zero = np.float32(0.0)
    for r in range(nrow):
        ro = nrow - 1 - r if flip_rows else r
        lv = level[r]
        src = raw[r, c0:c1]
        img = image[ro]
        if flip_cols:  # written in reverse: the loops below differ only in the index
            for c in range(ncol):
                img[ncol - 1 - c] = (np.float32(src[c]) - lv) * gain
        else:
            for c in range(ncol):
                img[c] = (np.float32(src[c]) - lv) * gain
        if planes:
            var = variance[ro]
            msk = mask[ro]
            for c in range(ncol):
                var[c] = max(img[c], zero) + rdn2
            if flip_cols:
                for c in range(ncol):
                    msk[ncol - 1 - c] = saturated if src[c] >= saturation else 0
            else:
                for c in range(ncol):
                    msk[c] = saturated if src[c] >= saturation else 0


def _load(reader: RawReader, rawfile, float_only: bool = False
          ) -> tuple[np.ndarray, fits.Header]:
    """Raw image (ADU, BZERO applied) and primary header of one amp file: uint16 for the
    usual raw file (:func:`_raw_uint16`), else float32 (always float32 with
    ``float_only``)."""
    where = rawfile.location
    try:
        content = reader.read_bytes(rawfile)
    except PanaceaError as exc:
        raise FrameError(str(exc)) from exc
    if not float_only:
        usual = _raw_uint16(content, where)
        if usual is not None:
            return usual
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
    amp = _load_amp(reader, rawfile, overscan)
    planes = (np.empty(amp.shape, np.float32), np.empty(amp.shape, np.float32),
              np.empty(amp.shape, np.uint8))
    amp.fill(*planes)
    frame = Frame(*planes, amp.header, rawfile.location)
    if bad_pixel_mask is not None:
        frame.mask |= _bad_pixel_bits(bad_pixel_mask, frame.shape)
    return frame


@dataclass
class _LoadedAmp:
    """One amp read and measured (overscan level, gain, orientation), before the planes are
    written: ``raw`` uint16 for :func:`_amp_kernel`, or ``planes`` computed by
    :func:`_amp_planes` for any other raw file."""

    header: fits.Header
    shape: tuple[int, int]  # trimmed (rows, columns)
    raw: np.ndarray | None = None
    columns: slice | None = None
    level: np.ndarray | None = None  # float32 per row (ADU)
    gain: float = 1.0
    rdnoise: float = 0.0
    flip_rows: bool = False
    flip_cols: bool = False
    planes: tuple[np.ndarray, ...] | None = None

    def fill(self, image: np.ndarray, variance: np.ndarray | None = None,
             mask: np.ndarray | None = None) -> None:
        """Write the oriented image (and variance and mask) into arrays of ``shape``."""
        if self.planes is not None:
            for out, plane in zip((image, variance, mask), self.planes):
                if out is not None:
                    out[...] = plane
            return
        planes = variance is not None
        dummy = np.empty((0, 0), np.float32)
        _amp_kernel(self.raw, self.columns.start, self.columns.stop, self.level,
                    np.float32(self.gain), np.float32(self.rdnoise**2),
                    instrument.SATURATION_ADU, np.uint8(Mask.SATURATED), self.flip_rows,
                    self.flip_cols, image,
                    variance if planes else dummy,
                    mask if planes else np.empty((0, 0), np.uint8), planes)


def _load_amp(reader: RawReader, rawfile, overscan: str, image_only: bool = False
              ) -> _LoadedAmp:
    """Read one amp file and measure what its planes need (see :class:`_LoadedAmp`)."""
    where = rawfile.location
    try:
        raw, header = _load(reader, rawfile)
        if raw.dtype != np.uint16:
            planes, header = _amp_planes(reader, rawfile, overscan, image_only,
                                         loaded=(raw, header))
            return _LoadedAmp(header, planes[0].shape, planes=planes)
        data_cols, bias_cols = amp_sections(header, raw.shape, where)
        skip = OVERSCAN_SKIP // amp_binning(raw.shape, where)[1]
        bias = raw[:, bias_cols]
        level = overscan_level((bias[:, skip:] if bias.shape[1] > skip else bias)
                               .astype(np.float32), overscan)
        if not np.all(np.isfinite(level)):
            raise FrameError(f"{where}: the overscan has no valid pixels")
    except FrameError as err:
        err.file = err.file or where
        raise
    gain = detector_value(header, "GAIN", instrument.DEFAULT_GAIN, where)
    rdnoise = 0.0 if image_only else detector_value(header, "RDNOISE",
                                                    instrument.DEFAULT_RDNOISE, where)
    _check_amp(header, rawfile.amp, where)
    rotate = instrument.needs_rotation(rawfile.amp)
    return _LoadedAmp(header, (raw.shape[0], data_cols.stop - data_cols.start), raw,
                      data_cols, level.astype(np.float32), gain, rdnoise, rotate,
                      rotate != instrument.needs_column_flip(_ampname(header)))


def _amp_planes(reader: RawReader, rawfile, overscan: str, image_only: bool = False,
                loaded: tuple[np.ndarray, fits.Header] | None = None
                ) -> tuple[tuple[np.ndarray, ...], fits.Header]:
    """Oriented image (e-, float32), variance (e-^2, float32) and mask (uint8) of one amp
    (views, possibly not contiguous), and its header; with ``image_only`` the image alone.

    The array path for any raw file (``loaded``: its raw image and header when read
    already); :func:`_amp_kernel` computes the same values for the usual uint16 file."""
    where = rawfile.location
    try:
        raw, header = loaded if loaded is not None else _load(reader, rawfile, float_only=True)
        raw = raw.astype(np.float32, copy=False)
        data, adu = subtract_overscan(raw, header, overscan, where)
    except FrameError as err:
        err.file = err.file or where
        raise
    finite = np.isfinite(data)
    allfinite = bool(finite.all())
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
                  image_only: bool = False) -> list[_LoadedAmp]:
    """Each amp of the channel read and measured (see :func:`_load_amp`), first amp first;
    FrameError when one is missing or the two cannot be stitched."""
    amps = []
    for amp in ch.amps:
        rawfile = exposure.files.get((ch.ifuslot, amp))
        if rawfile is None:
            others = sorted({f.source.name for f in exposure.files.values()})
            where = f" (not in {', '.join(others)})" if others else ""
            raise FrameError(f"{exposure.name}: amplifier {ch.ifuslot}{amp} of channel "
                             f"{ch.name} is missing{where}")
        amps.append(_load_amp(reader, rawfile, overscan, image_only))
    if len(amps) == 2 and amps[0].shape != amps[1].shape:
        raise FrameError(f"{exposure.name} {ch.name}: cannot stitch (amp shapes differ: "
                         f"{amps[0].shape} vs {amps[1].shape})")
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
    first, second = _channel_amps(reader, exposure, ch, overscan, True)
    ny = first.shape[0]
    shape = (2 * ny, first.shape[1])
    if out is None or out.shape != shape or out.dtype != np.float32:
        out = np.empty(shape, np.float32)
    first.fill(out[:ny])
    second.fill(out[ny:])
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
    first, second = _channel_amps(reader, exposure, ch, overscan)
    ny = first.shape[0]
    shape = (2 * ny, first.shape[1])
    planes = (np.empty(shape, np.float32), np.empty(shape, np.float32),
              np.empty(shape, np.uint8))
    first.fill(*(p[:ny] for p in planes))  # each amp written once, oriented, in its rows
    second.fill(*(p[ny:] for p in planes))
    frame = Frame(*planes, header=first.header, source=f"{exposure.name} {ch.name}")
    if bad_pixel_mask is not None:
        frame.mask |= _bad_pixel_bits(bad_pixel_mask, frame.shape)
    return frame
