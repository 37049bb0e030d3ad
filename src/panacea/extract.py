"""Extraction of fiber spectra from a channel frame along the traces.

All functions work on the stitched, oriented channel frame (rows = spatial, columns =
dispersion) and return arrays of shape (nfiber, ncol).
"""

from __future__ import annotations

import itertools
import logging
from typing import NamedTuple

import numpy as np
from numba import njit
from scipy.ndimage import gaussian_filter1d

log = logging.getLogger(__name__)


class Aperture(NamedTuple):
    """Pixel weights of a boxcar aperture along a trace (see :func:`aperture`).

    They depend only on the trace, the half-width and the frame's shape, so a caller that
    extracts several frames on one trace builds them once and passes them to
    :func:`boxcar` for every frame.
    """

    half_width: float  # rows
    shape: tuple[int, int]  # (nrow, ncol) of the frames it applies to
    index: np.ndarray  # (nwin, nfiber, ncol) flat index of each window row's pixel
    weight: np.ndarray  # (nwin, nfiber, ncol) fraction of that pixel inside the aperture


def aperture(trace: np.ndarray, half_width: float, shape: tuple[int, int]) -> Aperture:
    """The pixels and weights of a +-``half_width`` row aperture around every trace point.

    Edge pixels of the window are weighted by the fraction of the pixel inside it, so the
    aperture is exactly ``2 * half_width`` rows wide wherever the trace sits; rows outside
    the frame get weight 0.

    Parameters
    ----------
    trace : ndarray (nfiber, ncol)
        Row of each fiber's centre at every column.
    half_width : float
        Half-width of the aperture (rows).
    shape : tuple of int
        (nrow, ncol) of the frames to extract; ``ncol`` must match the trace's.

    Returns
    -------
    Aperture
    """
    trace = np.asarray(trace)  # its dtype kept: float32 traces give float32 windows
    nrow, ncol = (int(n) for n in shape)
    if trace.ndim != 2 or trace.shape[1] != ncol:
        raise ValueError(f"trace of shape {trace.shape} does not fit a frame of {shape}")
    lo = trace - half_width
    hi = trace + half_width
    r0 = np.floor(lo + 0.5).astype(int)  # first row whose pixel overlaps the window
    n = int(np.ceil(2 * half_width)) + 2
    cols = np.arange(ncol)[None, :]
    itype = np.int32 if nrow * ncol < 2**31 else np.intp
    index = np.empty((n, *trace.shape), itype)
    weight = []
    for j in range(n):
        rows = r0 + j
        # overlap of pixel [rows-0.5, rows+0.5] with [lo, hi]
        w = np.clip(np.minimum(rows + 0.5, hi) - np.maximum(rows - 0.5, lo), 0.0, 1.0)
        inside = (rows >= 0) & (rows < nrow)
        weight.append(np.where(inside, w, 0.0))
        index[j] = np.clip(rows, 0, nrow - 1) * ncol + cols
    return Aperture(float(half_width), (nrow, ncol), index, np.stack(weight))


def _native(a: np.ndarray | None) -> np.ndarray | None:
    """``a`` in a dtype the numba kernel takes: native byte order (an image read straight
    from a FITS HDU is big-endian), float16 widened to float32 (exact)."""
    if a is None:
        return None
    a = np.asarray(a)
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    if a.dtype == np.float16:
        a = a.astype(np.float32)
    return a


def boxcar(
    image: np.ndarray,
    trace: np.ndarray | Aperture,
    half_width: float | None = None,
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
    trace : ndarray (nfiber, ncol) or Aperture
        Row of each fiber's centre at every column, or the aperture built from it once by
        :func:`aperture` (the same result, without rebuilding the weights).
    half_width : float, optional
        Half-width of the aperture (rows); default 3, or the aperture's (giving another
        one with an aperture is an error).
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
    if isinstance(trace, Aperture):
        ap = trace
        if half_width is not None and float(half_width) != ap.half_width:
            raise ValueError(f"half_width {half_width} differs from the aperture's "
                             f"{ap.half_width}")
    else:
        ap = aperture(trace, 3.0 if half_width is None else half_width, image.shape)
    image, variance, mask = (_native(a) for a in (image, variance, mask))
    for name, arr in (("image", image), ("variance", variance), ("mask", mask)):
        if arr is not None and arr.shape != ap.shape:
            raise ValueError(f"{name} of shape {arr.shape} does not fit the aperture's frame "
                             f"{ap.shape}")
    flux = np.zeros(ap.index.shape[1:])
    var = np.zeros(ap.index.shape[1:]) if variance is not None else None
    nothing = np.zeros(1, np.bool_)
    _boxcar_sums(np.ravel(image), nothing if variance is None else np.ravel(variance),
                 nothing if mask is None else np.ravel(mask), ap.index, ap.weight,
                 variance is not None, mask is not None, flux,
                 flux if var is None else var)
    return flux, var


@njit(cache=True, nogil=True)
def _boxcar_sums(pixels, vpix, mpix, index, weight, with_var, with_mask, flux, var):
    """The sums of :func:`boxcar`, in place: ``flux += w * pixel`` and ``var += w * w *
    variance`` window row by window row (the order of a sum over the rows), ``w`` set to 0
    on masked pixels (so a non-finite masked pixel still makes the sum non-finite)."""
    nwin, nfib, ncol = index.shape
    for j in range(nwin):
        for f in range(nfib):
            for c in range(ncol):
                i = index[j, f, c]
                w = weight[j, f, c]
                if with_mask and mpix[i]:
                    w = np.float32(0.0)  # typed as the weights are (float32 or 64)
                flux[f, c] += w * pixels[i]
                if with_var:
                    var[f, c] += w * w * vpix[i]


class Extraction(NamedTuple):
    """Result of :func:`optimal`."""

    flux: np.ndarray  # (nfiber, ncol) electrons per column (0 where frac is 0)
    variance: np.ndarray  # (nfiber, ncol) variance of flux (0 where there is no data)
    frac: np.ndarray  # (nfiber, ncol) fraction of the profile on unmasked in-frame pixels
    offset: np.ndarray  # (nrow, ncol) additive offset fitted between fibers (0 if not)
    read_variance: np.ndarray  # (nfiber, ncol) 1 / sum(P^2 / floor): the variance at zero
    # signal, which does not follow the data when ``read_variance`` is given (0: no data)


#: Row offsets: pixels between fibers, where the fibers' summed profile is below GAP_PROFILE
#: and their model below GAP_MODEL read-noise sigma, measure them.
GAP_PROFILE = 0.1
GAP_MODEL = 5.0
#: Gaussian sigma (rows) over which the offsets are smoothed, prior scatter of an offset
#: (e-; shrinks rows with few gap pixels, e.g. under a bright star, towards 0) and clip.
ROW_OFFSET_SMOOTH = 5.0
ROW_OFFSET_PRIOR = 0.3
ROW_OFFSET_CLIP = 4.0
ROW_OFFSET_ROUNDS = 3
#: Blocks of columns with offsets of their own, interpolated linearly between the blocks'
#: centres: the bias drift is the same along a row, scattered light near a bright star is
#: not, and one offset per row would carry a local halo to the whole row.
OFFSET_COLUMN_BLOCKS = 4


def optimal(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray | None,
    first_row: np.ndarray,
    weights: np.ndarray,
    read_variance: np.ndarray | float | None = None,
    niter: int = 2,
    row_segments: tuple[int, ...] | None = None,
) -> Extraction:
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

    With ``row_segments`` the model gains an additive offset, smooth along the rows within
    each segment (an amplifier) and linear between :data:`OFFSET_COLUMN_BLOCKS` blocks of
    columns: what the overscan leaves of the bias's row-to-row drift, and smooth scattered
    light. A smooth offset is nearly degenerate with the fibers' fluxes where
    the profiles tile the rows, so it is measured only on the pixels between fibers (see
    :func:`_row_offsets`) before the last sweep and subtracted from the image for it
    (``niter >= 2`` is needed for a useful model).

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
        Jacobi sweeps after the first (>= 1).
    row_segments : tuple of int, optional
        Row boundaries of the blocks (e.g. ``(0, 1032, 2064)`` for two amplifiers) within
        which row offsets are fitted; None fits none.

    Returns
    -------
    Extraction
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
    first_row = np.ascontiguousarray(first_row, np.int64)
    weights = np.ascontiguousarray(weights, np.float32)
    nrow, ncol = image.shape
    nfib = weights.shape[0]
    flux = np.zeros((nfib, ncol))
    den = np.zeros((nfib, ncol))
    den0 = np.zeros((nfib, ncol))
    num = np.zeros((nfib, ncol))
    frac = np.zeros((nfib, ncol))
    model = np.zeros((nrow, ncol), np.float32)  # stays 0 in the first sweep
    offset = np.zeros((nrow, ncol), np.float32)
    if row_segments is not None:
        row_segments = tuple(int(b) for b in row_segments)
        if (len(row_segments) < 2 or row_segments[0] != 0 or row_segments[-1] != nrow
                or any(b <= a for a, b in itertools.pairwise(row_segments))):
            raise ValueError(f"row_segments {row_segments} must increase from 0 to {nrow}")
    ivar = np.empty((nrow, ncol), np.float32)
    ifloor = np.empty((nrow, ncol), np.float32)
    resid = np.empty((nrow, ncol), np.float32)
    _pixel_terms(image, variance, bad, model, rvar, _DATA_VARIANCE, ivar, ifloor, resid)
    _sweep(first_row, weights, ivar, ifloor, resid, flux, den, den0, num, frac, False)
    niter = max(int(niter), 1)
    for i in range(niter):
        # model of all fibers, then each fiber refitted against the others' model with
        # the model variance
        _model(first_row, weights, flux, model)
        if row_segments is not None and i == niter - 1:
            # measured once, before the last sweep. The model's fluxes already hold part of
            # the offsets (a synthetic 0.1 e- offset is found ~15 % low); measuring again
            # before a further sweep recovers that, but on the simulated nights it moved
            # the mean flux error of the fibers by -0.6 % (uv) to +0.1 % (orange) of the
            # sky, the gaps' residual of the profile wings adding up, for a 3 % smaller
            # scatter, so it is not done
            # ``ifloor`` is scratch until the pixel terms below fill it again
            offset = _row_offsets(image, variance, model, bad, first_row, weights, rvar, rmode,
                                  row_segments, scratch=ifloor)
            # the image less the offsets goes into ``resid``, which the pixel terms then
            # overwrite pixel by pixel (each read before it is written): no frame copy
            image = np.subtract(image, offset, out=resid)
        _pixel_terms(image, variance, bad, model, rvar, rmode, ivar, ifloor, resid)
        _sweep(first_row, weights, ivar, ifloor, resid, flux, den, den0, num, frac,
               i == niter - 1)
    var = np.divide(1.0, den, out=np.zeros_like(den), where=den > 0)
    var0 = np.divide(1.0, den0, out=np.zeros_like(den0), where=den0 > 0)
    return Extraction(flux, var, frac, offset, var0)


def _row_offsets(image, variance, model, bad, first_row, weights, rvar, rmode, segments,
                 nblock: int = OFFSET_COLUMN_BLOCKS, scratch: np.ndarray | None = None
                 ) -> np.ndarray:
    """Additive offset of every pixel, measured on the pixels between fibers.

    The residual ``image - model`` of pixels where the fibers' summed profile is below
    :data:`GAP_PROFILE` and the model below :data:`GAP_MODEL` read-noise sigma is fitted
    as ``offset + beta * model``: one offset per row and block of columns (``nblock``
    blocks), Gaussian-smoothed over :data:`ROW_OFFSET_SMOOTH` rows within each segment
    with a prior of :data:`ROW_OFFSET_PRIOR` e- (rows without gap pixels fall back towards
    0) and interpolated linearly between the blocks' centres, and one ``beta`` for the
    whole frame, which absorbs a small error of the profile wings. Pixels beyond
    :data:`ROW_OFFSET_CLIP` sigma are rejected; :data:`ROW_OFFSET_ROUNDS` rounds.
    Arguments as in :func:`optimal` (``rvar``/``rmode`` encode ``read_variance``);
    ``scratch``, an (nrow, ncol) float32 array whose content may be overwritten, saves a
    frame-sized allocation. Returns an (nrow, ncol) float32 image.
    """
    nrow, ncol = image.shape
    nblock = max(1, min(int(nblock), ncol))
    psum = np.empty(image.shape, np.float32) if scratch is None else scratch
    _model(first_row, weights, np.ones(weights.shape[::2]), psum)
    block_offset = np.zeros((nrow, nblock))
    k, t = _block_interpolation(nblock, ncol)
    beta = 0.0
    num = np.zeros((nrow, nblock))
    den = np.zeros((nrow, nblock))
    prior = 1.0 / ROW_OFFSET_PRIOR**2
    kernel = np.sqrt(2 * np.pi) * ROW_OFFSET_SMOOTH  # sum of the unnormalised Gaussian
    clip = np.inf
    for _ in range(ROW_OFFSET_ROUNDS):
        bsum = _gap_sums(image, variance, model, psum, bad, rvar, rmode, block_offset, k, t,
                         beta, clip, num, den, GAP_PROFILE, GAP_MODEL)
        for lo, hi in itertools.pairwise(segments):
            n = gaussian_filter1d(num[lo:hi], ROW_OFFSET_SMOOTH, axis=0, mode="constant")
            d = gaussian_filter1d(den[lo:hi], ROW_OFFSET_SMOOTH, axis=0, mode="constant")
            block_offset[lo:hi] = n * kernel / (d * kernel + prior)
        if not np.all(np.isfinite(block_offset)):
            log.warning("row offsets not finite; none subtracted")
            return np.zeros((nrow, ncol), np.float32)
        beta = bsum[0] / bsum[1] if bsum[1] > 0 else 0.0
        clip = ROW_OFFSET_CLIP
    return _across_columns(block_offset, ncol)


def _block_interpolation(nblock: int, ncol: int) -> tuple[np.ndarray, np.ndarray]:
    """Left block ``k`` and weight ``t`` of the right one at every column, for values of
    ``nblock`` column blocks interpolated linearly between the blocks' centres (constant
    beyond the outer centres); k = 0, t = 0 with one block."""
    if nblock == 1:
        return np.zeros(ncol, np.int64), np.zeros(ncol)
    centres = (np.arange(nblock) + 0.5) * ncol / nblock
    cols = np.arange(ncol)
    k = np.clip(np.searchsorted(centres, cols) - 1, 0, nblock - 2)
    t = np.clip((cols - centres[k]) / (centres[k + 1] - centres[k]), 0.0, 1.0)
    return k.astype(np.int64), t


def _across_columns(block_offset: np.ndarray, ncol: int) -> np.ndarray:
    """(nrow, ncol) float32 image of per-block values interpolated between the blocks'
    centres (see :func:`_block_interpolation`)."""
    k, t = _block_interpolation(block_offset.shape[1], ncol)
    return _blend(np.ascontiguousarray(block_offset, float), k, t)


@njit(cache=True, nogil=True)
def _blend(block_offset, k, t):
    """``block_offset[:, k] * (1 - t) + block_offset[:, k + 1] * t`` as float32."""
    nrow, ncol = block_offset.shape[0], k.size
    out = np.empty((nrow, ncol), np.float32)
    for r in range(nrow):
        for c in range(ncol):
            out[r, c] = _blended(block_offset, k, t, r, c)
    return out


@njit(cache=True, nogil=True, inline="always")
def _blended(block_offset, k, t, r, c):
    """One value of :func:`_blend`."""
    if block_offset.shape[1] == 1:
        return block_offset[r, 0]
    return block_offset[r, k[c]] * (1 - t[c]) + block_offset[r, k[c] + 1] * t[c]


@njit(cache=True, nogil=True)
def _gap_sums(image, variance, model, psum, bad, rvar, rmode, block_offset, k, t, beta, clip,
              num, den, gap_profile, gap_model):
    """Inverse-variance sums per row and block of columns of ``image - model - beta *
    model`` over the gap pixels within ``clip`` sigma of the current fit (``num``, ``den``
    (nrow, nblock) filled in place), and the sums for ``beta``: (sum w m (r - offset),
    sum w m^2). The current offset is ``block_offset`` interpolated with ``k``, ``t``
    (:func:`_block_interpolation`)."""
    nrow, ncol = image.shape
    nblock = num.shape[1]
    num[:] = 0
    den[:] = 0
    bnum = 0.0
    bden = 0.0
    for r in range(nrow):
        for c in range(ncol):
            if bad[r, c] or psum[r, c] >= gap_profile:
                continue
            if not variance[r, c] > 0 or not np.isfinite(image[r, c]):
                continue
            if rmode == 0:
                floor = max(variance[r, c] - max(image[r, c], 0.0), 1.0)
            elif rmode == 1:
                floor = rvar[0, 0]
            else:
                floor = rvar[r, c]
            m = model[r, c]
            if not floor > 0 or not m * m < gap_model * gap_model * floor:  # NaN too
                continue
            v = floor + max(m, 0.0)
            res = image[r, c] - m
            off = _blended(block_offset, k, t, r, c)
            d = res - beta * m - off
            if d * d > clip * clip * v:
                continue
            w = 1.0 / v
            b = c * nblock // ncol
            num[r, b] += w * (res - beta * m)
            den[r, b] += w
            bnum += w * m * (res - off)
            bden += w * m * m
    return bnum, bden


#: ``_sweep`` mode of the first sweep: each fiber alone, weighted by the data's variance.
_DATA_VARIANCE = -1


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
def _pixel_terms(image, variance, bad, model, rvar, mode, ivar, ifloor, resid):
    """Per-pixel terms of a sweep, filled in place: ``ivar = 1 / (floor + max(model, 0))``,
    ``ifloor = 1 / floor`` and ``resid = image - model`` (all 0 on bad pixels and pixels
    without a positive variance). ``mode`` picks the floor: the data's variance
    (:data:`_DATA_VARIANCE`), the variance less the signal (0), one value (1) or per
    pixel (2)."""
    nrow, ncol = image.shape
    for r in range(nrow):
        for c in range(ncol):
            v = variance[r, c]
            if not v > 0 or bad[r, c]:
                ivar[r, c] = 0.0
                ifloor[r, c] = 0.0
                resid[r, c] = 0.0
                continue
            if mode == _DATA_VARIANCE:
                floor = v
            elif mode == 0:
                floor = max(v - max(image[r, c], np.float32(0.0)), np.float32(1.0))
            elif mode == 1:
                floor = rvar[0, 0]
            else:
                floor = rvar[r, c]
            m = model[r, c]
            ivar[r, c] = 1.0 / (floor + max(m, np.float32(0.0)))
            ifloor[r, c] = 1.0 / floor
            resid[r, c] = image[r, c] - m


@njit(cache=True, nogil=True)
def _sweep(first_row, weights, ivar, ifloor, resid, flux, den, den0, num, frac, final):
    """One Jacobi sweep: every fiber fitted against the data less the others' model, from
    the pixel terms of :func:`_pixel_terms`; updates ``flux`` and ``den``, ``num`` in place,
    and with ``final`` also ``frac`` (profile weight on good pixels) and ``den0``
    (``sum(P^2 / floor)``)."""
    nrow, ncol = ivar.shape
    den[:] = 0
    num[:] = 0
    if final:
        den0[:] = 0
        frac[:] = 0
    for f in range(weights.shape[0]):
        for j in range(weights.shape[1]):
            for c in range(ncol):
                r = first_row[f, c] + j
                if r < 0 or r >= nrow:
                    continue
                p = weights[f, j, c]
                pw = p * ivar[r, c]
                den[f, c] += pw * p
                num[f, c] += pw * (resid[r, c] + np.float32(flux[f, c]) * p)
                if final and ivar[r, c] > 0:
                    frac[f, c] += p
                    den0[f, c] += p * p * ifloor[r, c]
    for f in range(weights.shape[0]):
        for c in range(ncol):
            flux[f, c] = num[f, c] / den[f, c] if den[f, c] > 0 else 0.0
