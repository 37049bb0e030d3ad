"""Extraction of fiber spectra from a channel frame along the traces.

All functions work on the stitched, oriented channel frame (rows = spatial, columns =
dispersion) and return arrays of shape (nfiber, ncol).
"""

from __future__ import annotations

import numpy as np
from numba import njit


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
    image = np.ascontiguousarray(image, np.float32)
    variance = np.ascontiguousarray(variance, np.float32)
    bad = (np.zeros(image.shape, np.bool_) if mask is None
           else np.ascontiguousarray(mask, np.bool_))
    if read_variance is None:
        rvar, rmode = np.zeros((1, 1), np.float32), 0
    elif np.ndim(read_variance) == 0:
        rvar, rmode = np.full((1, 1), read_variance, np.float32), 1
    else:
        rvar = np.ascontiguousarray(np.broadcast_to(read_variance, image.shape), np.float32)
        rmode = 2
    return _optimal_kernel(image, variance, bad, np.ascontiguousarray(first_row, np.int64),
                           np.ascontiguousarray(weights, np.float32), rvar, rmode,
                           max(int(niter), 1))


#: ``_sweep`` mode of the first sweep: each fiber alone, weighted by the data's variance.
_DATA_VARIANCE = -1


@njit(cache=True, nogil=True)
def _optimal_kernel(image, variance, bad, first_row, weights, rvar, rmode, niter):
    """Loops of :func:`optimal`, columns innermost so that every array is read in order."""
    nrow, ncol = image.shape
    nfib = weights.shape[0]
    flux = np.zeros((nfib, ncol))
    den = np.zeros((nfib, ncol))
    num = np.zeros((nfib, ncol))
    frac = np.zeros((nfib, ncol))
    model = np.zeros((nrow, ncol), np.float32)  # stays 0 in the first sweep
    _sweep(image, variance, bad, first_row, weights, model, flux, rvar, _DATA_VARIANCE,
           den, num, frac)
    for _ in range(niter):
        # model of all fibers, then each fiber refitted against the others' model with
        # the model variance
        _model(first_row, weights, flux, model)
        _sweep(image, variance, bad, first_row, weights, model, flux, rvar, rmode,
               den, num, frac)
    var = np.zeros((nfib, ncol))
    for f in range(nfib):
        for c in range(ncol):
            if den[f, c] > 0:
                var[f, c] = 1.0 / den[f, c]
    return flux, var, frac


@njit(cache=True, nogil=True)
def _model(first_row, weights, flux, model):
    """``model`` = every fiber's flux times its profile, summed (in place)."""
    nrow, ncol = model.shape
    model[:] = 0
    for f in range(weights.shape[0]):
        for j in range(weights.shape[1]):
            for c in range(ncol):
                r = first_row[f, c] + j
                if 0 <= r < nrow:
                    model[r, c] += np.float32(flux[f, c]) * weights[f, j, c]


@njit(cache=True, nogil=True)
def _sweep(image, variance, bad, first_row, weights, model, flux, rvar, mode, den, num,
           frac):
    """One Jacobi sweep: every fiber fitted against the data less the others' ``model``;
    updates ``flux`` (and ``den``, ``num``, ``frac``) in place. ``mode`` picks the variance
    of the weights: the data's (first sweep), or a floor (0: data minus signal, 1: one
    value, 2: per pixel) plus the model."""
    nrow, ncol = image.shape
    den[:] = 0
    num[:] = 0
    frac[:] = 0
    for f in range(weights.shape[0]):
        for j in range(weights.shape[1]):
            for c in range(ncol):
                r = first_row[f, c] + j
                if r < 0 or r >= nrow:
                    continue
                v = variance[r, c]
                if v <= 0 or bad[r, c]:
                    continue
                p = weights[f, j, c]
                m = model[r, c]
                if mode == _DATA_VARIANCE:
                    floor = v
                elif mode == 0:
                    floor = max(v - max(image[r, c], 0.0), 1.0)
                elif mode == 1:
                    floor = rvar[0, 0]
                else:
                    floor = rvar[r, c]
                pw = p / (floor + max(m, 0.0))
                frac[f, c] += p
                den[f, c] += pw * p
                num[f, c] += pw * (image[r, c] - m + np.float32(flux[f, c]) * p)
    for f in range(weights.shape[0]):
        for c in range(ncol):
            flux[f, c] = num[f, c] / den[f, c] if den[f, c] > 0 else 0.0
