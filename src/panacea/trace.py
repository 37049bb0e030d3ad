"""Fiber finding, fiber traces, dead fibers and rigid trace shifts.

All functions work on the stitched, oriented channel frame (rows = spatial axis, columns =
dispersion axis, see :mod:`panacea.instrument`). The frame is cut into ``namp`` amplifier
strips of ``amp_rows`` rows, each holding ``nfibers / namp`` fiber slots numbered by
increasing row; fiber light never crosses a strip boundary.

Tracing (:func:`trace_fibers`, then :func:`refine_trace`):

1. The frame is collapsed into column bins (default 32 columns); masked pixels and
   cosmic-ray hits (:func:`cosmic_mask`) are left out of the means.
2. In the brightest bin near the centre the fibers of every amplifier are found on the 1-D
   profile (:func:`find_fibers`), dead fibers recognised from the count (see below).
3. Every live fiber is followed bin by bin away from that reference bin.
4. In every bin each fiber is fitted with a pixel-integrated Gaussian plus a constant,
   after the model of its neighbours has been subtracted (Jacobi iterations), so that
   neither the background nor the neighbours' cores bias the centre.
5. The bin centres of each fiber are fitted with a Legendre series in column (the series
   is averaged over each bin's columns, so curvature inside a bin costs no bias), with
   iterative outlier rejection.
6. The series coefficients of order >= 1 are regularised across fibers: a smooth function
   of fiber index (per amplifier) is fitted to each coefficient and every fiber's value is
   shrunk towards it by the ratio of intrinsic scatter to measurement noise (a Wiener
   blend), so a fiber keeps its own shape where the data demand it. The zeroth order (the
   fiber's position) stays free.
7. Dead fibers get their position interpolated from their live neighbours and their shape
   from the smooth functions.
8. :func:`refine_trace` repeats 4-7 with the fibers' empirical profiles
   (:mod:`panacea.profile`, symmetric part) in place of Gaussians: a Gaussian misses the
   broad wings, which cancel for an interior fiber but pull a fiber with a single lit
   neighbour (ends of an amplifier, next to a dead fiber) by ~0.01 px.

Dead fibers versus gaps between fiber blocks: a dead fiber leaves a gap of two pitches,
but the slit may also be built of blocks separated by gaps of about two pitches in which
no fiber is missing, so gap size alone cannot decide. :func:`find_fibers` relies on the
known number of slots per amplifier: with ``N`` fibers found, ``nfibers - N`` slots are
dead. Candidate gaps are those at least :data:`MIN_GAP_RATIO` local pitches wide (local
pitch = running median of the gaps). If the candidates are few, the dead slots go into
the gaps widest relative to the local pitch. If there are at least three more candidates
than dead slots, the block gaps are taken to recur regularly in slot index, and the dead
slots go where they leave the remaining block gaps most regular. Only when no candidate gap
is left do dead slots go to the ends of the amplifier.

:func:`measure_shift` measures the rigid row shift of any frame (science exposures
included) relative to a :class:`TraceSolution`, which :meth:`TraceSolution.shifted`
applies.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
from numba import njit
from numpy.polynomial import legendre
from scipy.ndimage import gaussian_filter1d, maximum_filter1d, median_filter
from scipy.signal import find_peaks
from scipy.special import erf

from panacea.errors import PanaceaError

log = logging.getLogger(__name__)

#: Default column-bin width (px) over which the frame is collapsed before centring.
BIN_WIDTH = 32
#: Default degree of the Legendre series of each trace (in column).
TRACE_DEGREE = 4
#: Default degree of the smooth functions of fiber index used for regularisation.
ACROSS_DEGREE = 4
#: Half-width (rows) of the window fitted around every fiber in every bin.
FIT_HALF_WIDTH = 4
#: A gap must be at least this many local pitches wide to hold a dead fiber.
MIN_GAP_RATIO = 1.5
#: At most this fraction of an amplifier's fiber slots may be dead.
MAX_DEAD_FRACTION = 0.1
#: Systematic floor (px) added in quadrature to centroid errors in the trace fits.
CENTROID_FLOOR = 0.002
#: Starting Gaussian sigma (px) of the cross-dispersion profile.
SIGMA_START = 1.3
#: Minimum signal-to-noise ratio of a fiber in a column bin for its centre to be used.
MIN_SNR = 5.0
#: measure_shift refuses frames whose fiber signal (excess of the summed squared
#: signal-to-noise ratios of all fiber x bin windows over pure noise, in units of its
#: standard deviation) is below this, and warns when its error exceeds MAX_SHIFT_ERROR (px).
MIN_SHIFT_SIGNIFICANCE = 20.0
MAX_SHIFT_ERROR = 0.02
#: Prior width (px) on every trace coefficient of order >= 1: negligible for a lit
#: fiber, it keeps the series of a fiber with few usable bins finite.
COEF_PRIOR = 10.0

_SQRT2 = np.sqrt(2.0)
_SQRT2PI = np.sqrt(2.0 * np.pi)


class TraceError(PanaceaError):
    """Fibers could not be found or traced on a frame."""


@dataclass
class TraceSolution:
    """Fiber traces of one channel frame.

    Attributes
    ----------
    trace : ndarray of float64, shape (nfibers, ncol)
        Row (stitched frame, pixel centres at integers) of each fiber's centre at every
        column. Dead fibers carry a trace interpolated from their neighbours.
    dead : ndarray of bool, shape (nfibers,)
        True for fiber slots without light.
    rms : ndarray of float64, shape (nfibers,)
        RMS (px) of the fiber's bin centres about its final trace; NaN for dead fibers.
    ncols_used : ndarray of int, shape (nfibers,)
        Number of columns whose bins contributed to the fiber's fit (0 for dead fibers).
    sigma : ndarray of float64, shape (nfibers,)
        Median core sigma (px) of a Gaussian fitted to the fiber's cross-dispersion
        profile (dead fibers: interpolated from neighbours).
    columns : ndarray of float64, shape (nbin,)
        Mean column of each column bin used for the centres.
    centroids : ndarray of float64, shape (nfibers, nbin)
        Measured centre (rows) of each fiber in each bin; NaN where not measured or
        rejected.
    shift : float
        Rigid row shift (px) applied to the solution since it was measured.
    """

    trace: np.ndarray
    dead: np.ndarray
    rms: np.ndarray
    ncols_used: np.ndarray
    sigma: np.ndarray
    columns: np.ndarray
    centroids: np.ndarray
    shift: float = 0.0

    @property
    def nfibers(self) -> int:
        """Number of fiber slots."""
        return self.trace.shape[0]

    @property
    def ncol(self) -> int:
        """Number of columns."""
        return self.trace.shape[1]

    def shifted(self, dy: float) -> TraceSolution:
        """A copy moved by ``dy`` rows (px); positive moves the traces to higher rows."""
        dy = float(dy)
        return replace(self, trace=self.trace + dy, centroids=self.centroids + dy,
                       rms=self.rms.copy(), ncols_used=self.ncols_used.copy(),
                       sigma=self.sigma.copy(), dead=self.dead.copy(),
                       columns=self.columns.copy(), shift=self.shift + dy)


# --------------------------------------------------------------------------- helpers


def bin_edges(ncol: int, width: int) -> np.ndarray:
    """Edges of column bins of ``width`` columns covering ``0..ncol``.

    The last bin takes the remainder; a remainder under half a bin is merged into the
    previous bin.
    """
    if width < 1:
        raise ValueError(f"bin width must be positive, got {width}")
    edges = list(range(0, ncol, width)) + [ncol]
    if len(edges) > 2 and edges[-1] - edges[-2] < width / 2:
        del edges[-2]
    return np.asarray(edges)


def estimate_variance(image: np.ndarray) -> np.ndarray:
    """Per-pixel variance (e-^2) of an image in electrons when none is given.

    Poisson variance of the positive signal plus a read-noise term measured from the
    column-to-column differences of the faintest fifth of the pixels.
    """
    img = np.asarray(image, dtype=np.float64)
    diff = np.diff(img, axis=1)
    faint = img[:, 1:] < np.nanpercentile(img, 20)
    sel = diff[faint & np.isfinite(diff)]
    rn2 = (1.4826 * np.median(np.abs(sel - np.median(sel)))) ** 2 / 2 if sel.size else 1.0
    return np.maximum(img, 0.0) + max(rn2, 1e-3)


def _equal_width_groups(edges: np.ndarray):
    """Column slices of runs of equal-width bins, with the (nbin, width) of each run."""
    widths = np.diff(edges)
    start = 0
    while start < widths.size:
        stop = start
        while stop < widths.size and widths[stop] == widths[start]:
            stop += 1
        yield slice(edges[start], edges[stop]), (stop - start, int(widths[start]))
        start = stop


def cosmic_mask(image: np.ndarray, variance: np.ndarray, good: np.ndarray, edges: np.ndarray,
                clip: float = 6.0) -> np.ndarray:
    """Cosmic-ray hits for the robust column collapse (True = hit).

    A hit is high (more than ``clip`` standard deviations plus half the median above the
    median of its row within its column bin) and sharp: more than ``clip`` standard
    deviations above twice the median of its eight neighbours, which neither a fiber's
    cross-dispersion profile nor an emission line ever is (both are wider than 2 px),
    while a cosmic-ray track has at most a few lit neighbours. The mask is then grown by
    one pixel into neighbours that are also high.
    """
    nrow, ncol = image.shape
    high = np.empty(image.shape, bool)
    for cols, (nb, w) in _equal_width_groups(edges):
        shape = (nrow, nb, w)
        x = image[:, cols].reshape(shape)
        g = good[:, cols].reshape(shape)
        if g.all():
            m = np.median(x, axis=2, keepdims=True)
        else:
            with np.errstate(all="ignore"):
                m = np.nanmedian(np.where(g, x, np.nan), axis=2, keepdims=True)
            m = np.where(np.isfinite(m), m, 0.0)
        excess = x - m - 0.5 * np.abs(m)
        above = g & (excess > 0) & (excess * excess > clip**2 * variance[:, cols].reshape(shape))
        high[:, cols] = above.reshape(nrow, -1)
    r, c = np.nonzero(high)
    mask = np.zeros(image.shape, bool)
    if r.size == 0:
        return mask
    dr = np.array([-1, -1, -1, 0, 0, 1, 1, 1])
    dc = np.array([-1, 0, 1, -1, 1, -1, 0, 1])
    ring = np.median(image[np.clip(r[:, None] + dr, 0, nrow - 1),
                           np.clip(c[:, None] + dc, 0, ncol - 1)], axis=1)
    sharp = image[r, c] - 2 * np.maximum(ring, 0.0) > clip * np.sqrt(variance[r, c])
    r, c = r[sharp], c[sharp]
    for ddr, ddc in ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)):
        mask[np.clip(r + ddr, 0, nrow - 1), np.clip(c + ddc, 0, ncol - 1)] = True
    return mask & high


def collapse_columns(
    image: np.ndarray,
    variance: np.ndarray,
    good: np.ndarray,
    edges: np.ndarray,
    clip: float = 6.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean of every row over each column bin, without bad pixels and cosmic-ray hits.

    Parameters
    ----------
    image, variance : ndarray, shape (nrow, ncol)
        Signal (e-) and variance (e-^2).
    good : ndarray of bool, shape (nrow, ncol)
        Pixels that may be used.
    edges : ndarray of int, shape (nbin + 1,)
        Column-bin edges (:func:`bin_edges`).
    clip : float
        Threshold (standard deviations) of :func:`cosmic_mask`.

    Returns
    -------
    mean, var : ndarray, shape (nrow, nbin)
        Mean (e- per pixel) and its variance; ``var`` is ``inf`` where no pixel survived.
    """
    return _collapse(image, variance, good & ~cosmic_mask(image, variance, good, edges, clip),
                     edges)


def _collapse(image: np.ndarray, variance: np.ndarray, ok: np.ndarray, edges: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """Means of the ``ok`` pixels of every row over each column bin, and their variance
    (0 and inf for a bin without any)."""
    return _collapse_kernel(np.ascontiguousarray(image, float),
                            np.ascontiguousarray(variance, float),
                            np.ascontiguousarray(ok, np.bool_), np.asarray(edges, np.int64))


@njit(cache=True, nogil=True)
def _collapse_kernel(image, variance, ok, edges):
    nrow, nbin = image.shape[0], edges.size - 1
    mean = np.zeros((nrow, nbin))
    var = np.full((nrow, nbin), np.inf)
    for r in range(nrow):
        for b in range(nbin):
            n, s, v = 0, 0.0, 0.0
            for c in range(edges[b], edges[b + 1]):
                if ok[r, c]:
                    n += 1
                    s += image[r, c]
                    v += variance[r, c]
            if n:
                mean[r, b] = s / n
                var[r, b] = v / (n * n)
    return mean, var


def _good_pixels(image, variance, mask) -> np.ndarray:
    good = np.isfinite(image) & np.isfinite(variance) & (variance > 0)
    if mask is not None:
        good &= ~np.asarray(mask).astype(bool)
    return good


def _prepare(image, variance, mask):
    """float64 image, variance and good-pixel map with bad pixels neutralised."""
    img = np.asarray(image, dtype=np.float64)
    var = estimate_variance(img) if variance is None else np.asarray(variance, np.float64)
    if var.shape != img.shape:
        raise ValueError(f"variance shape {var.shape} differs from the image {img.shape}")
    if mask is not None and np.shape(mask) != img.shape:
        raise ValueError(f"mask shape {np.shape(mask)} differs from the image {img.shape}")
    good = _good_pixels(img, var, mask)
    if not good.all():
        img = np.where(good, img, 0.0)
        var = np.where(good, var, 1.0)
    return img, var, good


@dataclass
class PreparedFrame:
    """A continuum frame made ready for tracing once, for every step that measures it
    (:func:`trace_fibers`, :func:`panacea.profile.build_profile`, :func:`refine_trace`).

    Attributes
    ----------
    image, variance : ndarray of float64, shape (nrow, ncol), or None
        The frame (e-) and its variance (e-^2), bad pixels set to 0 and 1; None once
        :meth:`slim` (then prepared again where needed: that is cheap, the cosmic rays are
        not).
    good : ndarray of bool, or None
        Usable pixels (finite, positive variance, not masked).
    edges : ndarray of int
        Column-bin edges (:func:`bin_edges`).
    ok : ndarray of bool
        ``good`` without the cosmic-ray hits (:func:`cosmic_mask`) found in those bins.
    given_variance : bool
        Whether the variance was given (else estimated from the image).
    sampled : tuple, optional
        Columns and the image, variance and good pixels at them (kept by :meth:`slim`).
    """

    image: np.ndarray | None
    variance: np.ndarray | None
    good: np.ndarray | None
    edges: np.ndarray
    ok: np.ndarray
    given_variance: bool
    sampled: tuple | None = None

    def columns(self, cols: np.ndarray) -> tuple[np.ndarray, ...] | None:
        """Image, variance and good pixels at columns ``cols`` (None when not kept)."""
        if self.image is not None:
            return tuple(a[:, cols] for a in (self.image, self.variance, self.good))
        if self.sampled is not None and np.array_equal(self.sampled[0], cols):
            return self.sampled[1:]
        return None

    def slim(self, cols: np.ndarray) -> PreparedFrame:
        """The frame without its whole-frame float64 arrays (memory), keeping the cosmic-ray
        free pixels and the columns ``cols`` (those :func:`panacea.profile.build_profile`
        samples)."""
        return PreparedFrame(None, None, None, self.edges, self.ok, self.given_variance,
                             (cols, *self.columns(cols)))


def prepare_frame(image: np.ndarray, variance: np.ndarray | None = None,
                  mask: np.ndarray | None = None, bin_width: int = BIN_WIDTH,
                  clip: float = 6.0) -> PreparedFrame:
    """The :class:`PreparedFrame` of a frame (e-), its variance (e-^2, estimated when None)
    and mask (non-zero: ignore); ``bin_width`` and ``clip`` as for :func:`trace_fibers`
    and :func:`refine_trace`, which then give exactly their results without it."""
    img, var, good = _prepare(image, variance, mask)
    edges = bin_edges(img.shape[1], bin_width)
    ok = good & ~cosmic_mask(img, var, good, edges, clip)
    return PreparedFrame(img, var, good, edges, ok, variance is not None)


def _prepared_for(prepared: PreparedFrame | None, shape: tuple, bin_width: int
                  ) -> PreparedFrame | None:
    """``prepared`` when it fits a frame of ``shape`` traced in bins of ``bin_width``."""
    if prepared is None or prepared.ok.shape != tuple(shape):
        return None
    edges = bin_edges(shape[1], bin_width)
    return prepared if np.array_equal(edges, prepared.edges) else None


def gauss_pixel(u: np.ndarray, sigma: np.ndarray) -> tuple[np.ndarray, ...]:
    """Unit Gaussian integrated over pixels, and its derivatives.

    Parameters
    ----------
    u : ndarray
        Pixel centre minus Gaussian centre (px).
    sigma : ndarray
        Gaussian sigma (px), broadcast against ``u``.

    Returns
    -------
    g, dg_dy, dg_ds : ndarray
        Fraction of the Gaussian in each pixel, its derivative with respect to the
        Gaussian centre and with respect to sigma.
    """
    zp = (u + 0.5) / sigma
    zm = (u - 0.5) / sigma
    g = 0.5 * (erf(zp / _SQRT2) - erf(zm / _SQRT2))
    pp = np.exp(-0.5 * zp * zp) / _SQRT2PI
    pm = np.exp(-0.5 * zm * zm) / _SQRT2PI
    return g, -(pp - pm) / sigma, -(pp * zp - pm * zm) / sigma


def _amp_layout(nrow: int, nfibers: int, amp_rows: int | None) -> tuple[int, int, int]:
    """(amp_rows, namp, fibers per amp), checked."""
    amp_rows = nrow // 2 if amp_rows is None else int(amp_rows)
    if amp_rows < 1 or nrow % amp_rows:
        raise ValueError(f"{nrow} rows do not split into amplifiers of {amp_rows} rows")
    namp = nrow // amp_rows
    if nfibers % namp:
        raise ValueError(f"{nfibers} fibers do not split evenly over {namp} amplifiers")
    return amp_rows, namp, nfibers // namp


# --------------------------------------------------------------------------- fiber finding


def find_fibers(
    profile: np.ndarray,
    nfibers: int = 140,
    noise: float | None = None,
    min_prominence: float = 0.2,
) -> tuple[np.ndarray, np.ndarray]:
    """Locate the fiber slots of one amplifier on a 1-D cross-dispersion profile.

    Peaks are local maxima of the lightly smoothed profile whose prominence exceeds both
    ``min_prominence`` times the local envelope (running maximum over ~70 rows) and five
    times the noise. Their positions are refined by a parabola through three pixels.
    Surplus peaks (the weakest among those closer than 0.75 pitch to a neighbour) are
    dropped, then slots are assigned from the known count (see the module notes): the
    missing fibers go into wide gaps (the widest relative to the local pitch, or those
    that leave regularly spaced block gaps), and only then to the ends.

    Parameters
    ----------
    profile : ndarray, shape (nrow,)
        Signal of one amplifier collapsed along columns (any unit), index = row.
    nfibers : int
        Number of fiber slots on the amplifier.
    noise : float, optional
        Noise of ``profile`` (same unit); estimated from its faint part when None.
    min_prominence : float
        Minimum prominence of a fiber relative to the local envelope.

    Returns
    -------
    rows : ndarray of float64, shape (nfibers,)
        Row of each slot by increasing row; dead slots are placed evenly in their gap.
    dead : ndarray of bool, shape (nfibers,)
        True for slots where no fiber was found.

    Raises
    ------
    TraceError
        When fewer than ``(1 - MAX_DEAD_FRACTION) * nfibers`` fibers are found, or the
        missing ones cannot be placed.
    """
    p = np.asarray(profile, dtype=np.float64)
    p = np.where(np.isfinite(p), p, 0.0)
    n = p.size
    ps = gaussian_filter1d(p, 1.0)
    if noise is None:
        noise = _dark_noise(p, ps)
    envelope = gaussian_filter1d(median_filter(ps, size=5), 2.0)
    envelope = maximum_filter1d(envelope, size=71, mode="nearest")
    peaks, props = find_peaks(ps, prominence=max(5.0 * noise, 1e-12))
    if peaks.size:
        keep = props["prominences"] >= min_prominence * envelope[peaks]
        peaks, prom = peaks[keep], props["prominences"][keep]
    else:
        prom = np.zeros(0)
    if peaks.size < (1 - MAX_DEAD_FRACTION) * nfibers:
        raise TraceError(f"only {peaks.size} fibers found for {nfibers} slots on a profile of "
                         f"{n} rows (is the frame lit, and the amplifier layout right?)")
    # parabola through three pixels of the smoothed profile
    i = np.clip(peaks, 1, n - 2)
    a, b, c = ps[i - 1], ps[i], ps[i + 1]
    den = a - 2 * b + c
    with np.errstate(invalid="ignore", divide="ignore"):
        off = np.where(den < 0, 0.5 * (a - c) / den, 0.0)
    pos = i + np.clip(off, -1.0, 1.0)
    pos, prom = _drop_surplus(pos, prom, nfibers)
    return _assign_slots(pos, nfibers, n)


def _dark_noise(p: np.ndarray, ps: np.ndarray) -> float:
    """Noise of a profile from its darkest rows (below 5 % of the bright level, or else
    the darkest 5 %), as the robust scatter of their first differences."""
    dark = ps <= 0.05 * np.percentile(ps, 99)
    if dark.sum() < 10:
        dark = ps <= np.percentile(ps, 5)
    d = np.diff(p)[dark[1:] & dark[:-1]]
    if d.size < 5:
        return 0.0
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / _SQRT2)


def _local_pitch(gaps: np.ndarray) -> np.ndarray:
    """Running median (13 gaps) of the gaps between fibers: robust to isolated wide gaps."""
    return median_filter(gaps, size=min(13, 2 * (gaps.size // 2) + 1), mode="nearest")


def _drop_surplus(pos: np.ndarray, prom: np.ndarray, nfibers: int):
    """Remove surplus peaks: the weakest of those crowding a neighbour (< 0.75 pitch)."""
    pos, prom = pos.copy(), prom.copy()
    while pos.size > nfibers:
        gaps = np.diff(pos)
        pitch = _local_pitch(gaps)
        near = np.minimum(np.r_[np.inf, gaps / pitch], np.r_[gaps / pitch, np.inf])
        crowded = near < 0.75
        cand = np.flatnonzero(crowded) if crowded.any() else np.arange(pos.size)
        drop = cand[np.argmin(prom[cand])]
        log.warning("fiber finding: %d peaks for %d slots; dropping the peak at row %.1f",
                    pos.size, nfibers, pos[drop])
        pos, prom = np.delete(pos, drop), np.delete(prom, drop)
    return pos, prom


def _allocations(caps: list[int], total: int, limit: int):
    """Ways of spreading ``total`` items over bins of capacities ``caps`` (at most
    ``limit`` of them)."""
    out: list[tuple[int, ...]] = []

    def rec(i: int, left: int, acc: tuple[int, ...]) -> None:
        if len(out) >= limit:
            return
        if i == len(caps):
            if left == 0:
                out.append(acc)
            return
        for m in range(min(caps[i], left) + 1):
            rec(i + 1, left - m, acc + (m,))

    rec(0, total, ())
    return out


def _dead_per_gap(gaps: np.ndarray, pitch: np.ndarray, missing: int) -> np.ndarray:
    """Number of dead slots in every gap between found fibers (see the module notes).

    Candidates are gaps of at least :data:`MIN_GAP_RATIO` local pitches. The default is
    the greedy choice of the widest relative gaps. When there are at least three more
    candidates than missing fibers, the slit is taken to be built of blocks, whose gaps
    recur with a regular period in slot index: every way of placing the missing fibers in
    candidate gaps is tried, and the one leaving the most regular block gaps (smallest
    RMS about a straight line of slot index versus block number) wins.
    """
    ratio = gaps / pitch
    greedy = np.zeros(gaps.size, int)
    for _ in range(missing):
        score = ratio / (greedy + 1)
        j = int(np.argmax(score))
        if score[j] < MIN_GAP_RATIO:
            break
        greedy[j] += 1
    cand = np.flatnonzero(ratio >= MIN_GAP_RATIO)
    placed = int(greedy.sum())
    if placed == 0 or cand.size - placed < 3:
        return greedy
    caps = [max(int(np.round(r)) - 1, 1) for r in ratio[cand]]
    best, best_key = greedy, None
    for alloc in _allocations(caps, placed, 20000):
        ndead = np.zeros(gaps.size, int)
        ndead[cand] = alloc
        block = cand[ratio[cand] / (ndead[cand] + 1) >= MIN_GAP_RATIO]
        if block.size < 3:
            continue
        slot = block + np.concatenate([[0], np.cumsum(ndead)])[block]
        k = np.arange(block.size)
        rms = np.sqrt(np.mean((slot - np.polyval(np.polyfit(k, slot, 1), k)) ** 2))
        key = (round(float(rms), 3), -float(np.sum(ratio[cand] * np.asarray(alloc))))
        if best_key is None or key < best_key:
            best, best_key = ndead, key
    if not np.array_equal(best, greedy):
        log.info("fiber finding: dead slots placed to keep the block gaps regular "
                 "(RMS %.2f slots)", best_key[0])
    return best


def _assign_slots(pos: np.ndarray, nfibers: int, nrow: int) -> tuple[np.ndarray, np.ndarray]:
    """Place ``nfibers - len(pos)`` dead slots into gaps (:func:`_dead_per_gap`), then at
    the ends."""
    gaps = np.diff(pos)
    pitch = _local_pitch(gaps)
    ndead = _dead_per_gap(gaps, pitch, nfibers - pos.size)
    missing = nfibers - pos.size - int(ndead.sum())
    rows: list[float] = []
    dead: list[bool] = []
    for j, y in enumerate(pos):
        rows.append(y)
        dead.append(False)
        if j < gaps.size and ndead[j]:
            step = gaps[j] / (ndead[j] + 1)
            rows.extend(y + step * np.arange(1, ndead[j] + 1))
            dead.extend([True] * ndead[j])
    if missing > 0:
        # no gap is wide enough: the missing slots sit beyond the first or last fiber
        lo_pitch, hi_pitch = pitch[0], pitch[-1]
        room_lo = int((pos[0] - 2.0) // lo_pitch)
        room_hi = int((nrow - 3.0 - pos[-1]) // hi_pitch)
        if room_lo + room_hi < missing:
            raise TraceError(f"found {pos.size} fibers for {nfibers} slots and no room for "
                             f"the other {missing}")
        n_hi = min(room_hi, int(np.ceil(missing / 2)))
        n_lo = missing - n_hi
        if n_lo > room_lo:
            n_lo, n_hi = room_lo, missing - room_lo
        log.warning("fiber finding: %d of %d slots missing with no gap to hold them; "
                    "placing %d dead slot(s) below the first and %d above the last fiber",
                    missing, nfibers, n_lo, n_hi)
        rows = list(pos[0] - lo_pitch * np.arange(n_lo, 0, -1)) + rows
        dead = [True] * n_lo + dead
        rows += list(pos[-1] + hi_pitch * np.arange(1, n_hi + 1))
        dead += [True] * n_hi
    return np.asarray(rows), np.asarray(dead)


# --------------------------------------------------------------------------- centring


def _reference_bin(mean: np.ndarray) -> int:
    """Bright column bin nearest the centre (where fibers are found)."""
    nbin = mean.shape[1]
    level = np.percentile(mean, 95, axis=0)
    level = np.convolve(level, np.ones(3) / 3, mode="same") if nbin > 3 else level
    bright = np.flatnonzero(level >= 0.5 * level.max())
    return int(bright[np.argmin(np.abs(bright - (nbin - 1) / 2))])


def _refine_peaks(col: np.ndarray, y: np.ndarray, noise: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Move every guess ``y`` to the parabola vertex of the brightest pixel within 1.5 px.

    Guesses where that pixel is below five times ``noise`` are kept; the second array
    tells which guesses moved.
    """
    n = col.size
    base = np.round(y).astype(int)
    idx = np.clip(base[:, None] + np.arange(-1, 2), 1, n - 2)
    best = idx[np.arange(y.size), np.argmax(col[idx], axis=1)]
    a, b, c = col[best - 1], col[best], col[best + 1]
    den = a - 2 * b + c
    with np.errstate(invalid="ignore", divide="ignore"):
        off = np.where(den < 0, 0.5 * (a - c) / den, 0.0)
    new = best + np.clip(off, -0.7, 0.7)
    ok = (b > 5 * noise) & (np.abs(new - y) < 1.5)
    return np.where(ok, new, y), ok


def _track(mean: np.ndarray, var: np.ndarray, y_ref: np.ndarray, ref: int) -> np.ndarray:
    """Follow fibers bin by bin away from the reference bin (linear prediction)."""
    nbin = mean.shape[1]
    noise = np.sqrt(np.median(var[np.isfinite(var)]))
    y = np.empty((y_ref.size, nbin))
    found = np.zeros((y_ref.size, nbin), bool)
    y[:, ref], found[:, ref] = _refine_peaks(mean[:, ref], y_ref, noise)
    for step in (1, -1):
        b = ref + step
        while 0 <= b < nbin:
            prev = y[:, b - step]
            slope = 0.0
            if b - 2 * step != ref - step and 0 <= b - 2 * step < nbin:
                both = found[:, b - step] & found[:, b - 2 * step]
                slope = np.where(both, prev - y[:, b - 2 * step], 0.0)
            y[:, b], found[:, b] = _refine_peaks(mean[:, b], prev + slope, noise)
            b += step
    return y


@dataclass
class _WindowFit:
    amp: np.ndarray  # fiber flux per bin (e- per column)
    back: np.ndarray  # local background (e- per pixel)
    y: np.ndarray  # centre (rows)
    sigma: np.ndarray  # Gaussian sigma (px)
    y_err: np.ndarray  # formal error of y (px)
    ok: np.ndarray  # converged and significant


def _windows(y: np.ndarray, lo: np.ndarray, hi: np.ndarray, half: int):
    """Window rows around each centre and whether they lie on the fiber's amplifier."""
    rows = np.round(y).astype(int)[..., None] + np.arange(-half, half + 1)
    inside = (rows >= lo[:, None, None]) & (rows < hi[:, None, None])
    return np.clip(rows, lo[:, None, None], hi[:, None, None] - 1), inside


def fit_gaussians(
    mean: np.ndarray,
    var: np.ndarray,
    y: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    half: int = FIT_HALF_WIDTH,
    niter: int = 8,
) -> _WindowFit:
    """Fit a pixel-integrated Gaussian plus constant to every fiber in every column bin.

    Each iteration subtracts the current model of all other fibers from a fiber's window
    before its Gauss-Newton step, so overlapping wings of neighbours do not bias the
    centres.

    Parameters
    ----------
    mean, var : ndarray, shape (nrow, nbin)
        Collapsed frame (e- per pixel) and its variance.
    y : ndarray, shape (nfib, nbin)
        Starting centres (rows).
    lo, hi : ndarray of int, shape (nfib,)
        First row and one past the last row of each fiber's amplifier.
    half : int
        Window half-width (rows).
    niter : int
        Gauss-Newton iterations.
    """
    nrow, nbin = mean.shape
    bins = np.arange(nbin)[None, :, None]
    y = y.copy()
    y_start = y.copy()
    sigma = np.full_like(y, SIGMA_START)
    rows, inside = _windows(y, lo, hi, half)
    d = mean[rows, bins]
    back = np.min(np.where(inside, d, np.inf), axis=2)
    back = np.where(np.isfinite(back), back, 0.0)
    amp = np.maximum(mean[np.clip(np.round(y).astype(int), 0, nrow - 1),
                          np.arange(nbin)[None, :]] - back, 0.0) * _SQRT2PI * SIGMA_START
    cov_yy = cov_aa = np.full_like(y, np.inf)
    chi2 = np.zeros_like(y)
    for _ in range(niter):
        rows, inside = _windows(y, lo, hi, half)
        d = mean[rows, bins]
        w = np.where(inside, 1.0 / var[rows, bins], 0.0)
        g, gy, gs = gauss_pixel(rows - y[..., None], sigma[..., None])
        own = amp[..., None] * g
        flat = (rows * nbin + bins)[inside]
        total = np.bincount(flat, own[inside], minlength=nrow * nbin).reshape(nrow, nbin)
        resid = d - (total[rows, bins] - own) - own - back[..., None]
        jac = np.stack([g, np.ones_like(g), amp[..., None] * gy, amp[..., None] * gs], axis=-1)
        jw = jac * w[..., None]
        normal = np.einsum("...wi,...wj->...ij", jw, jac)
        rhs = np.einsum("...wi,...w->...i", jw, resid)
        normal += np.eye(4) * 1e-12 * np.trace(normal, axis1=-2, axis2=-1)[..., None, None]
        try:
            cov = np.linalg.inv(normal)
        except np.linalg.LinAlgError:
            cov = np.linalg.pinv(normal)
        step = np.einsum("...ij,...j->...i", cov, rhs)
        step = np.where(np.isfinite(step), step, 0.0)
        amp = amp + step[..., 0]
        back = back + step[..., 1]
        y = y + np.clip(step[..., 2], -0.5, 0.5)
        sigma = np.clip(sigma + np.clip(step[..., 3], -0.3, 0.3), 0.4, 4.0)
        cov_yy, cov_aa = cov[..., 2, 2], cov[..., 0, 0]
        chi2 = np.sum(w * resid**2, axis=-1) / np.maximum(inside.sum(axis=-1) - 4, 1)
    y_err = np.sqrt(np.abs(cov_yy) * np.maximum(chi2, 1.0))
    snr = amp / np.sqrt(np.abs(cov_aa) * np.maximum(chi2, 1.0))
    ok = (np.isfinite(y) & np.isfinite(y_err) & (snr > MIN_SNR) & (np.abs(y - y_start) < 2.0)
          & (sigma > 0.45) & (sigma < 3.9) & (y_err < 0.5))
    return _WindowFit(amp, back, y, sigma, y_err, ok)


# --------------------------------------------------------------------------- trace model


def _norm_columns(columns: np.ndarray, ncol: int) -> np.ndarray:
    half = (ncol - 1) / 2
    return (np.asarray(columns, float) - half) / half


def _bin_design(edges: np.ndarray, ncol: int, degree: int) -> np.ndarray:
    """Legendre basis averaged over the columns of each bin, shape (nbin, degree+1)."""
    full = legendre.legvander(_norm_columns(np.arange(ncol), ncol), degree)
    sums = np.add.reduceat(full, edges[:-1], axis=0)
    return sums / np.diff(edges)[:, None]


def _robust_std(x: np.ndarray, axis=None) -> np.ndarray:
    med = np.nanmedian(x, axis=axis, keepdims=True)
    return 1.4826 * np.nanmedian(np.abs(x - med), axis=axis)


def _fit_series(design: np.ndarray, y: np.ndarray, err: np.ndarray, use: np.ndarray,
                nclip: int = 4, clip: float = 5.0):
    """Weighted least-squares series of every fiber with iterative clipping.

    Returns coefficients (nfib, p), their covariance (nfib, p, p) and the final ``use``.
    """
    use = use.copy()
    w0 = 1.0 / (err**2 + CENTROID_FLOOR**2)
    yz = np.where(use, y, 0.0)
    p = design.shape[1]
    prior = np.diag(np.r_[1e-12, np.full(p - 1, COEF_PRIOR**-2)])
    for it in range(nclip + 1):
        w = np.where(use, w0, 0.0)
        normal = np.einsum("bp,fb,bq->fpq", design, w, design) + prior
        cov = np.linalg.inv(normal)
        coef = np.einsum("fpq,fq->fp", cov, np.einsum("bp,fb,fb->fp", design, w, yz))
        if it == nclip:
            break
        res = y - coef @ design.T
        scale = np.sqrt(np.maximum(err**2 + CENTROID_FLOOR**2, 0))
        z = np.where(use, res / scale, np.nan)
        spread = np.maximum(_robust_std(z, axis=1), 1.0)
        new = use & (np.abs(z) <= clip * spread[:, None])
        if np.array_equal(new, use):
            break
        use = new
    chi2 = np.sum(np.where(use, (y - coef @ design.T) ** 2 * w0, 0.0), axis=1)
    dof = np.maximum(use.sum(axis=1) - p, 1)
    cov *= np.maximum(chi2 / dof, 1.0)[:, None, None]
    return coef, cov, use


def _smooth_across(k: np.ndarray, c: np.ndarray, var: np.ndarray, degree: int):
    """Robust weighted polynomial of fiber index through ``c``; returns model and residual
    scatter not explained by ``var``."""
    x = (k - k.mean()) / max(np.ptp(k) / 2, 1.0)
    deg = min(degree, k.size - 2)
    keep = np.ones(k.size, bool)
    for _ in range(4):
        w = 1.0 / np.sqrt(var + 1e-30)
        poly = np.polynomial.polynomial.polyfit(x[keep], c[keep], deg, w=w[keep])
        model = np.polynomial.polynomial.polyval(x, poly)
        r = c - model
        s = _robust_std(r[keep])
        new = np.abs(r) <= 5 * max(s, np.sqrt(np.median(var)))
        if np.array_equal(new, keep):
            break
        keep = new
    intrinsic = max(_robust_std(r[keep]) ** 2 - np.median(var[keep]), 0.0)
    return poly, intrinsic


def _regularise(coef: np.ndarray, cov: np.ndarray, live: np.ndarray, namp: int,
                degree: int) -> tuple[np.ndarray, np.ndarray]:
    """Shrink every order >= 1 coefficient towards a smooth function of fiber index.

    Returns the regularised coefficients of all slots (dead slots filled) and the
    shrink factors (1 = fiber's own value kept).
    """
    nfib, p = coef.shape
    per_amp = nfib // namp
    out = np.zeros_like(coef)
    keep = np.zeros_like(coef)
    for a in range(namp):
        sl = slice(a * per_amp, (a + 1) * per_amp)
        k_all = np.arange(per_amp, dtype=float)
        alive = live[sl]
        k = k_all[alive]
        x_all = (k_all - k.mean()) / max(np.ptp(k) / 2, 1.0)
        for j in range(p):
            c = coef[sl, j][alive]
            v = cov[sl, j, j][alive]
            if j == 0:
                out[sl, 0][alive] = c
                out[sl, 0][~alive] = _interp_linear(k_all[~alive], k, c)
                keep[sl, 0] = 1.0
                continue
            poly, tau2 = _smooth_across(k, c, v, degree)
            smooth = np.polynomial.polynomial.polyval(x_all, poly)
            lam = tau2 / (tau2 + v) if tau2 > 0 else np.zeros_like(v)
            col = smooth.copy()
            col[alive] = smooth[alive] + lam * (c - smooth[alive])
            out[sl, j] = col
            keep[sl, j][alive] = lam
    return out, keep


def _interp_linear(xq: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Linear interpolation with linear extrapolation from the two end points."""
    out = np.interp(xq, x, y)
    if x.size >= 2:
        lo, hi = xq < x[0], xq > x[-1]
        out[lo] = y[0] + (xq[lo] - x[0]) * (y[1] - y[0]) / (x[1] - x[0])
        out[hi] = y[-1] + (xq[hi] - x[-1]) * (y[-1] - y[-2]) / (x[-1] - x[-2])
    return out


def trace_fibers(
    image: np.ndarray,
    variance: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    nfibers: int = 280,
    amp_rows: int | None = None,
    bin_width: int = BIN_WIDTH,
    degree: int = TRACE_DEGREE,
    across_degree: int = ACROSS_DEGREE,
    prepared: PreparedFrame | None = None,
) -> TraceSolution:
    """Find and trace every fiber of a channel frame (best: a master twilight or flat).

    Parameters
    ----------
    image : ndarray, shape (nrow, ncol)
        Stitched, oriented frame (e-); bias subtraction is not required.
    variance : ndarray, shape (nrow, ncol), optional
        Pixel variance (e-^2); estimated from the image when None.
    mask : ndarray, shape (nrow, ncol), optional
        Non-zero for pixels to ignore.
    nfibers : int
        Fiber slots in the frame (split evenly over the amplifiers).
    amp_rows : int, optional
        Rows per amplifier strip; default half the frame's rows.
    bin_width : int
        Columns collapsed into one centring bin.
    degree : int
        Degree of the Legendre series in column of every trace.
    across_degree : int
        Degree of the smooth functions of fiber index used to regularise the series.
    prepared : PreparedFrame, optional
        The frame's :func:`prepare_frame` (from these ``image``, ``variance`` and
        ``mask``), when the caller has it: the same result without preparing it again.

    Returns
    -------
    TraceSolution

    Raises
    ------
    TraceError
        When the fibers of an amplifier cannot be found.
    """
    prepared = _prepared_for(prepared, np.shape(image), bin_width)
    if prepared is not None and prepared.image is not None:
        img, edges = prepared.image, prepared.edges
        mean, mvar = _collapse(img, prepared.variance, prepared.ok, edges)
    else:
        img, var, good = _prepare(image, variance, mask)
        edges = bin_edges(img.shape[1], bin_width)
        mean, mvar = collapse_columns(img, var, good, edges)
    nrow, ncol = img.shape
    amp_rows, namp, per_amp = _amp_layout(nrow, nfibers, amp_rows)
    ref = _reference_bin(mean)
    y_ref = np.empty(nfibers)
    dead = np.zeros(nfibers, bool)
    noise = np.sqrt(np.median(mvar[np.isfinite(mvar)]))
    for a in range(namp):
        rows = slice(a * amp_rows, (a + 1) * amp_rows)
        fibers = slice(a * per_amp, (a + 1) * per_amp)
        pos, dd = find_fibers(mean[rows, ref], per_amp, noise=noise)
        y_ref[fibers] = pos + a * amp_rows
        dead[fibers] = dd
    if dead.any():
        log.info("dead fibers (slot index): %s", np.flatnonzero(dead).tolist())
    live = ~dead
    lo = (np.arange(nfibers) // per_amp) * amp_rows
    y0 = _track(mean, mvar, y_ref[live], ref)
    fit = fit_gaussians(mean, mvar, y0, lo[live], lo[live] + amp_rows)
    sigma = np.full((nfibers, len(edges) - 1), np.nan)
    sigma[live] = np.where(fit.ok, fit.sigma, np.nan)
    return _solve_traces(edges, ncol, fit.y, fit.y_err, fit.ok, dead, sigma, namp, degree,
                         across_degree)


def _solve_traces(edges: np.ndarray, ncol: int, y: np.ndarray, y_err: np.ndarray,
                  ok: np.ndarray, dead: np.ndarray, sigma: np.ndarray, namp: int, degree: int,
                  across_degree: int) -> TraceSolution:
    """Trace series of every fiber from the bin centres of the live fibers (see module)."""
    nfibers = dead.size
    per_amp = nfibers // namp
    live = ~dead
    design = _bin_design(edges, ncol, degree)
    coef_live, cov_live, used = _fit_series(design, y, y_err, ok)
    coef = np.zeros((nfibers, degree + 1))
    cov = np.zeros((nfibers, degree + 1, degree + 1))
    coef[live], cov[live] = coef_live, cov_live
    coef, shrink = _regularise(coef, cov, live, namp, across_degree)
    trace = coef @ legendre.legvander(_norm_columns(np.arange(ncol), ncol), degree).T

    centroids = np.full((nfibers, len(edges) - 1), np.nan)
    centroids[live] = np.where(used, y, np.nan)
    model_bins = coef @ design.T
    rms = np.full(nfibers, np.nan)
    rms[live] = np.sqrt(np.nanmean((centroids[live] - model_bins[live]) ** 2, axis=1))
    ncols_used = np.zeros(nfibers, int)
    ncols_used[live] = used @ np.diff(edges)
    fiber_sigma = np.full(nfibers, np.nan)
    has = np.isfinite(np.where(np.isfinite(centroids), sigma, np.nan)).any(axis=1)
    fiber_sigma[has] = np.nanmedian(np.where(np.isfinite(centroids), sigma, np.nan)[has],
                                    axis=1)
    for a in range(namp):
        sl = slice(a * per_amp, (a + 1) * per_amp)
        k = np.arange(per_amp)
        alive = live[sl] & np.isfinite(fiber_sigma[sl])
        if alive.any():
            fiber_sigma[sl][~alive] = _interp_linear(k[~alive].astype(float), k[alive],
                                                     fiber_sigma[sl][alive])
    columns = 0.5 * (edges[:-1] + edges[1:] - 1)
    log.info("traced %d live fibers in %d bins: median bin RMS %.4f px, median shrink of "
             "order-2 terms %.2f", live.sum(), len(edges) - 1, np.nanmedian(rms),
             np.median(shrink[live, min(2, degree)]))
    return TraceSolution(trace=trace, dead=dead.copy(), rms=rms, ncols_used=ncols_used,
                         sigma=fiber_sigma, columns=columns, centroids=centroids)


# --------------------------------------------------------------------------- profile fits


class ProfileModel(Protocol):
    """What :func:`refine_trace` and :func:`measure_shift` need from a fiber profile
    (implemented by :class:`panacea.profile.FiberProfile`)."""

    half_width: float

    def evaluate(self, fibers, columns, offsets, derivative: bool = False): ...


def _gaussian_model(sigma: np.ndarray):
    """Profile callable of pixel-integrated Gaussians of per-fiber ``sigma`` (px)."""
    sig = np.where(np.isfinite(sigma), sigma, np.nanmedian(sigma))

    def model(fibers, columns, offsets):
        g, dg_dy, _ = gauss_pixel(offsets, sig[fibers])
        return g, -dg_dy

    return model, int(np.ceil(5 * np.nanmax(sig)))


def _profile_model(profile: ProfileModel):
    """Profile callable of the symmetric part of an empirical profile: a trace is the
    centre of symmetry of its fiber's profile, so an odd part (real, or left by the
    trace errors of the frame the profile was built from) must not move it."""

    def model(fibers, columns, offsets):
        p1, d1 = profile.evaluate(fibers, columns, offsets, derivative=True)
        p2, d2 = profile.evaluate(fibers, columns, -offsets, derivative=True)
        return 0.5 * (p1 + p2), 0.5 * (d1 - d2)

    return model, int(np.ceil(profile.half_width))


def _bin_means(trace: np.ndarray, edges: np.ndarray, weight: np.ndarray | None = None
               ) -> np.ndarray:
    """(Weighted) mean of every trace over the columns of each bin, shape (nfib, nbin)."""
    if weight is None:
        return np.add.reduceat(trace, edges[:-1], axis=1) / np.diff(edges)
    wsum = np.add.reduceat(weight, edges[:-1], axis=1)
    ysum = np.add.reduceat(weight * trace, edges[:-1], axis=1)
    plain = np.add.reduceat(trace, edges[:-1], axis=1) / np.diff(edges)
    return np.where(wsum > 0, ysum / np.where(wsum > 0, wsum, 1.0), plain)


def _spectra(image: np.ndarray, ok: np.ndarray, trace: np.ndarray, half: int = 2
             ) -> np.ndarray:
    """Rough spectra: sum of the usable pixels within ``half`` rows of every trace, floored
    at zero (e- per column), shape (nfib, ncol)."""
    return _spectra_kernel(np.ascontiguousarray(image), np.ascontiguousarray(ok),
                           np.ascontiguousarray(trace, float), int(half))


@njit(cache=True, nogil=True)
def _spectra_kernel(image, ok, trace, half):
    nrow = image.shape[0]
    nfib, ncol = trace.shape
    out = np.zeros((nfib, ncol))
    for f in range(nfib):
        for c in range(ncol):
            centre = int(np.rint(trace[f, c]))
            acc = 0.0
            for k in range(-half, half + 1):
                r = min(max(centre + k, 0), nrow - 1)
                if ok[r, c]:
                    acc += image[r, c]
            out[f, c] = max(acc, 0.0)
    return out


def _binned_frame(image, variance, mask, solution, fibers, bin_width, clip=6.0,
                  find_cosmics=True, prepared=None):
    """Collapsed frame and the light-weighted mean trace of ``fibers`` in every bin.

    Inside a bin the light of a fiber may come from a few columns only (an arc or sky
    line), where the curved trace differs from its plain bin mean by up to a few tenths
    of a pixel; the model is therefore placed at the trace averaged with the fiber's own
    spectrum as weight.
    """
    if prepared is not None:  # a PreparedFrame (with clip 6 cosmics) of this frame
        edges, ok = prepared.edges, prepared.ok
        img, var = prepared.image, prepared.variance
        if img is None:  # slimmed: prepared again (the same arrays)
            img, var, _ = _prepare(image, variance, mask)
    else:
        img, var, good = _prepare(image, variance, mask)
        edges = bin_edges(img.shape[1], bin_width)
        ok = good & ~cosmic_mask(img, var, good, edges, clip) if find_cosmics else good
    mean, mvar = _collapse(img, var, ok, edges)
    trace = solution.trace[fibers]
    ybar = _bin_means(trace, edges, _spectra(img, ok, trace))
    colbar = 0.5 * (edges[:-1] + edges[1:] - 1)
    return mean, mvar, ybar, colbar, edges


def _fit_offsets(mean, var, ybar, colbar, fibers, lo, hi, model, support, half, niter,
                 common, clip=6.0):
    """Fit the profile model to every fiber in every column bin.

    The model of a window is ``F P(u - d) + B`` (``u`` = row minus ``ybar``) after the
    light of all other fibers (rendered with the same model) has been subtracted. With
    ``common`` one offset ``d`` is shared by all windows (a rigid shift, solved by
    variable projection); otherwise every window has its own.

    Returns
    -------
    d, d_err : ndarray (nf, nb) or float
        Offsets (px) and their formal errors.
    ok : ndarray of bool (nf, nb)
        Windows used (positive flux, not rejected).
    snr : ndarray (nf, nb)
        Signal-to-noise ratio of every window's flux.
    """
    nrow, nbin = mean.shape
    bins = np.arange(nbin)[None, :, None]
    fib3 = fibers[:, None, None]
    col3 = colbar[None, :, None]
    lo3, hi3 = lo[:, None, None], hi[:, None, None]
    centre = slice(support - half, support + half + 1)
    d = 0.0 if common else np.zeros_like(ybar)
    flux = None
    use = np.ones(ybar.shape, bool)
    err = np.inf
    for it in range(niter + 1):
        y = ybar + d
        rows = np.round(y).astype(np.int64)[..., None] + np.arange(-support, support + 1)
        inside = (rows >= lo3) & (rows < hi3)
        rows = np.clip(rows, lo3, hi3 - 1)
        p_w, dp_w = model(fib3, col3, rows - y[..., None])
        p_w = np.where(inside, p_w, 0.0)
        if flux is None:
            others = 0.0
        else:
            own = flux[..., None] * p_w
            flat = (rows * nbin + bins)[inside]
            total = np.bincount(flat, own[inside], minlength=nrow * nbin).reshape(nrow, nbin)
            others = (total[rows, bins] - own)[..., centre]
        r_c = rows[..., centre]
        data = mean[r_c, bins] - others
        p, dp = p_w[..., centre], dp_w[..., centre]
        w = np.where(inside[..., centre] & use[..., None], 1.0 / var[r_c, bins], 0.0)
        # per-window linear least squares of (F, B) [and F d]
        basis = [p, np.ones_like(p)] + ([] if common else [-dp])
        jac = np.stack(basis, axis=-1)
        jw = jac * w[..., None]
        normal = np.einsum("...wi,...wj->...ij", jw, jac)
        normal += np.eye(len(basis)) * 1e-9 * np.maximum(
            np.trace(normal, axis1=-2, axis2=-1), 1e-300)[..., None, None]
        cov = np.linalg.inv(normal)
        sol = np.einsum("...ij,...j->...i", cov, np.einsum("...wi,...w->...i", jw, data))
        sol = np.where(np.isfinite(sol), sol, 0.0)
        flux, back = sol[..., 0], sol[..., 1]
        resid = data - flux[..., None] * p - back[..., None]
        if common:
            jd = -flux[..., None] * dp
            proj = np.einsum("...ij,...j->...i", cov, np.einsum("...wi,...w->...i", jw, jd))
            jperp = jd - np.einsum("...wi,...i->...w", jac, proj)
            valid = (w > 0) & np.isfinite(jperp) & np.isfinite(resid)
            jperp = np.where(valid, jperp, 0.0)
            num = np.sum(w * jperp * np.where(valid, resid, 0.0))
            den = np.sum(w * jperp * jperp)
            step = num / den if den > 0 else 0.0
            err = 1.0 / np.sqrt(den) if den > 0 else np.inf
        else:
            with np.errstate(invalid="ignore", divide="ignore"):
                step = np.where(flux > 0, sol[..., 2] / flux, 0.0)
                err = np.sqrt(np.abs(cov[..., 2, 2])) / np.abs(flux)
            step = np.clip(np.where(np.isfinite(step), step, 0.0), -0.5, 0.5)
        if it < niter:
            d = d + step
        ndof = np.maximum(w.astype(bool).sum(axis=-1) - len(basis), 1)
        chi2 = np.sum(w * resid**2, axis=-1) / ndof
        finite = np.isfinite(chi2) & np.isfinite(flux)
        if it >= 1:
            scale = np.median(chi2[use & finite]) if (use & finite).any() else 1.0
            use = use & finite & (chi2 <= clip * max(scale, 1.0))
        else:
            use = use & finite
    ok = use & (flux > 0)
    snr = flux / np.sqrt(np.abs(cov[..., 0, 0]) * np.maximum(chi2, 1.0))
    if not common:
        ok &= np.isfinite(err) & (np.abs(d) < 1.5)
        err = np.where(ok, err * np.sqrt(np.maximum(chi2, 1.0)), np.inf)
    return d, err, ok, snr


def refine_trace(
    image: np.ndarray,
    solution: TraceSolution,
    profile: ProfileModel,
    variance: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    amp_rows: int | None = None,
    bin_width: int = BIN_WIDTH,
    degree: int = TRACE_DEGREE,
    across_degree: int = ACROSS_DEGREE,
    niter: int = 3,
    prepared: PreparedFrame | None = None,
) -> TraceSolution:
    """Re-measure the traces of a frame with the fibers' empirical profiles.

    The Gaussian centres of :func:`trace_fibers` are unbiased for interior fibers, whose
    neighbours' unmodelled wings cancel, but a fiber with one lit neighbour only (the
    ends of an amplifier, next to a dead fiber) is pulled towards it by ~0.01 px. Here the
    neighbours are subtracted with the full profile (wings included) and every fiber is
    centred with its own profile, then the series are fitted again.

    Parameters
    ----------
    image, variance, mask, amp_rows, bin_width, degree, across_degree
        As for :func:`trace_fibers`.
    solution : TraceSolution
        Starting traces (from :func:`trace_fibers` on the same frame).
    profile : FiberProfile
        Profiles of the fibers (:func:`panacea.profile.build_profile`).
    niter : int
        Iterations of the centring.
    prepared : PreparedFrame, optional
        As for :func:`trace_fibers`.

    Returns
    -------
    TraceSolution
        Same dead fibers, new traces.
    """
    nrow, ncol = np.shape(image)
    nfibers = solution.nfibers
    amp_rows, namp, per_amp = _amp_layout(nrow, nfibers, amp_rows)
    live = np.flatnonzero(~solution.dead)
    lo = (live // per_amp) * amp_rows
    mean, mvar, ybar, colbar, edges = _binned_frame(
        image, variance, mask, solution, live, bin_width,
        prepared=_prepared_for(prepared, (nrow, ncol), bin_width))
    model, support = _profile_model(profile)
    d, err, ok, _ = _fit_offsets(mean, mvar, ybar, colbar, live, lo, lo + amp_rows, model,
                                 support, FIT_HALF_WIDTH, niter, common=False)
    sigma = np.repeat(solution.sigma[:, None], len(edges) - 1, axis=1)
    return _solve_traces(edges, ncol, ybar + d, err, ok, solution.dead, sigma, namp, degree,
                         across_degree)


def measure_shift(
    image: np.ndarray,
    solution: TraceSolution,
    variance: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    profile: ProfileModel | None = None,
    amp_rows: int | None = None,
    bin_width: int = 128,
    max_shift: float = 2.0,
    niter: int = 4,
    cosmics_masked: bool = False,
) -> float:
    """Rigid row shift of a frame's fibers relative to a trace solution.

    The frame is collapsed into wide column bins with cosmic-ray rejection. In every bin
    the profile model of every live fiber (the symmetric part of the empirical
    ``profile``, or Gaussians of the solution's sigma) sits at the fiber's trace averaged
    over the bin with the fiber's own spectrum as weight (so a sky or arc line at one end
    of a bin does not shift it). With its own flux and local background per fiber and
    bin, the model is fitted with one common shift: first by a grid search over
    ``+-max_shift`` px, then by Gauss-Newton steps (variable projection) with windows of
    outlying chi^2 (cosmic-ray residue) rejected.

    Parameters
    ----------
    image : ndarray, shape (nrow, ncol)
        Frame (e-), e.g. a science exposure (sky, sources, cosmic rays).
    solution : TraceSolution
        Calibration traces.
    variance, mask : ndarray, optional
        Variance (e-^2, estimated when None) and pixels to ignore (non-zero).
    profile : FiberProfile, optional
        Empirical profiles; Gaussians of ``solution.sigma`` when None.
    amp_rows : int, optional
        Rows per amplifier strip (default half the frame).
    bin_width : int
        Columns collapsed into one bin.
    max_shift : float
        Largest shift searched (px).
    niter : int
        Gauss-Newton iterations after the grid search.
    cosmics_masked : bool
        ``mask`` already holds the frame's cosmic rays: the collapse does not look for
        them again.

    Returns
    -------
    float
        Shift (px) to add to ``solution.trace`` (see :meth:`TraceSolution.shifted`).

    Raises
    ------
    TraceError
        When the fibers show no significant light (:data:`MIN_SHIFT_SIGNIFICANCE`), e.g.
        on a bias or an arc without lines in the channel.
    """
    nrow = np.shape(image)[0]
    amp_rows, _, per_amp = _amp_layout(nrow, solution.nfibers, amp_rows)
    live = np.flatnonzero(~solution.dead)
    lo = (live // per_amp) * amp_rows
    mean, mvar, ybar, colbar, _ = _binned_frame(image, variance, mask, solution, live,
                                                bin_width, find_cosmics=not cosmics_masked)
    model, support = (_gaussian_model(solution.sigma[live]) if profile is None
                      else _profile_model(profile))
    fibers = np.arange(live.size) if profile is None else live
    start = _grid_shift(mean, mvar, ybar, colbar, fibers, lo, lo + amp_rows, model, max_shift)
    d, err, ok, snr = _fit_offsets(mean, mvar, ybar + start, colbar, fibers, lo,
                                   lo + amp_rows, model, support, FIT_HALF_WIDTH, niter,
                                   common=True)
    snr = snr[np.isfinite(snr)]
    significance = (np.sum(snr**2) - snr.size) / np.sqrt(2.0 * max(snr.size, 1))
    if not significance > MIN_SHIFT_SIGNIFICANCE:
        raise TraceError(f"no fiber light to measure a trace shift on (fiber signal "
                         f"{significance:.1f} sigma above noise)")
    shift = float(start + d)
    if not err < MAX_SHIFT_ERROR:
        log.warning("trace shift %+.4f px is uncertain (+- %.4f px)", shift, err)
    log.info("trace shift %+.4f +- %.4f px from %d fiber x bin windows (signal %.0f sigma)",
             shift, err, int(ok.sum()), significance)
    return shift


def _grid_shift(mean, var, ybar, colbar, fibers, lo, hi, model, max_shift, step=0.25):
    """Shift on a grid of ``step`` px maximising the profile-weighted flux (matched
    filter summed over windows): every second grid point first, then the two next to the
    best of those (the score is as wide as the profile, a few px)."""
    if max_shift < step:
        return 0.0
    nbin = mean.shape[1]
    bins = np.arange(nbin)[None, :, None]
    half = FIT_HALF_WIDTH + int(np.ceil(max_shift))
    rows = np.round(ybar).astype(np.int64)[..., None] + np.arange(-half, half + 1)
    inside = (rows >= lo[:, None, None]) & (rows < hi[:, None, None])
    rows = np.clip(rows, lo[:, None, None], hi[:, None, None] - 1)
    data = mean[rows, bins]
    w = np.where(inside, 1.0 / var[rows, bins], 0.0)
    data = data - np.sum(w * data, axis=-1, keepdims=True) / np.maximum(
        np.sum(w, axis=-1, keepdims=True), 1e-300)

    def score(sh):
        p = model(fibers[:, None, None], colbar[None, :, None], rows - (ybar + sh)[..., None])[0]
        num = np.sum(w * p * data, axis=-1)
        den = np.sum(w * p * p, axis=-1)
        return float(np.sum(np.divide(num**2, den, out=np.zeros_like(num), where=den > 0)))

    n = int(np.floor(max_shift / step + 1e-9))
    coarse = step * np.arange(-n + (n % 2), n + 1, 2)  # even multiples, always 0
    scores = [score(sh) for sh in coarse]
    best = int(np.argmax(scores))
    fine = [(scores[best], coarse[best])]
    for sh in (coarse[best] - step, coarse[best] + step):
        if abs(sh) <= max_shift + 1e-9:
            fine.append((score(sh), sh))
    return float(max(fine)[1])
