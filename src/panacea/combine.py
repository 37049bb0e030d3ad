"""Combination of calibration frames with cosmic-ray rejection."""

from __future__ import annotations

import numpy as np


def combine_frames(
    images: list[np.ndarray],
    variances: list[np.ndarray],
    masks: list[np.ndarray] | None = None,
    nsigma: float = 5.0,
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
    images, variances : list of ndarray (nrow, ncol)
        Bias-subtracted frames (e-) and their variances (e-^2).
    masks : list of ndarray of bool, optional
        Pixels to leave out from the start (e.g. saturated).

    Returns
    -------
    image, variance : ndarray
        The combined frame (e-, the level of the sum of frames) and its variance.
    rejected : ndarray of bool
        Pixels where no frame was kept.
    """
    n = len(images)
    if n == 0:
        raise ValueError("no frames to combine")
    if n == 1:
        bad = masks[0] if masks is not None else np.zeros(images[0].shape, bool)
        return images[0].astype(np.float32), variances[0].astype(np.float32), bad
    levels = np.array([frame_level(im) for im in images])
    if np.any(levels <= 0):
        levels = np.ones(n)  # e.g. arcs with little continuum: combine unscaled
    scaled = np.stack([im / lv for im, lv in zip(images, levels)])
    svar = np.stack([v / lv**2 for v, lv in zip(variances, levels)])
    ok = np.ones(scaled.shape, bool) if masks is None else ~np.stack(masks)
    # reference: the mean of all but the highest value (a cosmic ray only adds charge), or
    # the lower of two; as robust as a median against one hit per pixel, and much faster
    ref = (scaled.sum(axis=0) - scaled.max(axis=0)) / (n - 1) if n >= 3 else scaled.min(axis=0)
    ok &= (scaled - ref) <= nsigma * np.sqrt(np.maximum(svar, 1e-12))
    nkept = ok.sum(axis=0)
    mean = np.where(ok, scaled, 0).sum(axis=0) / np.maximum(nkept, 1)
    var = np.where(ok, svar, 0).sum(axis=0) / np.maximum(nkept, 1) ** 2
    total = levels.sum()
    return (mean * total).astype(np.float32), (var * total**2).astype(np.float32), nkept == 0


def frame_level(image: np.ndarray) -> float:
    """Typical level of the well-exposed pixels (median of the brightest quarter)."""
    sample = image[::4, ::4]
    return float(np.median(sample[sample > np.percentile(sample, 75)]))
