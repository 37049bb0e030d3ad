"""The night's sky lines constrain the shape of the calibration's wavelength solution.

The arc lines of a channel are too sparse to follow a camera's non-polynomial distortions
(ripples of a few hundred pixels): between them the solution is interpolated and may be off
by 0.1-0.3 px, the same in every fiber. Every on-sky exposure of the night carries the sky's
lines (OH in red and farred, [O I], Na D, Hg), at the columns the true solution gives them,
moved only by that exposure's flexure. So, per exposure, each usable sky line's offset from
the arc solution is measured on the fiber-stacked sky (:mod:`panacea.skywave`'s stacking and
Gaussian fit), and all offsets of the night are fitted at once by

``offset(e, c, y) = a_e + b_e x(c) + r(c, y)``

with a shift ``a_e`` and stretch ``b_e`` per exposure (its flexure) and one residual
shape ``r`` common to the exposures: a cubic B-spline in column, the same for every fiber
or changing linearly along the slit (``r0(c) + y r1(c)``, lines stacked in three groups of
fibers), whose knot spacing, coefficient prior and form are chosen by cross-validation
of the sky lines held out in neighbouring pairs (the shape is judged across the gaps
between lines). Each exposure's stretch has a prior of the size flexure shows: left free,
it trades with the shape's slope where an exposure has few lines. The arc lines enter as
measurements of ``r`` itself (their residuals from the solution; arcs have no flexure), so
the sky lines fill the gaps between the arc lines and the arcs pin the shape's zero point
and slope; lines that the others do not predict (blends) are clipped first. The night's
wavelength solution is then re-evaluated at ``column - r(column, y)`` in every fiber, but
only when the held-out lines predict better with ``r`` than without it ("never worse").

All functions take and return arrays: columns and offsets in pixels of the stitched channel
frame (positive: the lines sit at larger columns than the solution predicts), wavelengths
in air Angstrom. No file I/O happens here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numba import njit
from scipy.interpolate import BSpline

from . import instrument, skywave
from .medians import nanmedian

log = logging.getLogger(__name__)

#: Knot spacings (px) of the residual shape tried by the cross-validation, simplest first.
KNOT_SPACINGS = (800.0, 600.0, 400.0, 300.0, 250.0, 200.0, 150.0, 120.0, 100.0)
#: Systematic floors (px) added in quadrature to the errors of a sky line's stacked offset
#: and of an arc line's fiber-averaged residual (blends with unlisted lines).
SKY_FLOOR = 0.01
ARC_FLOOR = 0.02
#: Prior widths (px) of the spline coefficients tried (they keep stretches without lines
#: near the arc solution; the randomized nights' ripples are 0.05-0.3 px).
PRIOR_SIGMAS = (0.05, 0.1, 0.2, 0.4)
#: The simplest model whose held-out RMS is within this fraction of the best one's is chosen.
CV_TOLERANCE = 0.05
#: The chosen shape is applied only when its held-out RMS is this fraction below that of the
#: model without a shape ("never worse", with a margin for the choice's own optimism; see
#: docs/wavelength_skyshape.md, "The guard").
MIN_GAIN = 0.10
#: Prior width (px at the channel ends) of each exposure's stretch. Flexure moves a spectrum
#: mostly as a whole; a free stretch trades with the shape's slope where an exposure's lines
#: are few or bunched (orange: 3-4 lines over 650 px gave stretches of 3-7 px and a shape
#: 0.75 px wrong between them, docs/wavelength_skyshape.md).
STRETCH_PRIOR = 0.1
#: Sky lines held out together in the cross-validation: every run of this many lines
#: neighbouring in column, so that the score judges the shape across the gap between them
#: (where a shape fitted to single lines may swing), not only next to a remaining line.
CV_BLOCK = 2
#: Fewest distinct sky lines (wavelengths) over the night's exposures for a shape fit.
MIN_SKY_LINES = 6
#: Stacked points further than this many robust sigmas from their neighbours' median
#: (cosmic rays in a quick extraction) are left out of a line's fit.
CLIP_SIGMA = 6.0
#: Lines whose held-out residual from :data:`SCREEN_MODEL` (knot spacing, prior; px) is
#: more than this many robust sigmas off are left out of the shape fit.
CLIP_LINES = 4.0
SCREEN_MODEL = (200.0, 0.2)
#: Smallest signal-to-noise of a line's stacked amplitude for it to count.
MIN_LINE_SNR = 10.0
#: Largest fitted offset (px) of a line from the exposure's own median offset.
MAX_LINE_DEVIATION = 1.0
#: Sky and arc lines are measured in this many consecutive groups of fibers along the slit,
#: so that the held-out lines may choose a shape that changes across it.
FIBER_GROUPS = 3


@dataclass
class SkyLines:
    """Offsets of one exposure's sky lines from the arc solution.

    Attributes
    ----------
    name : str
        Exposure label (for logs).
    wavelength, column, offset, error : ndarray (nline,)
        Air wavelength (A), mean predicted column (px), measured offset and its 1-sigma
        error (px, statistical).
    fiber : ndarray (nline,) or None
        Mean position of the stacked fibers across the slit (fiber index mapped to -1..1);
        None: the whole slit (0).
    """

    name: str
    wavelength: np.ndarray
    column: np.ndarray
    offset: np.ndarray
    error: np.ndarray
    fiber: np.ndarray | None = None

    def __len__(self) -> int:
        return self.wavelength.size


@dataclass
class ShapeFit:
    """The night's common residual shape of the wavelength solution.

    Attributes
    ----------
    applied : bool
        Whether the held-out lines chose a shape (else :attr:`offsets` is zero).
    spacing : float
        Knot spacing (px) of the chosen spline (0 without a shape).
    prior : float
        Prior width (px) of its coefficients (0 without a shape).
    offsets : ndarray (ncol,)
        ``r0(column)`` (px): where each wavelength really sits minus where the arc
        solution puts it, at the slit's centre.
    across : ndarray (ncol,)
        ``r1(column)`` (px): the change of that offset from the slit's centre to its ends
        (fiber coordinate y = +-1; zero unless the held-out lines chose it), so that fiber
        ``k`` is corrected by ``r0 + y_k r1``.
    cv_rms : dict
        Held-out RMS (px) of the sky lines for each tried model, keyed by (knot spacing
        px, prior px, varies across the slit) ((0, 0, False): no shape).
    nsky, nwave, nexp, narc : int
        Sky-line measurements, distinct sky lines, exposures and arc lines used.
    shifts : dict
        Per exposure: (shift px at the centre column, stretch px at the ends) of the
        chosen model.
    reason : str
        Why no shape was applied (empty when one was).
    """

    applied: bool
    spacing: float
    prior: float
    offsets: np.ndarray
    across: np.ndarray | None = None
    cv_rms: dict = field(default_factory=dict)
    nsky: int = 0
    nwave: int = 0
    nexp: int = 0
    narc: int = 0
    shifts: dict = field(default_factory=dict)
    reason: str = ""

    @property
    def method(self) -> str:
        """``spline{spacing}`` or ``none`` (for the bundle header)."""
        if not self.applied:
            return "none"
        return f"spline{self.spacing:.0f}" + ("+fib" if self.varies else "")

    @property
    def varies(self) -> bool:
        """Whether the shape changes across the slit."""
        return self.across is not None and bool(np.any(self.across))

    @property
    def largest(self) -> float:
        """Largest correction (px) over the columns and the slit."""
        across = np.zeros_like(self.offsets) if self.across is None else self.across
        return float(np.max(np.abs(self.offsets) + np.abs(across)))

    @property
    def rms(self) -> float:
        """Held-out RMS (px) of the chosen model."""
        return float(self.cv_rms.get((self.spacing, self.prior, self.varies), np.nan))

    @property
    def rms_none(self) -> float:
        """Held-out RMS (px) without a shape (shift and stretch per exposure only)."""
        return float(self.cv_rms.get((0.0, 0.0, False), np.nan))


# --------------------------------------------------------------------------- measurement


def _clip_stack(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Points of a stack within :data:`CLIP_SIGMA` robust sigmas of their 0.5-px bin's
    median (a cosmic ray in one fiber stands far off the other fibers' profile); bins of
    fewer than 8 points are kept."""
    bins = np.floor(x / 0.5).astype(int)
    return _clip_kernel(bins, np.asarray(y, float), 1.0 / np.sqrt(w), CLIP_SIGMA)


@njit(cache=True, nogil=True)
def _bin_medians(bins, order, values):
    """Median of ``values`` within each integer bin (``order`` sorts ``bins`` stably),
    returned for every point, and the number of points in its bin: the mean of the two
    middle values of the bin's sorted values (NaN last), numpy's median arithmetic."""
    n = bins.size
    med = np.empty(n)
    count = np.empty(n, np.int64)
    start = 0
    while start < n:
        stop = start + 1
        while stop < n and bins[order[stop]] == bins[order[start]]:
            stop += 1
        members = order[start:stop]
        vals = values[members]
        srt = vals[np.argsort(vals, kind="mergesort")]
        m = stop - start
        centre = 0.5 * (srt[(m - 1) // 2] + srt[m // 2])
        for i in members:
            med[i] = centre
            count[i] = m
        start = stop
    return med, count


@njit(cache=True, nogil=True)
def _clip_kernel(bins, y, noise, clip):
    """:func:`_clip_stack` for integer bins and the points' noise: kept where the bin has
    fewer than 8 points or ``|y - median| < clip * maximum(1.4826 * MAD, median noise)``
    (numpy's maximum: NaN wins)."""
    order = np.argsort(bins, kind="mergesort")
    med, count = _bin_medians(bins, order, y)
    noise, _ = _bin_medians(bins, order, noise)
    dev = np.abs(y - med)
    mad, _ = _bin_medians(bins, order, dev)
    keep = np.empty(bins.size, np.bool_)
    for i in range(bins.size):
        a = 1.4826 * mad[i]
        b = noise[i]
        if a != a:
            scale = a
        elif b != b:
            scale = b
        else:
            scale = a if a >= b else b
        keep[i] = count[i] < 8 or dev[i] < clip * scale
    return keep


def measure_exposure(flux: np.ndarray, variance: np.ndarray, wave: np.ndarray,
                     usable: np.ndarray, name: str = "",
                     lsf_fwhm: float = instrument.LSF_FWHM_PIX,
                     groups: int = FIBER_GROUPS) -> SkyLines:
    """Offset of every usable sky line of one exposure from the arc solution.

    Parameters
    ----------
    flux, variance : ndarray (nfiber, ncol)
        Extracted spectra of the exposure (electrons per column) and their variance; a
        quick extraction without cosmic-ray cleaning will do (outlying points are clipped).
    wave : ndarray (nfiber, ncol)
        The arc solution (air Angstrom at each fiber's pixel centres).
    usable : ndarray of bool (nfiber,)
        Live fibers.
    name : str
        Label for the logs.
    lsf_fwhm : float
        Line-spread FWHM (px).
    groups : int
        Each line is stacked separately over this many consecutive groups of fibers along
        the slit (a shape that changes across the slit).

    Returns
    -------
    SkyLines
        The lines stacked over the faintest fibers (:func:`panacea.skywave.sky_fibers`) of
        each group whose Gaussian fit reaches :data:`MIN_LINE_SNR`.
    """
    med = nanmedian(np.asarray(flux, float), axis=1)
    fibers = skywave.sky_fibers(flux, usable, med)
    level = skywave._levels(flux, fibers, med)
    lines = skywave.usable_lines(wave, lsf_fwhm)
    yk = _norm_fiber(flux.shape[0])
    found = []
    for sel in np.array_split(np.arange(flux.shape[0]), groups):
        group = np.zeros(flux.shape[0], bool)
        group[sel] = True
        group &= fibers
        if group.sum() < 3:
            continue
        yg = float(np.mean(yk[group]))
        for wl, near in lines:
            st = skywave._stack(flux, variance, wave, group, wl, near, lsf_fwhm, level)
            if st is None:
                continue
            x, y, w, pc = st
            keep = _clip_stack(x, y, w)
            fit = skywave._fit_line(x[keep], y[keep], w[keep], lsf_fwhm)
            if fit is None or fit[2] < MIN_LINE_SNR:
                continue
            found.append((wl, pc, fit[0], fit[1], yg))
    if not found:
        empty = np.zeros(0)
        return SkyLines(name, empty, empty, empty, empty, empty)
    wl, pc, off, err, yy = (np.array(v, float) for v in zip(*found, strict=True))
    ok = np.abs(off - np.median(off)) <= MAX_LINE_DEVIATION
    log.debug("%s: %d sky-line measurements, offsets %+.3f..%+.3f px", name, int(ok.sum()),
              off[ok].min(), off[ok].max())
    return SkyLines(name, wl[ok], pc[ok], off[ok], err[ok], yy[ok])


def _norm_fiber(nfib: int) -> np.ndarray:
    """Fiber index mapped to -1..1 along the slit."""
    return (2.0 * np.arange(nfib) - (nfib - 1)) / max(nfib - 1, 1)


def arc_residuals(columns: np.ndarray, predicted: np.ndarray, used: np.ndarray,
                  errors: np.ndarray, groups: int = FIBER_GROUPS
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Residuals of the arc lines from the solution, averaged over groups of fibers.

    Parameters
    ----------
    columns, errors : ndarray (nfiber, nline)
        Measured centroids of the arc lines and their errors (px).
    predicted : ndarray (nfiber, nline)
        Columns the solution gives the lines' wavelengths (px).
    used : ndarray of bool (nfiber, nline)
        Measurements used by the solution.
    groups : int
        Consecutive groups of fibers along the slit (as :func:`measure_exposure`).

    Returns
    -------
    column, residual, error, fiber, line : ndarray (n,)
        Per line and group where the line was used in at least 10 fibers: mean column,
        median residual (measured minus solution, px), its error (robust scatter over the
        fibers over the square root of their number, with :data:`ARC_FLOOR` in
        quadrature), the group's mean fiber coordinate (-1..1) and the line's index.
    """
    yk = _norm_fiber(columns.shape[0])
    out = []
    for sel in np.array_split(np.arange(columns.shape[0]), groups):
        u = used[sel]
        n = u.sum(axis=0)
        keep = n >= 10
        res = np.where(u, columns[sel] - predicted[sel], np.nan)[:, keep]
        col = np.nanmean(np.where(u, columns[sel], np.nan)[:, keep], axis=0)
        med = np.nanmedian(res, axis=0)
        mad = 1.4826 * np.nanmedian(np.abs(res - med), axis=0)
        stat = np.maximum(mad, np.nanmedian(np.where(u, errors[sel], np.nan)[:, keep],
                                            axis=0))
        err = np.hypot(stat / np.sqrt(n[keep]), ARC_FLOOR)
        idx = np.nonzero(keep)[0]
        yg = np.array([np.mean(yk[sel][u[:, j]]) for j in idx])
        out.append((col, med, err, yg.reshape(-1), idx))
    return tuple(np.concatenate(v) for v in zip(*out, strict=True))


# --------------------------------------------------------------------------- shape fit


def _basis(columns: np.ndarray, spacing: float, ncol: int) -> np.ndarray:
    """Cubic B-spline basis (nrow, nbasis) on uniform knots about ``spacing`` px apart over
    the detector's columns."""
    nint = max(int(np.ceil((ncol - 1) / spacing)), 1)
    inner = np.linspace(0.0, ncol - 1.0, nint + 1)
    t = np.concatenate([[inner[0]] * 3, inner, [inner[-1]] * 3])
    c = np.clip(np.asarray(columns, float), 0.0, ncol - 1.0)
    return BSpline.design_matrix(c, t, 3).toarray()


@dataclass
class _Data:
    """The night's measurements as rows of one linear system."""

    column: np.ndarray  # px
    value: np.ndarray  # offset or arc residual, px
    error: np.ndarray  # px
    exposure: np.ndarray  # index of the exposure; -1 for arc lines
    group: np.ndarray  # held-out group: one per sky wavelength, one per arc line
    fiber: np.ndarray  # mean fiber coordinate (-1..1) of the stack
    nexp: int


def _gather(sky: Sequence[SkyLines], arc: tuple[np.ndarray, ...]) -> _Data:
    """The exposures' sky-line offsets and the arc residuals (:func:`arc_residuals`) as the
    rows of one system, each sky wavelength and each arc line one held-out group."""
    cols, vals, errs, expo, groups, fib = [], [], [], [], [], []
    waves = sorted({float(w) for s in sky for w in s.wavelength})
    gid = {w: i for i, w in enumerate(waves)}
    for e, s in enumerate(sky):
        cols.append(s.column)
        vals.append(s.offset)
        errs.append(np.hypot(s.error, SKY_FLOOR))
        expo.append(np.full(len(s), e))
        groups.append(np.array([gid[float(w)] for w in s.wavelength], int))
        fib.append(np.zeros(len(s)) if s.fiber is None else s.fiber)
    acol, ares, aerr = arc[:3]
    cols.append(acol)
    vals.append(ares)
    errs.append(aerr)
    expo.append(np.full(acol.size, -1))
    groups.append(len(waves) + (arc[4] if len(arc) > 4 else np.arange(acol.size)))
    fib.append(arc[3] if len(arc) > 3 else np.zeros(acol.size))
    return _Data(*(np.concatenate(v) for v in (cols, vals, errs, expo, groups, fib)),
                 len(sky))


def _design(d: _Data, spacing: float, ncol: int, varies: bool = False) -> np.ndarray:
    """Columns: shift and stretch of each exposure, then the spline coefficients of r0 and,
    when the shape ``varies`` across the slit, of r1 (times the fiber coordinate)."""
    x = (d.column - (ncol - 1) / 2) / ((ncol - 1) / 2)
    a = np.zeros((d.column.size, 2 * d.nexp))
    sky = d.exposure >= 0
    a[np.nonzero(sky)[0], 2 * d.exposure[sky]] = 1.0
    a[np.nonzero(sky)[0], 2 * d.exposure[sky] + 1] = x[sky]
    if spacing <= 0:
        return a
    b = _basis(d.column, spacing, ncol)
    return np.hstack([a, b, b * d.fiber[:, None]] if varies else [a, b])


def _normal(a: np.ndarray, d: _Data, nfree: int, prior: float
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Whitened design and values and the normal equations (matrix, right-hand side) of the
    weighted least squares, with a Gaussian prior of width ``prior`` (px) on the spline
    coefficients (the columns after the first ``nfree``: where no line constrains the
    shape, it stays near the arc solution) and a negligible one on the exposures' shifts
    and stretches (an exposure without lines keeps zero)."""
    aw = a / d.error[:, None]
    bw = d.value / d.error
    reg = np.full(a.shape[1], 1.0 / prior**2)
    reg[:nfree] = 1e-6
    reg[1:nfree:2] = 1.0 / STRETCH_PRIOR**2
    return aw, bw, aw.T @ aw + np.diag(reg), aw.T @ bw


def _solve(a: np.ndarray, d: _Data, nfree: int, prior: float) -> np.ndarray:
    """Coefficients of the weighted, regularised least squares on all rows of ``d``."""
    _, _, n, rhs = _normal(a, d, nfree, prior)
    return np.linalg.solve(n, rhs)


def _held_out(d: _Data, spacing: float, prior: float, ncol: int, sky_only: bool = True,
              varies: bool = False, blocks: Sequence[np.ndarray] | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (px) minus their prediction by the fit without them; NaN where not predicted:
    an exposure's rows when fewer than two of its lines (distinct wavelengths) remain to fix
    its shift and stretch.

    ``blocks`` lists the held-out groups (arrays of :attr:`_Data.group` ids held out
    together); default one block per line (all exposures' measurements of a sky line held
    out together), the sky lines only unless ``sky_only`` is False. Returns the row index
    and the residual of every held-out measurement (a row appears once per block holding
    it)."""
    a = _design(d, spacing, ncol, varies)
    nfree = 2 * d.nexp
    aw, bw, n, rhs = _normal(a, d, nfree, prior)
    if blocks is None:
        groups = d.group[d.exposure >= 0] if sky_only else d.group
        blocks = [np.array([g]) for g in np.unique(groups)]
    rows, res = [], []
    for blk in blocks:
        out = np.isin(d.group, blk)
        ag = aw[out]
        sol = np.linalg.solve(n - ag.T @ ag, rhs - ag.T @ bw[out])
        pred = out.copy()
        for e in np.unique(d.exposure[out]):
            if e >= 0 and np.unique(d.group[(d.exposure == e) & ~out]).size < 2:
                pred &= d.exposure != e
        idx = np.nonzero(pred)[0]
        rows.append(idx)
        res.append(d.value[idx] - a[idx] @ sol)
    if not rows:
        return np.zeros(0, int), np.zeros(0)
    return np.concatenate(rows), np.concatenate(res)


def _line_blocks(d: _Data, size: int) -> list[np.ndarray] | None:
    """Blocks of ``size`` sky lines neighbouring in column (every run of consecutive lines,
    so each gap between two lines is held out with the lines on both sides of it); None
    for ``size`` 1 (one line at a time)."""
    if size <= 1:
        return None
    sky = d.exposure >= 0
    groups = np.unique(d.group[sky])
    cols = np.array([np.mean(d.column[sky & (d.group == g)]) for g in groups])
    groups = groups[np.argsort(cols)]
    if groups.size <= size:
        return [groups]
    return [groups[i:i + size] for i in range(groups.size - size + 1)]


def _held_out_rms(d: _Data, spacing: float, prior: float, ncol: int, varies: bool = False,
                  blocks: Sequence[np.ndarray] | None = None) -> float:
    """Weighted RMS (px) of the sky lines' held-out residuals (:func:`_held_out`; the arc
    lines always constrain the fit: their residuals from the arc solution are not
    independent of it)."""
    idx, r = _held_out(d, spacing, prior, ncol, varies=varies, blocks=blocks)
    ok = np.isfinite(r)
    if not ok.any():
        return np.nan
    w = 1.0 / d.error[idx[ok]] ** 2
    return float(np.sqrt(np.sum(w * r[ok] ** 2) / np.sum(w)))


def _screen(d: _Data, ncol: int) -> np.ndarray:
    """Rows kept after clipping lines (sky or arc) whose held-out residual from a flexible
    shape is more than :data:`CLIP_LINES` robust sigmas off (a blended arc line or sky
    line would otherwise bend the shape towards itself)."""
    keep = np.ones(d.value.size, bool)
    for _ in range(3):
        sub = _subset(d, keep)
        idx, res = _held_out(sub, SCREEN_MODEL[0], SCREEN_MODEL[1], ncol, sky_only=False)
        z = np.full(d.value.size, np.nan)
        z[np.nonzero(keep)[0][idx]] = res / sub.error[idx]
        bad = np.zeros(z.size, bool)
        for kind in (d.exposure >= 0, d.exposure < 0):  # sky and arc lines, each its scale
            ok = np.isfinite(z) & kind
            if ok.sum() >= 5:
                scale = max(1.4826 * float(np.median(np.abs(z[ok]))), 1.0)
                bad |= ok & (np.abs(z) > CLIP_LINES * scale)
        if not bad.any():
            break
        keep &= ~bad
    return keep


def _subset(d: _Data, rows: np.ndarray) -> _Data:
    """The measurements ``rows`` of ``d`` (exposures renumbered)."""
    expo = d.exposure[rows]
    used = np.unique(expo[expo >= 0])
    renum = np.full(d.nexp, -1)
    renum[used] = np.arange(used.size)
    return _Data(d.column[rows], d.value[rows], d.error[rows],
                 np.where(expo >= 0, renum[np.maximum(expo, 0)], -1), d.group[rows],
                 d.fiber[rows], int(used.size))


def fit_shape(sky: Sequence[SkyLines], arc: tuple[np.ndarray, np.ndarray, np.ndarray],
              ncol: int, spacings: Sequence[float] = KNOT_SPACINGS,
              priors: Sequence[float] = PRIOR_SIGMAS) -> ShapeFit:
    """The residual shape common to the night's exposures, chosen by held-out lines.

    Every spline of knot spacing in ``spacings`` and coefficient prior in ``priors`` is
    scored by the held-out RMS of the sky lines, held out in blocks of :data:`CV_BLOCK`
    lines neighbouring in column (:func:`_held_out_rms`, :func:`_line_blocks`); the simplest
    (widest spacing, then tightest prior) within :data:`CV_TOLERANCE` of the best is
    chosen, and applied only when it beats the model without a shape (each exposure's
    shift and stretch alone) by :data:`MIN_GAIN`.

    Parameters
    ----------
    sky : sequence of SkyLines
        Per on-sky exposure, its sky lines' offsets from the arc solution
        (:func:`measure_exposure`).
    arc : tuple of ndarray
        Column, residual and error (px) of the arc lines (:func:`arc_residuals`).
    ncol : int
        Columns of the channel frame.
    spacings, priors : sequence of float
        Knot spacings (px) and coefficient priors (px) to try.

    Returns
    -------
    ShapeFit
        With ``applied`` False (and zero offsets) when fewer than :data:`MIN_SKY_LINES`
        distinct sky lines were measured or no spline predicts the held-out lines better.
    """
    sky = [s for s in sky if len(s) >= 2]
    nwave = len({float(w) for s in sky for w in s.wavelength})
    base = {"nsky": int(sum(len(s) for s in sky)), "nwave": nwave, "nexp": len(sky),
            "narc": int(arc[0].size)}
    zero = np.zeros(ncol)
    if nwave < MIN_SKY_LINES:
        return ShapeFit(False, 0.0, 0.0, zero, zero, reason=f"{nwave} sky lines measured "
                        f"(need {MIN_SKY_LINES})", **base)
    full = _gather(sky, arc)
    keep = _screen(full, ncol)
    d = _subset(full, keep)
    none = (0.0, 0.0, False)
    cblocks = _line_blocks(d, CV_BLOCK)
    cv = {none: _held_out_rms(d, 0.0, 1.0, ncol, blocks=cblocks)}
    across = (False, True) if np.ptp(d.fiber) > 0.5 else (False,)
    for varies in across:  # simplest first: common to the fibers, widest knots, tightest prior
        for sp in spacings:
            for pr in priors:
                cv[(float(sp), float(pr), varies)] = _held_out_rms(d, float(sp), float(pr),
                                                                   ncol, varies, cblocks)
    scored = {k: v for k, v in cv.items() if k[0] > 0 and np.isfinite(v)}
    choice = none  # also when no spline could be scored (too few lines left held out)
    if scored:
        best = min(scored.values())
        choice = next(k for k, v in scored.items() if v <= (1 + CV_TOLERANCE) * best)
        if not cv[choice] < (1 - MIN_GAIN) * cv[none]:
            choice = none
    sp, pr, varies = choice
    a = _design(d, sp, ncol, varies)
    nfree = 2 * d.nexp
    sol = _solve(a, d, nfree, pr or 1.0)
    kept = np.unique(full.exposure[keep])
    names = [sky[e].name for e in kept if e >= 0]
    shifts = {n: (float(sol[2 * e]), float(sol[2 * e + 1])) for e, n in enumerate(names)}
    if sp == 0.0:
        return ShapeFit(False, 0.0, 0.0, zero, zero, cv, shifts=shifts,
                        reason="no spline predicts the held-out sky lines better", **base)
    b = _basis(np.arange(ncol, dtype=float), sp, ncol)
    offsets = b @ sol[nfree:nfree + b.shape[1]]
    r1 = b @ sol[nfree + b.shape[1]:] if varies else np.zeros(ncol)
    return ShapeFit(True, sp, pr, offsets, r1, cv, shifts=shifts, **base)


def apply_shape(wave: np.ndarray, offsets: np.ndarray, across: np.ndarray | None = None
                ) -> np.ndarray:
    """Every fiber's wavelengths re-evaluated at ``column - (offsets + y across)`` (px; y the
    fiber's coordinate along the slit, -1..1), linearly extrapolated beyond the ends.

    Parameters
    ----------
    wave : ndarray (nfiber, ncol)
        Wavelength solution (air Angstrom).
    offsets, across : ndarray (ncol,)
        Column offset of the true solution from ``wave`` at the slit's centre and its change
        to the slit's ends (px, :attr:`ShapeFit.offsets` and :attr:`ShapeFit.across`).

    Returns
    -------
    ndarray (nfiber, ncol)
    """
    nfib, ncol = wave.shape
    shift = np.broadcast_to(offsets, (nfib, ncol))
    if across is not None:
        shift = shift + _norm_fiber(nfib)[:, None] * across[None, :]
    return skywave.shifted(wave, shift)
