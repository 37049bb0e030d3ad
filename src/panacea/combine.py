"""Combination of calibration frames with cosmic-ray rejection.

Frames are combined one band of rows at a time: the float64 working arrays then hold
``band_rows`` rows of every frame instead of whole frames (a few tens of MB instead of
several hundred for three 2064 x 2048 frames), and every pixel gets exactly the arithmetic
of a whole-frame combination.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numba import njit

#: Rows of every frame combined at once.
BAND_ROWS = 128


def combine_frames(
    images: Sequence[np.ndarray],
    variances: Sequence[np.ndarray],
    masks: Sequence[np.ndarray] | None = None,
    nsigma: float = 5.0,
    band_rows: int = BAND_ROWS,
    levels: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sum frames of one kind (flats, arcs) after rejecting cosmic rays pixel by pixel.

    Each frame is scaled to a common level (its median over well-exposed pixels), compared
    with a reference (the median of the scaled frames, or their minimum when there are only
    two) and a pixel more than ``nsigma`` standard deviations above the reference is left out.
    The reference is the mean of all frames but the highest at each pixel (three or more
    frames) or the lower of two.
    The kept pixels are averaged and scaled back to the summed level, so the result has the
    counts of the sum of all frames.

    Parameters
    ----------
    images, variances : sequence of ndarray (nrow, ncol)
        Bias-subtracted frames (e-) and their variances (e-^2); a sequence of 2-d arrays or
        one 3-d stack (frame, row, column), e.g. float32.
    masks : sequence of ndarray of bool, optional
        Pixels to leave out from the start (e.g. saturated).
    band_rows : int
        Rows combined at once (memory only; the result does not depend on it).
    levels : sequence of float, optional
        :func:`frame_level` of every image (e-), when the caller has measured it already.

    Returns
    -------
    image, variance : ndarray of float32
        The combined frame (e-, the level of the sum of frames) and its variance (e-^2).
    rejected : ndarray of bool
        Pixels where no frame was kept.
    """
    n = len(images)
    if n == 0:
        raise ValueError("no frames to combine")
    if n == 1:
        bad = masks[0] if masks is not None else np.zeros(images[0].shape, bool)
        return (np.asarray(images[0], dtype=np.float32),
                np.asarray(variances[0], dtype=np.float32), np.asarray(bad, dtype=bool))
    levels = np.array([frame_level(im) for im in images] if levels is None else levels,
                      dtype=float)
    if levels.shape != (n,):
        raise ValueError(f"{levels.size} levels given for {n} frames")
    if np.any(levels <= 0):
        levels = np.ones(n)  # e.g. arcs with little continuum: combine unscaled
    total = levels.sum()
    nrow = images[0].shape[0]
    image = np.empty(images[0].shape, np.float32)
    variance = np.empty(images[0].shape, np.float32)
    rejected = np.empty(images[0].shape, bool)
    none = np.zeros((0, 0, 0), bool)
    for start in range(0, nrow, max(int(band_rows), 1)):
        rows = slice(start, min(start + band_rows, nrow))
        band = _band(images, rows)
        _combine_kernel(band, _band(variances, rows),
                        none if masks is None else _band(masks, rows).astype(bool, copy=False),
                        masks is not None, levels, float(nsigma), total, image[rows],
                        variance[rows], rejected[rows])
    return image, variance, rejected


def _band(frames: Sequence[np.ndarray] | np.ndarray, rows: slice) -> np.ndarray:
    """Rows ``rows`` of every frame as one (frame, row, column) array (a view of a stack)."""
    if isinstance(frames, np.ndarray):
        return frames[:, rows]
    return np.stack([np.asarray(f)[rows] for f in frames])


@njit(cache=True, nogil=True)
def _combine_kernel(images, variances, masks, masked, levels, nsigma, total, image, variance,
                    rejected):
    """Pixel loops of :func:`combine_frames` for one band of rows (frame, row, column).

    Every value is that of the float64 array code it replaces: ``x / level`` and
    ``v / level**2`` of every frame; the reference (sum - max) / (n - 1) or the min of two;
    kept where ``scaled - ref <= nsigma * sqrt(maximum(svar, 1e-12))`` (and not masked);
    sums over frames in frame order, NaN propagated as numpy's max, min and maximum do.
    The loops run along a row (column innermost) so that they vectorise."""
    n, nrow, ncol = images.shape
    scaled = np.empty((n, ncol))
    svar = np.empty((n, ncol))
    ref = np.empty(ncol)
    high = np.empty(ncol)
    acc = np.empty(ncol)
    vacc = np.empty(ncol)
    kept = np.empty(ncol, np.int64)
    for r in range(nrow):
        for f in range(n):
            lv = levels[f]
            lv2 = lv**2
            for c in range(ncol):
                scaled[f, c] = images[f, r, c] / lv
                svar[f, c] = variances[f, r, c] / lv2
        for c in range(ncol):
            ref[c] = scaled[0, c]
            high[c] = scaled[0, c]
        for f in range(1, n):
            for c in range(ncol):
                x = scaled[f, c]
                if n >= 3:
                    ref[c] += x
                    if high[c] == high[c] and not x <= high[c]:  # NaN wins, as in np.max
                        high[c] = x
                elif ref[c] == ref[c] and not x >= ref[c]:  # the min of two (np.min)
                    ref[c] = x
        if n >= 3:
            for c in range(ncol):
                ref[c] = (ref[c] - high[c]) / (n - 1)
        for f in range(n):
            for c in range(ncol):
                sv = svar[f, c]
                floor = sv if not sv < 1e-12 else 1e-12
                ok = (scaled[f, c] - ref[c]) <= nsigma * np.sqrt(floor)
                if masked:
                    ok = ok and not masks[f, r, c]
                value = scaled[f, c] if ok else 0.0
                vvalue = sv if ok else 0.0
                if f == 0:
                    acc[c] = value
                    vacc[c] = vvalue
                    kept[c] = ok
                else:
                    acc[c] += value
                    vacc[c] += vvalue
                    kept[c] += ok
        for c in range(ncol):
            keep = max(kept[c], 1)
            image[r, c] = (acc[c] / keep) * total
            variance[r, c] = (vacc[c] / keep**2) * total**2
            rejected[r, c] = kept[c] == 0


def frame_level(image: np.ndarray) -> float:
    """Typical level (e-) of the well-exposed pixels (median of the brightest quarter)."""
    sample = image[::4, ::4]
    return float(np.median(sample[sample > np.percentile(sample, 75)]))
