"""Master bias and read noise.

A master bias is the robust (sigma-clipped) mean of overscan-subtracted bias frames in
electrons. It is combined in bands of rows so that memory stays bounded whatever the
number of frames: only ``band_rows`` rows of every frame are held at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from astropy.stats import mad_std
from numba import njit

log = logging.getLogger(__name__)


@dataclass
class MasterBias:
    """Master bias of one channel (stitched frame, electrons).

    Attributes
    ----------
    image : ndarray (nrow, ncol)
        Sigma-clipped mean of the biases after overscan subtraction (e-).
    variance : ndarray (nrow, ncol)
        Variance of ``image`` (e-^2): read noise squared over the number of frames kept.
    rdnoise : ndarray (namp,)
        Read noise measured per amplifier (e-).
    nframes : int
        Number of frames combined.
    """

    image: np.ndarray
    variance: np.ndarray
    rdnoise: np.ndarray
    nframes: int


def combine_bands(
    read_rows: Callable[[int, slice], np.ndarray] | np.ndarray,
    nframes: int,
    shape: tuple[int, int],
    noise: np.ndarray,
    band_rows: int = 256,
    nsigma: float = 5.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``nframes`` frames without outliers, one band of rows at a time.

    A pixel is left out when it lies more than ``nsigma`` times the read noise from the
    reference: the mean of all frames but the highest (three or more frames) or, for two
    frames, their minimum (cosmic rays only add charge). Using the known noise instead of
    the scatter of a few values keeps the clipping honest for any number of frames.

    Parameters
    ----------
    read_rows : callable or ndarray
        ``read_rows(i, rows)`` returns rows ``rows`` of frame ``i`` (e-); or the frames
        themselves, shape (>= nframes, nrow, ncol) (e.g. a disk-backed stack: a band of
        rows is read at a time, without a copy).
    noise : ndarray (nrow,)
        Read noise (e-) of every row.

    Returns
    -------
    mean : ndarray (nrow, ncol) float32
    count : ndarray (nrow, ncol) int16
        Frames kept at each pixel.
    """
    mean = np.empty(shape, np.float32)
    count = np.empty(shape, np.int16)
    noise = np.asarray(noise, np.float64)
    for start in range(0, shape[0], band_rows):
        rows = slice(start, min(start + band_rows, shape[0]))
        if isinstance(read_rows, np.ndarray):
            stack = read_rows[:nframes, rows]
        else:
            stack = np.stack([read_rows(i, rows) for i in range(nframes)])
        stack = np.asarray(stack, np.float32)
        _combine_kernel(stack, nsigma * noise[rows], np.float32(max(nframes - 1, 1)),
                        mean[rows], count[rows])
    return mean, count


@njit(cache=True, nogil=True)
def _combine_kernel(stack, sig, nless, mean, count):
    """Pixel loops of :func:`combine_bands` for one band: ``stack`` (nframes, rows, ncol)
    float32, ``sig`` the clipping distance (e-) of each row, ``nless`` float32(nframes - 1).

    The float32 and float64 operations, and the order of the sums over frames, are those of
    numpy's reductions along the frame axis, so the result is that of the array code
    ``ref = (sum - max) / (n - 1)``, ``keep = |x - ref| <= sig`` (two frames:
    ``x - min <= sig * sqrt(2)``), ``mean = sum(x where keep) / max(count, 1)``, for finite
    frames (a read sets non-finite pixels to 0)."""
    nframes, nrow, ncol = stack.shape
    limit = np.sqrt(2.0)
    zero = np.float32(0.0)
    ref = np.empty(ncol, np.float32)
    high = np.empty(ncol, np.float32)
    acc = np.empty(ncol, np.float32)
    kept = np.empty(ncol, np.int64)
    for r in range(nrow):
        s = sig[r] if nframes >= 3 else sig[r] * limit
        for c in range(ncol):  # column innermost, so that the loops vectorise
            ref[c] = stack[0, r, c]
            high[c] = stack[0, r, c]
        for f in range(1, nframes):
            for c in range(ncol):
                x = stack[f, r, c]
                if nframes >= 3:
                    ref[c] += x
                    high[c] = max(high[c], x)
                else:
                    ref[c] = min(ref[c], x)
        if nframes >= 3:
            for c in range(ncol):
                ref[c] = (ref[c] - high[c]) / nless
        for f in range(nframes):
            for c in range(ncol):
                x = stack[f, r, c]
                if nframes >= 3:
                    keep = np.float64(abs(x - ref[c])) <= s
                else:
                    keep = np.float64(x - ref[c]) <= s
                value = x if keep else zero
                if f == 0:
                    acc[c] = value
                    kept[c] = keep
                else:
                    acc[c] += value
                    kept[c] += keep
        for c in range(ncol):
            mean[r, c] = np.float32(np.float64(acc[c]) / np.float64(max(kept[c], 1)))
            count[r, c] = kept[c]


def read_noise(frames: Sequence[np.ndarray], amp_rows: int) -> np.ndarray:
    """Read noise (e-) per amplifier from differences of pairs of bias frames.

    The difference of two biases has no fixed structure; its robust standard deviation
    (from the median absolute deviation, blind to the few cosmic rays) divided by sqrt(2)
    is the read noise.
    """
    if len(frames) < 2:
        raise ValueError("at least two bias frames are needed to measure the read noise")
    namp = frames[0].shape[0] // amp_rows
    out = np.empty(namp)
    for a in range(namp):
        rows = slice(a * amp_rows, (a + 1) * amp_rows)
        sig = []
        for f1, f2 in zip(frames[:-1:2], frames[1::2]):
            d = (f1[rows] - f2[rows]).ravel()
            sig.append(mad_std(d) / np.sqrt(2))
        out[a] = np.median(sig)
    return out


def master_bias(
    read_rows: Callable[[int, slice], np.ndarray] | np.ndarray,
    nframes: int,
    shape: tuple[int, int],
    amp_rows: int,
    band_rows: int = 256,
) -> MasterBias:
    """Build the master bias and measure the read noise.

    Parameters
    ----------
    read_rows : callable or ndarray
        ``read_rows(i, rows)`` returns rows of the overscan-subtracted bias ``i`` (e-); or
        the stack of biases, shape (>= nframes, nrow, ncol).
    nframes : int
        Number of bias frames (at least 2).
    shape : (nrow, ncol)
        Shape of a stitched channel frame.
    amp_rows : int
        Rows per amplifier.
    """
    if nframes < 2:
        raise ValueError(f"a master bias needs at least 2 frames, got {nframes}")
    # read noise from the first pair of frames (millions of pixels per amp)
    whole = slice(0, shape[0])
    if isinstance(read_rows, np.ndarray):
        rdnoise = read_noise([np.asarray(read_rows[i]) for i in range(2)], amp_rows)
    else:
        rdnoise = read_noise([read_rows(i, whole) for i in range(2)], amp_rows)
    amp_of_row = np.arange(shape[0]) // amp_rows
    image, count = combine_bands(read_rows, nframes, shape, rdnoise[amp_of_row], band_rows)
    variance = (rdnoise[amp_of_row][:, None] ** 2 / np.maximum(count, 1)).astype(np.float32)
    log.info("master bias from %d frames; read noise %s e-", nframes,
             ", ".join(f"{r:.2f}" for r in rdnoise))
    return MasterBias(image=image, variance=variance, rdnoise=rdnoise, nframes=nframes)
