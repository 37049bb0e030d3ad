"""Flux-conserving resampling of fiber spectra onto the channel's common wavelength grid.

Every fiber's native pixels (one per column) cover wavelength intervals whose edges lie
half-way between the wavelengths of neighbouring columns (extrapolated by half a pixel at
both ends). Each native pixel's electrons are spread uniformly over its interval; a grid
bin (edges half-way between grid points) receives the fraction of every native pixel that
it overlaps. This is the exact integral of the piecewise-constant spectrum, so flux is
conserved, and with ``W`` the overlap fractions the output variance is
``sum_k W_jk^2 var_k`` (the diagonal of the propagated covariance; neighbouring output
bins are correlated). A compiled loop walks each fiber's pixels and the grid together,
without building any matrix.

Output is a flux density per Angstrom (electrons per Angstrom of grid bin), the unit the
flux calibration (:mod:`lrs2_facts` section 4: e- per Angstrom per s per cm^2) expects.
"""

from __future__ import annotations

import numpy as np
from numba import njit


def pixel_edges(wave: np.ndarray) -> np.ndarray:
    """Wavelength edges (nfiber, ncol+1) of every fiber's pixels from their centres."""
    wave = np.asarray(wave, dtype=np.float64)
    mid = 0.5 * (wave[:, 1:] + wave[:, :-1])
    lo = wave[:, :1] - (mid[:, :1] - wave[:, :1])
    hi = wave[:, -1:] + (wave[:, -1:] - mid[:, -1:])
    return np.concatenate([lo, mid, hi], axis=1)


def grid_edges(grid: np.ndarray) -> np.ndarray:
    """Edges (n+1) of the bins centred on a monotonic grid."""
    grid = np.asarray(grid, dtype=np.float64)
    mid = 0.5 * (grid[1:] + grid[:-1])
    return np.concatenate([[grid[0] - (mid[0] - grid[0])], mid,
                           [grid[-1] + (grid[-1] - mid[-1])]])


def rectify(flux: np.ndarray, var: np.ndarray, wave: np.ndarray, grid: np.ndarray,
            also: tuple[np.ndarray, ...] = ()) -> tuple[np.ndarray, ...]:
    """Resample every fiber onto ``grid``, conserving flux, with propagated variance.

    Parameters
    ----------
    flux : ndarray (nfiber, ncol)
        Electrons per native pixel (column), e.g. from :func:`panacea.extract.optimal`.
    var : ndarray (nfiber, ncol)
        Variance of ``flux``; a value <= 0 or non-finite (or a non-finite flux) marks a
        bad pixel.
    wave : ndarray (nfiber, ncol)
        Wavelength of every fiber at every column (monotonic along each fiber, either
        direction).
    grid : ndarray (ngrid,)
        Increasing common wavelength grid (bin centres), e.g. ``Channel.grid``.
    also : tuple of ndarray (nfiber, ncol)
        More spectra on the same pixels (e.g. the sky model) resampled with the same
        weights and the same good bins as ``flux``.

    Returns
    -------
    flux_r : ndarray (nfiber, ngrid) float64
        Electrons per Angstrom in every grid bin.
    var_r : ndarray (nfiber, ngrid) float64
        Its variance ((e-/A)^2). Bins not fully covered by the fiber's pixels, or touching
        a bad pixel, have ``flux_r = 0`` and ``var_r = 0`` (an error of 0 marks bad data).
    *also_r : ndarray (nfiber, ngrid) float64
        Each of ``also`` resampled the same way (per Angstrom, 0 in bad bins).
    """
    flux = np.asarray(flux, dtype=np.float64)
    var = np.asarray(var, dtype=np.float64)
    wave = np.asarray(wave, dtype=np.float64)
    grid = np.asarray(grid, dtype=np.float64)
    extra = [np.asarray(a, dtype=np.float64) for a in also]
    if wave[0, -1] < wave[0, 0]:  # decreasing wavelength with column: flip
        flux, var, wave = flux[:, ::-1], var[:, ::-1], wave[:, ::-1]
        extra = [a[:, ::-1] for a in extra]
    bad = ~(np.isfinite(flux) & np.isfinite(var) & (var > 0))
    stack = np.ascontiguousarray(np.stack([np.where(bad, 0.0, a)
                                           for a in (flux, var, *extra)]))
    out = _resample(stack, bad, pixel_edges(wave), grid_edges(grid))
    return tuple(out)


@njit(cache=True, nogil=True)
def _resample(stack, bad, edges, gedges):
    """Overlap-weighted sums of every fiber's pixels in every grid bin, per Angstrom:
    ``stack[1]`` (the variance) with squared weights, the others with the weights; 0 in
    bins not inside the fiber's range or touching a bad pixel with non-zero weight."""
    nk, nfib, ncol = stack.shape
    ngrid = gedges.size - 1
    out = np.zeros((nk, nfib, ngrid))
    acc = np.zeros(nk)
    for f in range(nfib):
        e = edges[f]
        i0 = 0
        for j in range(ngrid):
            lo, hi = gedges[j], gedges[j + 1]
            if lo < e[0] or hi > e[ncol]:
                continue
            while i0 < ncol - 1 and e[i0 + 1] <= lo:
                i0 += 1
            acc[:] = 0.0
            touched_bad = False
            i = i0
            while i < ncol and e[i] < hi:
                a = max(lo, e[i])
                b = min(hi, e[i + 1])
                if b > a:
                    w = (b - a) / (e[i + 1] - e[i])
                    if bad[f, i]:
                        touched_bad = True
                        break
                    for n in range(nk):
                        acc[n] += (w * w if n == 1 else w) * stack[n, f, i]
                i += 1
            if touched_bad:
                continue
            width = hi - lo
            for n in range(nk):
                out[n, f, j] = acc[n] / (width * width if n == 1 else width)
    return out
