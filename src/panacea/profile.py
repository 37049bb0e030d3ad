"""Empirical cross-dispersion profiles of the fibers, for optimal extraction.

The profile of fiber ``f`` at column ``c`` is its *effective* (pixel-integrated) profile
``P_fc(u)``: the fraction of the fiber's light at that column that falls in a pixel whose
centre lies ``u`` rows from the trace. Its values one pixel apart sum to 1 whatever the
trace's sub-pixel phase, so ``image[r, c] ~ sum_f F_f(c) P_fc(r - trace_f(c)) + B`` with
``F`` the fiber's electrons per column and ``B`` a slowly varying background.

:func:`build_profile` measures ``P`` from a bright continuum frame (master twilight or
flat), using every ``column_step``-th column:

1. A background is measured in the unlit margins of each amplifier and subtracted
   (:func:`margin_background`).
2. Each fiber's flux at every column is fitted with the current profile after the model
   of all other fibers has been subtracted (Jacobi sweeps); the first profile is a
   pixel-integrated Gaussian of the trace solution's sigma.
3. ``(pixel - other fibers) / flux`` is stacked at its offset from the trace in fine bins
   (0.05 px) for every group of neighbouring fibers (pooling fibers fills the sub-pixel
   phases) and block of columns.
4. Every group and block is fitted with ``P(u) = C(u) + a W(u)``: ``C`` a cubic B-spline
   (knots every :data:`KNOT_STEP` px) confined to ``|u| < u_c`` (about half the fiber
   pitch), ``W`` a smooth, symmetric wing template for the channel, fitted to the pixels
   nearer to their own fiber than to any lit neighbour's core (beyond ``u_c`` these are
   the unlit sides of fibers at the ends of an amplifier or next to a dead fiber). Only
   pixels out to ``u_c`` + :data:`FIT_MARGIN` enter this fit.
5. The group x block profiles are smoothed by polynomials in fiber index (per amplifier)
   and in column, sampled at node columns spanning the frame, averaged with the previous
   iterate (:data:`DAMPING`) and scaled so that values one pixel apart sum to 1.
6. Steps 2-5 are repeated.

Why the wing is constrained and the updates damped: in a frame where every fiber is lit
and the pitch is regular, the image does not change if every profile gains copies of
itself one pitch away while every fiber's flux drops by the light so moved, nor if light
between two fibers is moved from one fiber's tail to the other's. The fully lit frame
does not determine those parts of the profile; only unlit sides and the irregularity of
the pitch do. Confining the free part of the profile to the core and taking the wing's
shape from the unlit sides removes the first ambiguity. The iteration between
neighbouring fibers makes errors in the shared region change sign from one iteration to
the next; damping cancels that.

:class:`FiberProfile` holds ``P`` of every fiber at the node columns on a fine grid of
offsets, evaluates it at any fiber, column (linear interpolation between nodes) and
offset, and gives the pixel weights of every fiber around its trace
(:meth:`FiberProfile.weights`) for Horne-style extraction. :func:`trace_and_profile` runs
tracing, profile and trace refinement in one call.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import numpy as np
from numba import njit
from numpy.polynomial import legendre
from scipy.ndimage import uniform_filter1d

from panacea.trace import (
    PreparedFrame,
    TraceSolution,
    _amp_layout,
    _prepare,
    estimate_variance,
    gauss_pixel,
    prepare_frame,
    refine_trace,
    trace_fibers,
)

log = logging.getLogger(__name__)

#: Default half-width (px) of the profile's support.
HALF_WIDTH = 8.0
#: Spacing (px) of the grid on which :class:`FiberProfile` stores the profile.
GRID_STEP = 0.05
#: Knot spacing (px) of the B-spline of the profile core.
KNOT_STEP = 0.4
#: Knot spacing (px) of the B-spline of the wing template.
WING_KNOT_STEP = 0.5
#: Width (px) of the fine offset bins in which pixels are stacked.
FINE_STEP = 0.05
#: Default number of column blocks in which the profile is measured.
NBLOCK = 8
#: Default number of neighbouring fibers pooled into one profile measurement.
GROUP_SIZE = 10
#: Degrees of the polynomials in fiber index (per amplifier) and in column that smooth the
#: measured profiles.
FIBER_DEGREE = 3
COLUMN_DEGREE = 3
#: Core half-width in units of the median fiber pitch.
CORE_FRACTION = 0.55
#: The core fit of a group uses stacked pixels out to this far (px) beyond the core.
FIT_MARGIN = 0.5
#: Jacobi sweeps of the fiber fluxes per profile iteration.
NSWEEP = 2
#: Weight of the previous profile in each update (damps the oscillation between
#: neighbouring fibers, see the module notes).
DAMPING = 0.5
#: Relative weight of the curvature penalty of the B-spline fits.
SMOOTHING = 1e-6


@dataclass
class FiberProfile:
    """Empirical cross-dispersion profile of every fiber, varying smoothly with column.

    Attributes
    ----------
    table : ndarray of float64, shape (nfibers, nnode, ngrid)
        Profile (fraction of the fiber's light per pixel) at offsets
        ``-half_width + grid_step * i`` from the trace, for every fiber at every node
        column. Each row integrates to 1 over the offsets.
    grid_step : float
        Offset step of ``table`` (px).
    half_width : float
        The profile is zero for ``|u| >= half_width`` (px).
    node_columns : ndarray of float64, shape (nnode,)
        Columns of the nodes; between them the profile is interpolated linearly, beyond
        them it is held constant.
    dead : ndarray of bool, shape (nfibers,)
        Dead fiber slots (their profile is interpolated from the neighbours).
    amp_rows : int
        Rows per amplifier strip; a fiber's weights never cross its strip.
    fibers_per_amp : int
        Fiber slots per amplifier strip.
    """

    table: np.ndarray
    grid_step: float
    half_width: float
    node_columns: np.ndarray
    dead: np.ndarray
    amp_rows: int
    fibers_per_amp: int

    @property
    def nfibers(self) -> int:
        """Number of fiber slots."""
        return self.table.shape[0]

    @property
    def offsets(self) -> np.ndarray:
        """Offsets (px) of the last axis of :attr:`table`."""
        return -self.half_width + self.grid_step * np.arange(self.table.shape[2])

    def locate(self, fibers: np.ndarray, columns: np.ndarray, offsets: np.ndarray) -> tuple:
        """Interpolation indices and weights for :meth:`interpolate` (broadcast inputs).

        Useful when the same pixels are evaluated for several profiles of equal shape.
        """
        fibers = np.asarray(fibers)
        columns = np.asarray(columns, dtype=float)
        offsets = np.asarray(offsets, dtype=float)
        nnode, ngrid = self.table.shape[1:]
        npos = np.interp(columns, self.node_columns, np.arange(nnode, dtype=float))
        k0 = np.minimum(np.floor(npos).astype(np.int64), max(nnode - 2, 0))
        a = npos - k0
        s = (offsets + self.half_width) / self.grid_step
        inside = (s >= 0) & (s <= ngrid - 1)
        i = np.clip(np.floor(s).astype(np.int64), 0, ngrid - 2)
        t = np.where(inside, s - i, 0.0)
        base = (fibers * nnode + k0) * ngrid + i
        # every position spelled out (a is per column): the lookups run over flat arrays
        return tuple(np.ascontiguousarray(x) for x in np.broadcast_arrays(base, a, t, inside))

    def interpolate(self, where: tuple, derivative: bool = False):
        """Profile values (and ``dP/du`` per px) at positions from :meth:`locate`."""
        base, a, t, inside = np.broadcast_arrays(*where)
        value, slope = _interpolate_kernel(
            np.ascontiguousarray(self.table, np.float64).reshape(-1), base.ravel(),
            a.ravel(), t.ravel(), inside.ravel(), self.table.shape[2],
            self.table.shape[1] > 1, float(self.grid_step), derivative)
        if derivative:
            return value.reshape(base.shape), slope.reshape(base.shape)
        return value.reshape(base.shape)

    def evaluate(self, fibers: np.ndarray, columns: np.ndarray, offsets: np.ndarray,
                 derivative: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Profile value (fraction of the fiber's light per pixel) at given offsets.

        Parameters
        ----------
        fibers : ndarray of int
            Fiber slot indices; broadcast against ``columns`` and ``offsets``.
        columns : ndarray of float
            Columns (px).
        offsets : ndarray of float
            Pixel centre minus trace (px).
        derivative : bool
            Also return ``dP/du`` (per px).

        Returns
        -------
        value : ndarray
            ``P`` at every broadcast point (zero outside the support).
        slope : ndarray
            ``dP/du`` (per px), when ``derivative`` is True.
        """
        fibers, columns, offsets = np.broadcast_arrays(
            np.asarray(fibers, np.int64), np.asarray(columns, float), np.asarray(offsets, float))
        nnode = self.table.shape[1]
        npos = np.interp(columns.ravel(), self.node_columns, np.arange(nnode, dtype=float))
        value, slope = _evaluate_kernel(np.ascontiguousarray(self.table, np.float64),
                                        fibers.ravel(), npos, offsets.ravel(),
                                        float(self.half_width), float(self.grid_step))
        if derivative:
            return value.reshape(offsets.shape), slope.reshape(offsets.shape)
        return value.reshape(offsets.shape)

    def sample(self, columns: np.ndarray | None = None, step: float = 0.1
               ) -> tuple[np.ndarray, np.ndarray]:
        """The profile of every fiber on a grid of offsets at some columns.

        Parameters
        ----------
        columns : ndarray, optional
            Columns (default: the node columns).
        step : float
            Offset step (px).

        Returns
        -------
        offsets : ndarray, shape (noff,)
            Offsets (px) from ``-half_width`` to ``+half_width`` in steps of ``step``.
        values : ndarray, shape (nfibers, ncolumns, noff)
            Profile values (fraction of light per pixel).
        """
        columns = self.node_columns if columns is None else np.atleast_1d(columns)
        offsets = np.arange(-self.half_width, self.half_width + step / 2, step)
        values = self.evaluate(np.arange(self.nfibers)[:, None, None],
                               np.asarray(columns, float)[None, :, None],
                               offsets[None, None, :])
        return offsets, values

    def weights(self, trace: np.ndarray, columns: slice | np.ndarray | None = None,
                half_rows: int | None = None, normalize: bool = True
                ) -> tuple[np.ndarray, np.ndarray]:
        """Pixel weights of every fiber at the rows around its trace.

        Parameters
        ----------
        trace : ndarray, shape (nfibers, ncol)
            Trace rows (e.g. ``TraceSolution.trace``, shifted for a science frame).
        columns : slice or ndarray of int, optional
            Columns to evaluate (default all columns of ``trace``).
        half_rows : int, optional
            Rows on each side of the trace's nearest row (default ``ceil(half_width)``).
        normalize : bool
            Scale the weights of every fiber and column to sum to 1 over its rows.

        Returns
        -------
        first_row : ndarray of int, shape (nfibers, ncols)
            Stitched row of the first pixel of each fiber's window
            (``round(trace) - half_rows``).
        weights : ndarray of float32, shape (nfibers, 2*half_rows+1, ncols)
            Fraction of the fiber's light in each window row; zero for rows outside the
            fiber's amplifier strip.
        """
        trace = np.asarray(trace, dtype=np.float64)
        cols = np.arange(trace.shape[1])[columns if columns is not None else slice(None)]
        h = int(np.ceil(self.half_width)) if half_rows is None else int(half_rows)
        y = np.ascontiguousarray(trace[:, cols])
        nnode = self.table.shape[1]
        npos = np.interp(cols.astype(float), self.node_columns, np.arange(nnode, dtype=float))
        k0 = np.minimum(np.floor(npos).astype(np.int64), max(nnode - 2, 0))
        first = np.round(y).astype(np.int64) - h
        w = _weights_kernel(np.ascontiguousarray(self.table, np.float64), y, first, k0,
                            npos - k0, 2 * h + 1, self.half_width, self.grid_step,
                            self.fibers_per_amp, self.amp_rows, normalize)
        return first, w


    def to_array(self) -> np.ndarray:
        """The profile table as float32 (nfibers, nnode, ngrid), for a calibration file.

        :meth:`from_array` rebuilds the profile from it with the frame's column count and
        amplifier layout (node columns and offsets are evenly spaced).
        """
        return self.table.astype(np.float32)

    @classmethod
    def from_array(cls, table: np.ndarray, ncol: int, amp_rows: int, fibers_per_amp: int,
                   half_width: float = HALF_WIDTH, dead: np.ndarray | None = None
                   ) -> FiberProfile:
        """Rebuild a profile written by :meth:`to_array`.

        Parameters
        ----------
        table : ndarray, shape (nfibers, nnode, ngrid)
            Profile values on ``ngrid`` offsets evenly spaced over ``+-half_width`` at
            ``nnode`` node columns evenly spaced over ``0 .. ncol-1``.
        ncol, amp_rows, fibers_per_amp : int
            Frame columns, rows per amplifier strip and fiber slots per strip.
        half_width : float
            Support of the profile (px).
        dead : ndarray of bool, optional
            Dead fiber slots.
        """
        table = np.asarray(table, dtype=np.float64)
        nfib, nnode, ngrid = table.shape
        dead = np.zeros(nfib, bool) if dead is None else np.asarray(dead, bool)
        return cls(table, 2 * half_width / (ngrid - 1), half_width,
                   np.linspace(0, ncol - 1, nnode), dead, amp_rows, fibers_per_amp)


# --------------------------------------------------------------------------- B-splines


def _bspline(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Uniform cubic B-spline: interval index ``j`` and the 4 non-zero basis values.

    ``s`` is the position in knot units from the first knot; the basis functions that
    are non-zero there are ``j .. j+3`` (basis ``i`` covers ``[i-3, i+1)``).
    """
    j = np.floor(s).astype(np.int64)
    t = s - j
    t2 = t * t
    t3 = t2 * t
    b = np.stack([(1 - t) ** 3 / 6, (3 * t3 - 6 * t2 + 4) / 6,
                  (-3 * t3 + 3 * t2 + 3 * t + 1) / 6, t3 / 6], axis=-1)
    return j, b


def _design(x: np.ndarray, lo: float, step: float, nknot: int, clamp: int = 3) -> np.ndarray:
    """Dense cubic B-spline design matrix on ``[lo, lo + nknot*step]``, zero outside.

    The first and last ``clamp`` basis functions (which reach outside the interval) are
    dropped, so the spline and its first two derivatives vanish at the ends when
    ``clamp`` is 3. Returns shape ``x.shape + (nknot + 3 - 2*clamp,)``.
    """
    s = (np.asarray(x, float) - lo) / step
    inside = (s >= 0) & (s < nknot)
    j, b = _bspline(np.where(inside, s, 0.0))
    out = np.zeros(s.shape + (nknot + 3,))
    for m in range(4):
        np.put_along_axis(out, (j + m)[..., None], np.where(inside, b[..., m], 0.0)[..., None],
                          axis=-1)
    return out[..., clamp: nknot + 3 - clamp]


def _penalised_solve(normal: np.ndarray, rhs: np.ndarray, npen: int) -> np.ndarray:
    """Solve batched normal equations with a small curvature penalty (:data:`SMOOTHING`
    times the mean diagonal) on the first ``npen`` unknowns (spline coefficients)."""
    p = normal.shape[-1]
    d2 = np.diff(np.eye(npen), 2, axis=0)
    pen = np.zeros((p, p))
    pen[:npen, :npen] = d2.T @ d2
    diag = np.diagonal(normal, axis1=-2, axis2=-1)
    scale = np.maximum(np.mean(diag, axis=-1), 1e-300)[..., None, None]
    a = normal + SMOOTHING * scale * pen + 1e-10 * scale * np.eye(p)
    return np.linalg.solve(a, rhs[..., None])[..., 0]


# --------------------------------------------------------------------------- fitting


@njit(cache=True, nogil=True)
def _others_kernel(nrow, ncol, rows, cols, inside, own):
    """The light of the other fibers in every window pixel: ``own`` (nfib, ncols, nwin) of
    the pixels ``inside`` summed into a (nrow, ncol) image at (rows, cols), that image at
    (rows, cols), minus ``own``.

    Each image pixel adds its terms in fiber order, as np.bincount over the flat inputs
    does when ``cols`` depends on the column index only, as in :func:`build_profile` (the
    loops run column by column and the image is stored by column, for memory locality)."""
    image = np.zeros(ncol * nrow)
    n0, n1, n2 = own.shape
    for j in range(n1):
        for i in range(n0):
            for k in range(n2):
                if inside[i, j, k]:
                    image[cols[i, j, k] * nrow + rows[i, j, k]] += own[i, j, k]
    out = np.empty((n0, n1, n2))
    for i in range(n0):
        for j in range(n1):
            for k in range(n2):
                out[i, j, k] = image[cols[i, j, k] * nrow + rows[i, j, k]] - own[i, j, k]
    return out


def _solve_flux(d: np.ndarray, w: np.ndarray, prof: np.ndarray) -> np.ndarray:
    """Weighted least-squares amplitude of ``prof`` in ``d`` over the last axis."""
    wp = w * prof
    s_pp = np.einsum("...i,...i->...", wp, prof)
    s_pd = np.einsum("...i,...i->...", wp, d)
    return np.divide(s_pd, s_pp, out=np.zeros_like(s_pp), where=s_pp > 0)


def fit_fluxes(data: np.ndarray, weight: np.ndarray, prof: np.ndarray, rows: np.ndarray,
               cols: np.ndarray, inside: np.ndarray, shape: tuple, nsweep: int = 2,
               others: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Flux of every fiber window with the neighbours deblended (Jacobi sweeps).

    Parameters
    ----------
    data, weight, prof : ndarray, shape (nfib, ncols, nwin)
        Background-subtracted pixel values (e-), inverse variances (0 = unused) and
        profile values of every fiber's window at every column.
    rows, cols : ndarray of int, same shape
        Frame coordinates of the window pixels.
    inside : ndarray of bool, same shape
        Window pixels on the fiber's amplifier.
    shape : tuple
        (nrow, ncol) of the frame.
    nsweep : int
        Jacobi sweeps (each subtracts the current model of the other fibers).
    others : ndarray, optional
        Starting light of the other fibers in every window pixel.

    Returns
    -------
    flux, others : ndarray
        Flux (e- per column, shape (nfib, ncols)) and the light of the other fibers in
        every window pixel (nfib, ncols, nwin).
    """
    others = np.zeros_like(data) if others is None else others
    flux = None
    for _ in range(nsweep):
        flux = _solve_flux(data - others, weight, prof)
        own = flux[..., None] * prof
        others = _others_kernel(shape[0], shape[1], rows, cols, inside, own)
    return flux, others


def margin_background(image: np.ndarray, good: np.ndarray, trace: np.ndarray,
                      dead: np.ndarray, amp_rows: int, per_amp: int, clearance: float,
                      smooth: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Background below the fibers from the unlit margins of every amplifier.

    For every amplifier and column, the median of the rows farther than ``clearance``
    from the outermost lit traces (at any column) is taken in the bottom and top margins,
    smoothed along columns, and interpolated linearly in row between the two margins
    (constant if only one margin exists, zero if none).

    Parameters
    ----------
    image, good : ndarray, shape (nrow, ncols)
        Frame (e-) and its usable pixels (any subset of columns).
    trace : ndarray, shape (nfibers, ncols)
        Traces at the same columns.
    dead : ndarray of bool, shape (nfibers,)
        Dead fiber slots.
    amp_rows, per_amp : int
        Rows and fiber slots per amplifier.
    clearance : float
        Minimum distance (rows) of a margin pixel from the outermost traces.
    smooth : int
        Columns of the running mean along the dispersion axis.

    Returns
    -------
    level, slope : ndarray, shape (namp, ncols)
        Background (e- per pixel) at the amplifier's first row and its gradient per row.
    """
    namp = image.shape[0] // amp_rows
    ncols = image.shape[1]
    level = np.zeros((namp, ncols))
    slope = np.zeros((namp, ncols))
    for a in range(namp):
        lo, hi = a * amp_rows, (a + 1) * amp_rows
        fib = np.arange(a * per_amp, (a + 1) * per_amp)
        lit = fib[~dead[fib]]
        if lit.size == 0:
            continue
        first = min(max(int(np.floor(trace[lit].min() - clearance)), lo), hi)
        last = max(min(int(np.ceil(trace[lit].max() + clearance)) + 1, hi), lo)
        levels, centres = [], []
        for rows in (slice(lo, first), slice(last, hi)):
            if rows.stop - rows.start < 3:
                continue
            sub = image[rows]
            ok = good[rows]
            if ok.all():
                med = np.median(sub, axis=0)
            else:
                with np.errstate(all="ignore"):
                    med = np.nanmedian(np.where(ok, sub, np.nan), axis=0)
                med = np.where(np.isfinite(med), med, 0.0)
            levels.append(uniform_filter1d(med, smooth, mode="nearest"))
            centres.append(0.5 * (rows.start + rows.stop - 1))
        if not levels:
            log.warning("amplifier %d has no unlit margin: no background subtracted", a)
            continue
        if len(levels) == 1:
            level[a] = levels[0]
            continue
        slope[a] = (levels[1] - levels[0]) / (centres[1] - centres[0])
        level[a] = levels[0] - slope[a] * (centres[0] - lo)
    return level, slope


def _fine_stack(value, wsum, u, key, nkey, lo, hi):
    """Weighted means of ``value`` and ``u`` in fine offset bins for every key.

    Returns (mean value, mean offset, summed weight), each of shape (nkey, nfine).
    """
    nfine = round((hi - lo) / FINE_STEP)
    size = nkey * nfine
    value, wsum, u, key = (np.reshape(x, (1, 1, -1)) if np.ndim(x) == 1 else x
                           for x in np.broadcast_arrays(value, wsum, u, key))
    den, num, su = _fine_sums(value, wsum, u, key, nfine, size, float(lo), FINE_STEP)
    has = den > 0
    centres = lo + FINE_STEP * (np.arange(nfine) + 0.5)
    mean_u = np.where(has, su / np.where(has, den, 1), np.tile(centres, nkey))
    mean_v = np.divide(num, den, out=np.zeros(size), where=has)
    return (mean_v.reshape(nkey, nfine), mean_u.reshape(nkey, nfine),
            den.reshape(nkey, nfine))


def _wing_template(v, wsum, u, clean, half_width):
    """Symmetric wing template ``W(|u|)`` on [0, half_width] from the clean samples.

    Returns a callable evaluating W at any offsets (zero beyond ``half_width``) and the
    largest offset (px) at which clean samples were found.
    """
    au = np.abs(u)
    sel = clean & (wsum > 0)
    mv, mu, den = _fine_stack(v[sel], wsum[sel], au[sel], np.zeros(np.count_nonzero(sel),
                              np.int64), 1, 0.0, half_width)
    nknot = round(half_width / WING_KNOT_STEP)
    # clamp only the outer end: the spline and two derivatives vanish at half_width
    x = _design(mu[0], -3 * WING_KNOT_STEP, WING_KNOT_STEP, nknot + 3, clamp=0)
    x = x[:, : x.shape[1] - 3]
    normal = np.einsum("fi,f,fj->ij", x, den[0], x)
    rhs = np.einsum("fi,f,f->i", x, den[0], mv[0])
    coef = _penalised_solve(normal, rhs, x.shape[1])
    reach = float(mu[0][den[0] > 0].max()) if np.any(den[0] > 0) else 0.0

    def wing(offsets: np.ndarray) -> np.ndarray:
        xo = _design(np.abs(offsets), -3 * WING_KNOT_STEP, WING_KNOT_STEP, nknot + 3,
                     clamp=0)
        return xo[..., : xo.shape[-1] - 3] @ coef

    return wing, reach


def profile_columns(ncol: int, column_step: int = 6) -> np.ndarray:
    """Columns :func:`build_profile` samples: every ``column_step``-th from the middle of
    the first step."""
    return np.arange(column_step // 2, ncol, column_step)


def build_profile(
    image: np.ndarray,
    variance: np.ndarray | None,
    solution: TraceSolution,
    mask: np.ndarray | None = None,
    amp_rows: int | None = None,
    nblock: int = NBLOCK,
    group_size: int = GROUP_SIZE,
    half_width: float = HALF_WIDTH,
    column_step: int = 6,
    niter: int = 3,
    symmetric: bool = False,
    prepared: PreparedFrame | None = None,
) -> FiberProfile:
    """Measure the empirical cross-dispersion profile of every fiber.

    Parameters
    ----------
    image : ndarray, shape (nrow, ncol)
        Bright continuum frame (e-), e.g. a master twilight, bias-subtracted. A smooth
        background measured in the unlit margins of each amplifier is subtracted
        (:func:`margin_background`).
    variance : ndarray, shape (nrow, ncol) or None
        Its variance (e-^2); estimated from the image when None.
    solution : TraceSolution
        Traces of ``image``.
    mask : ndarray, optional
        Non-zero for pixels to ignore.
    amp_rows : int, optional
        Rows per amplifier strip (default half the frame).
    nblock : int
        Column blocks in which the profile is measured.
    group_size : int
        Neighbouring fibers pooled into one profile measurement.
    half_width : float
        Support of the profile (px either side of the trace).
    column_step : int
        Use every ``column_step``-th column (the profile varies slowly along columns).
    niter : int
        Refinements of the profile after the Gaussian start.
    symmetric : bool
        Force ``P(u) = P(-u)``. An odd part of the measured profile is partly the error
        of the traces it was measured along.
    prepared : PreparedFrame, optional
        The frame's :func:`panacea.trace.prepare_frame` with its variance given, when the
        caller has it (its sampled columns are taken from it: the same values).

    Returns
    -------
    FiberProfile
        Smoothed across fibers (polynomial of degree :data:`FIBER_DEGREE` in fiber index
        per amplifier) and columns (degree :data:`COLUMN_DEGREE`), sampled at
        ``2 * nblock + 1`` node columns spanning the frame.
    """
    img = np.asarray(image)
    nrow, ncol = img.shape
    if variance is None:
        variance = estimate_variance(img)
    if np.shape(variance) != img.shape or (mask is not None and np.shape(mask) != img.shape):
        raise ValueError("image, variance and mask shapes differ")
    nfib = solution.nfibers
    amp_rows, _, per_amp = _amp_layout(nrow, nfib, amp_rows)
    dead = solution.dead
    fibers = np.arange(nfib)
    amp_lo = (fibers // per_amp) * amp_rows
    cols = profile_columns(ncol, column_step)
    h = int(np.ceil(half_width))

    # every fiber's window of rows at every sampled column
    y = solution.trace[:, cols]
    rows = np.round(y).astype(np.int64)[..., None] + np.arange(-h, h + 1)
    lo3, hi3 = amp_lo[:, None, None], amp_lo[:, None, None] + amp_rows
    inside = (rows >= lo3) & (rows < hi3)
    rows = np.clip(rows, lo3, hi3 - 1)
    u = rows - y[..., None]
    sampled = (prepared.columns(cols) if prepared is not None and prepared.given_variance
               and prepared.ok.shape == img.shape else None)
    if sampled is not None:
        # _prepare is elementwise: its columns are those of the whole frame's
        sub_img, sub_var, sub_good = sampled
    else:
        sub_img, sub_var, sub_good = _prepare(
            img[:, cols], np.asarray(variance)[:, cols],
            None if mask is None else np.asarray(mask)[:, cols])
    level, slope = margin_background(sub_img, sub_good, solution.trace[:, cols], dead,
                                     amp_rows, per_amp, half_width + 1)
    amp_of = fibers // per_amp
    sub_cols = np.broadcast_to(np.arange(cols.size)[None, :, None], rows.shape)
    data, weight = _window_pixels(sub_img, sub_var, sub_good, rows, inside, amp_lo, level,
                                  slope, amp_of, dead)

    # pixels nearer to their own fiber than to any lit neighbour's core
    pitch = np.nanmedian(np.abs(np.diff(solution.trace[~dead, ncol // 2])))
    u_core = np.round(CORE_FRACTION * pitch / KNOT_STEP) * KNOT_STEP
    gap_lo, gap_hi = _neighbour_distance(y, dead, per_amp)
    clean = np.where(u < 0, -u < gap_lo[..., None] - u_core, u < gap_hi[..., None] - u_core)

    # groups of neighbouring fibers (never across amplifiers) and column blocks
    ngroup_amp = int(np.ceil(per_amp / group_size))
    group = (fibers % per_amp) // group_size + (fibers // per_amp) * ngroup_amp
    ngroup = int(group.max()) + 1
    block_of_col = np.minimum(cols * nblock // ncol, nblock - 1)
    block_columns = np.array([cols[block_of_col == k].mean() for k in range(nblock)])
    key = np.broadcast_to((group[:, None] * nblock + block_of_col[None, :])[..., None],
                          u.shape)
    grid = np.arange(-half_width, half_width + GRID_STEP / 2, GRID_STEP)
    nodes = np.linspace(0, ncol - 1, 2 * nblock + 1)

    sigma = np.where(np.isfinite(solution.sigma), solution.sigma,
                     np.nanmedian(solution.sigma))
    start = gauss_pixel(grid[None, None, :], sigma[:, None, None])[0]
    profile = FiberProfile(np.repeat(start, nodes.size, axis=1), GRID_STEP, half_width, nodes,
                           dead.copy(), amp_rows, per_amp)
    where = profile.locate(fibers[:, None, None], cols[None, :, None], u)
    others = None
    reach = 0.0
    for it in range(niter + 1):
        prof = profile.interpolate(where)
        flux, others = fit_fluxes(data, weight, prof, rows, sub_cols, inside, (nrow, cols.size),
                                  nsweep=NSWEEP, others=others)
        if it == niter:
            break
        good_flux = flux[..., None] > 0
        wsum = np.where(good_flux, flux[..., None] ** 2 * weight, 0.0)
        v = np.divide(data - others, flux[..., None], out=np.zeros_like(data),
                      where=good_flux)
        wing, reach = _wing_template(v, wsum, u, clean, half_width)
        if it == 0 and reach < half_width - 1:
            log.warning("profile wings seen only to %.1f px (no unlit side of a fiber); "
                        "the wing template is extrapolated beyond", reach)
        table_g = _fit_groups(v, wsum, u, key, ngroup * nblock, u_core, wing, grid,
                              half_width).reshape(ngroup, nblock, grid.size)
        table = _smooth_tables(table_g, group, dead, per_amp, block_columns, nodes)
        if it > 0:
            table = (1 - DAMPING) * table + DAMPING * profile.table
        if symmetric:
            table = 0.5 * (table + table[..., ::-1])
        profile = FiberProfile(_unit_pixel_sums(table), GRID_STEP, half_width, nodes,
                               dead.copy(), amp_rows, per_amp)
    resid = data - others - flux[..., None] * prof
    chi2 = np.sum(resid**2 * weight) / max(np.count_nonzero(weight), 1)
    log.info("profile of %d fibers from %d groups x %d column blocks (core +-%.2f px, wing "
             "seen to %.1f px): chi2 per pixel %.2f", nfib, ngroup, nblock, u_core, reach,
             chi2)
    return profile


@njit(cache=True, nogil=True)
def _window_pixels(image, variance, good, rows, inside, amp_lo, level, slope, amp_of, dead):
    """Window pixels of every fiber (i) at every sampled column (j): the image at (rows, j)
    minus the margin background ``level + slope * (row - amp_lo)`` of the fiber's
    amplifier, and the inverse variance (0 outside the amplifier, for bad pixels and dead
    fibers); the arithmetic of the array code it replaces."""
    n0, n1, n2 = rows.shape
    data = np.empty((n0, n1, n2))
    weight = np.empty((n0, n1, n2))
    for i in range(n0):
        a = amp_of[i]
        lo = amp_lo[i]
        for j in range(n1):
            lv = level[a, j]
            sl = slope[a, j]
            for k in range(n2):
                r = rows[i, j, k]
                data[i, j, k] = image[r, j] - (lv + sl * (r - lo))
                use = inside[i, j, k] and good[r, j] and not dead[i]
                weight[i, j, k] = 1.0 / variance[r, j] if use else 0.0
    return data, weight


def _neighbour_distance(y: np.ndarray, dead: np.ndarray, per_amp: int):
    """Distance (rows) from every fiber to the nearest lit fiber below and above it on
    its amplifier (inf where there is none), shape (nfib, ncols) each."""
    nfib = y.shape[0]
    lo = np.full(y.shape, np.inf)
    hi = np.full(y.shape, np.inf)
    for a in range(nfib // per_amp):
        idx = np.arange(a * per_amp, (a + 1) * per_amp)
        lit = idx[~dead[idx]]
        for prev, nxt in itertools.pairwise(lit):
            dist = y[nxt] - y[prev]
            hi[prev] = dist
            lo[nxt] = dist
    return lo, hi


def _fit_groups(v, wsum, u, key, nkey, u_core, wing, grid, half_width):
    """Fit ``C(u) + a W(u)`` to the stacked profile of every key (group x block).

    Only stacked pixels within ``u_core + FIT_MARGIN`` of the trace are used, so ``a`` is
    set where the fiber's own light still dominates; beyond, ``W`` gives the shape.
    Returns the profiles on ``grid``, shape (nkey, grid.size).
    """
    mv, mu, den = _fine_stack(v, wsum, u, key, nkey, -half_width, half_width)
    nknot = round(2 * u_core / KNOT_STEP)

    def basis(x):
        return np.concatenate([_design(x, -u_core, KNOT_STEP, nknot), wing(x)[..., None]],
                              axis=-1)

    x = basis(mu)
    den = np.where(np.abs(mu) < u_core + FIT_MARGIN, den, 0.0)
    xw = x * den[..., None]
    normal = np.swapaxes(xw, 1, 2) @ x
    rhs = np.einsum("kfi,kf->ki", xw, mv)
    coef = _penalised_solve(normal, rhs, nknot - 3)
    return coef @ basis(grid).T


def _poly_project(values: np.ndarray, x: np.ndarray, xnew: np.ndarray, degree: int,
                  weights: np.ndarray | None = None) -> np.ndarray:
    """Least-squares polynomial in ``x`` along axis 0 of ``values``, evaluated at ``xnew``."""
    span = max(np.ptp(x), 1e-9) / 2
    mid = (x.max() + x.min()) / 2
    deg = min(degree, x.size - 1)
    v = legendre.legvander((x - mid) / span, deg)
    w = np.ones(x.size) if weights is None else weights
    project = legendre.legvander((xnew - mid) / span, deg) @ np.linalg.pinv(v * w[:, None])
    out = (project * w[None, :]) @ values.reshape(x.size, -1)
    return out.reshape((xnew.size,) + values.shape[1:])


def _smooth_tables(table_g: np.ndarray, group: np.ndarray, dead: np.ndarray, per_amp: int,
                   block_columns: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    """Smooth group x block profiles with polynomials in fiber index (per amplifier) and in
    column (a linear operation); return every fiber slot's profile at the node columns."""
    nfib = group.size
    idx = np.arange(nfib, dtype=float)
    out = np.empty((nfib, nodes.size, table_g.shape[2]))
    along = _poly_project(np.moveaxis(table_g, 1, 0), block_columns, nodes, COLUMN_DEGREE)
    along = np.moveaxis(along, 0, 1)  # (ngroup, nnode, ngrid)
    for a in range(nfib // per_amp):
        sl = slice(a * per_amp, (a + 1) * per_amp)
        g_amp = np.unique(group[sl])
        centres, lit_count = [], []
        for g in g_amp:
            members = group[sl] == g
            lit = members & ~dead[sl]
            centres.append(idx[sl][lit if lit.any() else members].mean())
            lit_count.append(lit.sum())
        out[sl] = _poly_project(along[g_amp], np.asarray(centres), idx[sl], FIBER_DEGREE,
                                weights=np.sqrt(np.asarray(lit_count, float)))
    out[..., [0, -1]] = 0.0
    return out


def _unit_pixel_sums(table: np.ndarray) -> np.ndarray:
    """Scale an effective profile so that its values one pixel apart sum to 1 at every
    sub-pixel phase (the light of a fiber is fully shared among the pixels of a column,
    whatever the trace's phase). Requires ``1 / GRID_STEP`` to be an integer."""
    per_px = round(1 / GRID_STEP)
    n = table.shape[-1]
    npx = -(-n // per_px)
    padded = np.zeros(table.shape[:-1] + (npx * per_px,))
    padded[..., :n] = table
    sums = padded.reshape(table.shape[:-1] + (npx, per_px)).sum(axis=-2)
    sums = np.tile(sums, npx)[..., :n]
    return np.divide(table, sums, out=np.zeros_like(table), where=sums > 0)


def trace_and_profile(
    image: np.ndarray,
    variance: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    nfibers: int = 280,
    amp_rows: int | None = None,
) -> tuple[TraceSolution, FiberProfile]:
    """Traces and profiles of a continuum frame (master twilight or flat), best accuracy.

    Runs :func:`panacea.trace.trace_fibers` (Gaussian centres), :func:`build_profile`,
    then :func:`panacea.trace.refine_trace` with the empirical profiles (removes the
    ~0.01 px pull of a single lit neighbour on fibers at amplifier ends and next to dead
    fibers).

    Parameters
    ----------
    image, variance, mask, nfibers, amp_rows
        As for :func:`panacea.trace.trace_fibers`; ``image`` bias-subtracted (e-).

    Returns
    -------
    solution : TraceSolution
    profile : FiberProfile
    """
    # the frame prepared and cleaned of cosmic rays once for the three steps
    frame = prepare_frame(image, variance, mask)
    first = trace_fibers(image, variance, mask, nfibers=nfibers, amp_rows=amp_rows,
                         prepared=frame)
    # only the columns that build_profile samples are kept through it (memory)
    frame = frame.slim(profile_columns(np.shape(image)[1]))
    profile = build_profile(image, variance, first, mask, amp_rows=amp_rows, prepared=frame)
    solution = refine_trace(image, first, profile, variance, mask, amp_rows=amp_rows,
                            prepared=frame)
    return solution, profile


@njit(cache=True, nogil=True)
def _interpolate_kernel(flat, base, a, t, inside, nxt, bilinear, grid_step, derivative):
    """:meth:`FiberProfile.interpolate` over flat arrays: the same operations as the array
    code (``lo + t * (hi - lo)``, zero outside), so the same values."""
    n = base.size
    value = np.zeros(n)
    slope = np.zeros(n if derivative else 0)
    for m in range(n):
        if not inside[m]:
            continue
        b = base[m]
        if bilinear:
            lo = flat[b] + a[m] * (flat[b + nxt] - flat[b])
            hi = flat[b + 1] + a[m] * (flat[b + nxt + 1] - flat[b + 1])
        else:
            lo, hi = flat[b], flat[b + 1]
        step = hi - lo
        value[m] = lo + t[m] * step
        if derivative:
            slope[m] = step / grid_step
    return value, slope


@njit(cache=True, nogil=True)
def _fine_sums(value, wsum, u, key, nfine, size, lo, fine_step):
    """The weighted sums of :func:`_fine_stack` (weight, weight x value, weight x offset)
    in its bins, added in the flat order of the inputs as np.bincount adds them."""
    den = np.zeros(size)
    num = np.zeros(size)
    su = np.zeros(size)
    n0, n1, n2 = u.shape
    for i in range(n0):
        for j in range(n1):
            for k in range(n2):
                w = wsum[i, j, k]
                if not w > 0:
                    continue
                q = np.floor((u[i, j, k] - lo) / fine_step)
                if not (q >= 0 and q < nfine):
                    continue
                b = key[i, j, k] * nfine + int(q)
                den[b] += w
                num[b] += w * value[i, j, k]
                su[b] += w * u[i, j, k]
    return den, num, su


@njit(cache=True, nogil=True)
def _evaluate_kernel(table, fibers, npos, offsets, half_width, step):
    """:meth:`FiberProfile.interpolate` at :meth:`FiberProfile.locate`'s positions, in one
    pass: value and slope (per px) of every point, zero outside the support."""
    nnode, ngrid = table.shape[1], table.shape[2]
    n = offsets.size
    value = np.zeros(n)
    slope = np.zeros(n)
    for m in range(n):
        s = (offsets[m] + half_width) / step
        if not (s >= 0 and s <= ngrid - 1):
            continue
        f = fibers[m]
        k = min(int(np.floor(npos[m])), max(nnode - 2, 0))
        i = min(max(int(np.floor(s)), 0), ngrid - 2)
        t = s - i
        if nnode > 1:
            a = npos[m] - k
            lo = table[f, k, i] + a * (table[f, k + 1, i] - table[f, k, i])
            hi = table[f, k, i + 1] + a * (table[f, k + 1, i + 1] - table[f, k, i + 1])
        else:
            lo, hi = table[f, k, i], table[f, k, i + 1]
        value[m] = lo + t * (hi - lo)
        slope[m] = (hi - lo) / step
    return value, slope


@njit(cache=True, nogil=True)
def _weights_kernel(table, y, first, k0, a, nwin, half_width, step, fibers_per_amp, amp_rows,
                    normalize):
    """Loops of :meth:`FiberProfile.weights`: the bilinear table lookup of
    :meth:`FiberProfile.interpolate` at every window pixel, zero outside the fiber's amp."""
    nfib, ncol = y.shape
    nnode, ngrid = table.shape[1], table.shape[2]
    out = np.zeros((nfib, nwin, ncol), np.float32)
    inv = 1.0 / step
    values = np.zeros(nwin)
    for f in range(nfib):
        lo = (f // fibers_per_amp) * amp_rows
        tf = table[f]
        for c in range(ncol):
            k = k0[c]
            ac = a[c]
            total = 0.0
            start = (first[f, c] - y[f, c] + half_width) * inv  # table position of row 0
            for j in range(nwin):
                values[j] = 0.0
                r = first[f, c] + j
                if r < lo or r >= lo + amp_rows:
                    continue
                s = start + j * inv
                if s < 0 or s > ngrid - 1:
                    continue
                i = min(int(s), ngrid - 2)
                t = s - i
                if nnode > 1:
                    v0 = tf[k, i] + ac * (tf[k + 1, i] - tf[k, i])
                    v1 = tf[k, i + 1] + ac * (tf[k + 1, i + 1] - tf[k, i + 1])
                else:
                    v0, v1 = tf[k, i], tf[k, i + 1]
                values[j] = v0 + t * (v1 - v0)
                total += values[j]
            scale = 1.0
            if normalize:
                scale = 1.0 / total if total > 0 else 0.0
            for j in range(nwin):
                out[f, j, c] = values[j] * scale
    return out
