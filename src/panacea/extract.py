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


def _window_index(first_row: np.ndarray, nwin: int, shape: tuple[int, int]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Flat pixel index (nfiber, nwin, ncol) of every window pixel, and its in-frame flag."""
    nrow, ncol = shape
    rows = first_row[:, None, :] + np.arange(nwin)[None, :, None]
    inside = (rows >= 0) & (rows < nrow)
    cols = np.arange(first_row.shape[1])[None, None, :]
    flat = (np.clip(rows, 0, nrow - 1) * ncol + cols).astype(np.int32 if nrow * ncol < 2**31
                                                              else np.int64)
    return flat, inside


def optimal(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray | None,
    first_row: np.ndarray,
    weights: np.ndarray,
    read_variance: np.ndarray | float | None = None,
    niter: int = 2,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Horne-style optimal extraction of every fiber at every column, overlaps solved jointly.

    The frame is modelled as ``image[r, c] = sum_f F_f(c) P_f(r, c)`` with ``P`` the
    fibers' normalised profiles (:meth:`panacea.profile.FiberProfile.weights`). The
    fluxes are the weighted least-squares solution of that model at every column, found by
    Jacobi sweeps on its (banded) normal equations: each fiber is fitted as

        ``F_f = sum(P w (d - M_other)) / sum(P^2 w)``,  ``w = good / sigma^2``

    where ``M_other`` is the model of all other fibers from the previous sweep. Fibers
    overlap only through their wings, so the sweeps converge in two or three steps. The
    first sweep weights with the data's ``variance``; later sweeps with the *model*
    variance ``sigma^2 = read_variance + max(model, 0)`` (weights from the data itself
    bias faint fluxes low). The variance of the result is ``1 / sum(P^2 w)`` with the
    final model weights (the neighbours' covariance through the wings is neglected).

    Parameters
    ----------
    image : ndarray (nrow, ncol)
        Bias-subtracted (and pixel-flattened) frame, electrons.
    variance : ndarray (nrow, ncol)
        Its variance (e-^2): read noise (plus bias) variance + Poisson term.
    mask : ndarray (nrow, ncol) or None
        Non-zero for pixels to leave out (cosmic rays, saturated, bad columns); they get
        zero weight.
    first_row, weights : ndarray
        From :meth:`FiberProfile.weights`: (nfiber, ncol) first row of each fiber's
        window and (nfiber, nwin, ncol) profile weights summing to 1 per column.
    read_variance : ndarray (nrow, ncol) or float, optional
        Signal-independent variance of the pixels (e-^2). Default
        ``variance - max(image, 0)`` (the Poisson term the reader added), floored at 1.
    niter : int
        Jacobi sweeps (>= 1).

    Returns
    -------
    flux : ndarray (nfiber, ncol) float64
        Electrons per column of every fiber (0 where ``frac`` is 0).
    var : ndarray (nfiber, ncol) float64
        Variance of ``flux`` (0 where ``frac`` is 0: no data).
    frac : ndarray (nfiber, ncol) float64
        Fraction of the profile on unmasked in-frame pixels.
    """
    image = np.asarray(image, np.float32)
    variance = np.asarray(variance, np.float32)
    nrow, ncol = image.shape
    nwin = weights.shape[1]
    npix = nrow * ncol
    idx, inside = _window_index(np.asarray(first_row), nwin, image.shape)
    vwin = variance.ravel()[idx]
    good = inside & (vwin > 0)
    if mask is not None:
        good &= ~np.asarray(mask, bool).ravel()[idx]
    zero = np.float32(0.0)
    prof = np.where(good, weights, zero)  # profile on usable pixels
    light = np.where(inside, weights, zero)  # profile on in-frame pixels (the model)
    frac = prof.sum(axis=1, dtype=np.float64)
    data = image.ravel()[idx]
    if read_variance is None:
        rvar = np.maximum(vwin - np.maximum(data, zero), np.float32(1.0))
    elif np.ndim(read_variance) == 0:
        rvar = np.float32(read_variance)
    else:
        rvar = np.asarray(read_variance, np.float32).ravel()[idx]
    # pixels outside the frame scatter into a spare element (index npix)
    sidx = np.where(inside, idx, idx.dtype.type(npix))
    # first sweep: each fiber alone, weighted by the data's variance
    with np.errstate(divide="ignore", invalid="ignore"):
        pw = np.where(good, prof / vwin, zero)
    den = np.sum(pw * prof, axis=1, dtype=np.float64)
    num = np.sum(pw * data, axis=1, dtype=np.float64)
    ok = den > 0
    flux = np.divide(num, den, out=np.zeros_like(num), where=ok)
    for _ in range(max(int(niter), 1)):
        own = flux[:, None, :].astype(np.float32) * light
        model = np.zeros(npix + 1, np.float32)
        for i in range(nwin):  # fibers' rows are distinct at a given window row
            model[sidx[:, i, :]] += own[:, i, :]
        mwin = model[sidx]
        # model variance, and the data less the other fibers' model
        pw = prof / (rvar + np.maximum(mwin, zero))
        resid = data - mwin
        resid += own
        den = np.sum(pw * prof, axis=1, dtype=np.float64)
        num = np.sum(pw * resid, axis=1, dtype=np.float64)
        ok = den > 0
        flux = np.divide(num, den, out=np.zeros_like(num), where=ok)
    var = np.divide(1.0, den, out=np.zeros_like(den), where=ok)
    return flux, var, frac
