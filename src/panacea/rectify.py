"""Flux-conserving resampling of fiber spectra onto the channel's common wavelength grid.

Every fiber's native pixels (one per column) cover wavelength intervals whose edges lie
half-way between the wavelengths of neighbouring columns (extrapolated by half a pixel at
both ends). Each native pixel's electrons are spread uniformly over its interval; a grid
bin (edges half-way between grid points) receives the fraction of every native pixel that
it overlaps. This is the exact integral of the piecewise-constant spectrum, so flux is
conserved, and with ``W`` the overlap fractions the output variance is
``sum_k W_jk^2 var_k`` (the diagonal of the propagated covariance; neighbouring output
bins are correlated). Both are computed from cumulative sums, vectorised over fibers,
without building any matrix.

Output is a flux density per Angstrom (electrons per Angstrom of grid bin), the unit the
flux calibration (:mod:`lrs2_facts` section 4: e- per Angstrom per s per cm^2) expects.
"""

from __future__ import annotations

import numpy as np


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


def _positions(edges: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel index and fraction (nfiber, ntarget) of ``targets`` in every fiber's ``edges``.

    Targets before the first edge get index 0, fraction 0; beyond the last edge the last
    pixel with fraction 1 (nothing outside the fiber's range is counted).
    """
    nfib, nedge = edges.shape
    # one global search: shift every fiber to its own disjoint interval
    span = edges.max() - edges.min() + 1.0
    offset = (np.arange(nfib) * span)[:, None]
    flat = (edges - edges.min() + offset).ravel()
    t = (np.clip(targets[None, :], edges[:, :1], edges[:, -1:]) - edges.min() + offset)
    k = np.searchsorted(flat, t.ravel(), side="right").reshape(t.shape) - 1
    k -= (np.arange(nfib) * nedge)[:, None]
    k = np.clip(k, 0, nedge - 2)
    e0 = np.take_along_axis(edges, k, axis=1)
    e1 = np.take_along_axis(edges, k + 1, axis=1)
    frac = np.clip((np.clip(targets[None, :], edges[:, :1], edges[:, -1:]) - e0) / (e1 - e0),
                   0.0, 1.0)
    return k, frac


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
    nfib = flux.shape[0]
    bad = ~(np.isfinite(flux) & np.isfinite(var) & (var > 0))
    flux = np.where(bad, 0.0, flux)
    var = np.where(bad, 0.0, var)
    edges = pixel_edges(wave)
    gedges = grid_edges(grid)
    k, t = _positions(edges, gedges)  # (nfib, ngrid+1)

    def zcum(a):
        return np.concatenate([np.zeros((nfib, 1)), np.cumsum(a, axis=1)], axis=1)

    cf, cv, cb = zcum(flux), zcum(var), zcum(bad.astype(np.float64))
    ka, ta, kb, tb = k[:, :-1], t[:, :-1], k[:, 1:], t[:, 1:]

    def pick(a, kk):
        return np.take_along_axis(a, kk, axis=1)

    va, vb = pick(var, ka), pick(var, kb)
    same = ka == kb
    inner = np.minimum(ka + 1, kb)

    def resample(a, ca):
        # different pixels: (1-ta) of pixel ka, all of ka+1..kb-1, tb of pixel kb
        fa, fb = pick(a, ka), pick(a, kb)
        return np.where(same, (tb - ta) * fa,
                        (1 - ta) * fa + pick(ca, kb) - pick(ca, inner) + tb * fb)

    out_f = resample(flux, cf)
    inner_v = pick(cv, kb) - pick(cv, inner)
    out_v = np.where(same, (tb - ta) ** 2 * va,
                     (1 - ta) ** 2 * va + inner_v + tb**2 * vb)
    # bad pixels touched (with non-zero weight)
    nbad = pick(cb, kb + 1) - pick(cb, ka)
    nbad -= np.where((tb == 0) & ~same, pick(bad.astype(np.float64), kb), 0.0)
    nbad -= np.where((ta == 1) & ~same, pick(bad.astype(np.float64), ka), 0.0)
    covered = (gedges[None, :-1] >= edges[:, :1]) & (gedges[None, 1:] <= edges[:, -1:])
    use = covered & (nbad < 0.5)
    width = np.diff(gedges)[None, :]
    flux_r = np.where(use, out_f / width, 0.0)
    var_r = np.where(use, out_v / width**2, 0.0)
    also_r = [np.where(use, resample(a, zcum(np.where(bad, 0.0, a))) / width, 0.0)
              for a in extra]
    return (flux_r, var_r, *also_r)
