"""Combination of calibration frames with cosmic-ray rejection.

Frames are combined one band of rows at a time: the float64 working arrays then hold
``band_rows`` rows of every frame instead of whole frames (a few tens of MB instead of
several hundred for three 2064 x 2048 frames), and every pixel gets exactly the arithmetic
of a whole-frame combination.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

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
    for start in range(0, nrow, max(int(band_rows), 1)):
        rows = slice(start, min(start + band_rows, nrow))
        scaled = np.stack([im[rows] / lv for im, lv in zip(images, levels)])
        svar = np.stack([v[rows] / lv**2 for v, lv in zip(variances, levels)])
        ok = (np.ones(scaled.shape, bool) if masks is None
              else ~np.stack([m[rows] for m in masks]))
        # reference: the mean of all but the highest value (a cosmic ray only adds charge),
        # or the lower of two; as robust as a median against one hit per pixel, and faster
        if n >= 3:
            ref = (scaled.sum(axis=0) - scaled.max(axis=0)) / (n - 1)
        else:
            ref = scaled.min(axis=0)
        ok &= (scaled - ref) <= nsigma * np.sqrt(np.maximum(svar, 1e-12))
        nkept = ok.sum(axis=0)
        mean = np.where(ok, scaled, 0).sum(axis=0) / np.maximum(nkept, 1)
        var = np.where(ok, svar, 0).sum(axis=0) / np.maximum(nkept, 1) ** 2
        image[rows] = mean * total
        variance[rows] = var * total**2
        rejected[rows] = nkept == 0
    return image, variance, rejected


def frame_level(image: np.ndarray) -> float:
    """Typical level (e-) of the well-exposed pixels (median of the brightest quarter)."""
    sample = image[::4, ::4]
    return float(np.median(sample[sample > np.percentile(sample, 75)]))
