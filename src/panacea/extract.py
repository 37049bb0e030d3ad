"""Extraction of fiber spectra from a channel frame along the traces.

All functions work on the stitched, oriented channel frame (rows = spatial, columns =
dispersion) and return arrays of shape (nfiber, ncol).
"""

from __future__ import annotations

import numpy as np


def boxcar(
    image: np.ndarray,
    trace: np.ndarray,
    half_width: float = 3.0,
    variance: np.ndarray | None = None,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Sum each fiber's light in a window of +-``half_width`` rows around its trace.

    Edge pixels of the window are weighted by the fraction of the pixel inside it, so the
    aperture is exactly ``2 * half_width`` rows wide wherever the trace sits.

    Parameters
    ----------
    image : ndarray (nrow, ncol)
        Frame in electrons.
    trace : ndarray (nfiber, ncol)
        Row of each fiber's centre at every column.
    half_width : float
        Half-width of the aperture (rows).
    variance : ndarray (nrow, ncol), optional
        Pixel variance (e-^2); its weighted sum is returned.
    mask : ndarray (nrow, ncol) of bool, optional
        Pixels to leave out (their weight is set to zero).

    Returns
    -------
    flux : ndarray (nfiber, ncol)
        Electrons per column.
    var : ndarray (nfiber, ncol) or None
        Variance of ``flux`` (None when no variance was given).
    """
    nrow, ncol = image.shape
    lo = trace - half_width
    hi = trace + half_width
    r0 = np.floor(lo + 0.5).astype(int)  # first row whose pixel overlaps the window
    n = int(np.ceil(2 * half_width)) + 2
    cols = np.arange(ncol)[None, :]
    flux = np.zeros(trace.shape)
    var = np.zeros(trace.shape) if variance is not None else None
    for j in range(n):
        rows = r0 + j
        # overlap of pixel [rows-0.5, rows+0.5] with [lo, hi]
        w = np.clip(np.minimum(rows + 0.5, hi) - np.maximum(rows - 0.5, lo), 0.0, 1.0)
        inside = (rows >= 0) & (rows < nrow)
        rr = np.clip(rows, 0, nrow - 1)
        w = np.where(inside, w, 0.0)
        if mask is not None:
            w = np.where(mask[rr, cols], 0.0, w)
        flux += w * image[rr, cols]
        if var is not None:
            var += w**2 * variance[rr, cols]
    return flux, var
