"""Fiber-to-fiber throughput and pixel-to-pixel flat field.

Two calibrations come from twilight flats (preferred) or the internal LDLS flat:

* :func:`fiber_to_fiber` factors extracted flat-field spectra into one common source
  spectrum (the twilight sun or the lamp, a function of wavelength only) times a smooth
  relative throughput of every fiber, ``ftf``. The division happens in *wavelength*: each
  fiber's pixels are compared with the common spectrum at that fiber's own wavelengths, so
  the few-pixel differences between the fibers' wavelength solutions do not imprint solar
  lines on the throughputs.
* :func:`illumination_pattern` measures how unevenly the internal flat lights the IFU (its
  fiber-to-fiber over a twilight's), so that an internal flat can stand in for twilights.
* :func:`pixel_flat` measures the pixel-to-pixel quantum-efficiency variations of a
  (bias-subtracted) flat-field frame by dividing out a model that is smooth along each row;
  :func:`combine_pixel_flats` averages such measurements, e.g. over many nights.

Model of a flat-field spectrum (electrons per column of fiber ``k`` at column ``c``)::

    counts[k, c] = ftf[k, c] * S(wave[k, c]) * dwave/dc[k, c]

where ``S`` (electrons per Angstrom) is the common spectrum and ``dwave/dc`` the fiber's
dispersion (Angstrom per pixel). ``S`` is a cubic B-spline in wavelength with breakpoints
one pixel apart, fitted to the pixels of all live fibers at once; each ``ftf[k]`` is
a cubic B-spline along the columns (a smooth function of the fiber's wavelength) with
breakpoints about 160 pixels apart. The two are fitted alternately with sigma clipping.

Normalisation: at every column the median of ``ftf`` over the live fibers is 1, so ``S``
is the spectrum seen by a median fiber. Dead fibers have ``ftf = 0``.

Nothing here reads or writes files.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from numba import njit
from numpy.polynomial import legendre
from scipy import sparse
from scipy.interpolate import BSpline
from scipy.linalg import solveh_banded
from scipy.ndimage import uniform_filter1d
from scipy.signal import savgol_filter

from .medians import nanmedian

log = logging.getLogger(__name__)

#: Breakpoint spacing of the common source spectrum (pixels of the median dispersion).
SOURCE_KNOT_SPACING = 1.0
#: Breakpoint spacing (columns) of each fiber's smooth throughput curve.
THROUGHPUT_KNOT_SPACING = 160.0
#: Below this median signal-to-noise ratio per column a flat cannot give a fiber-to-fiber.
MIN_SNR = 10.0
#: Live fibers whose median throughput is below this fraction of the median fiber are
#: flagged as dead.
MIN_THROUGHPUT = 0.3
#: Cubic B-splines throughout.
_DEGREE = 3
#: Rows of the frame the pixel flat works on at once (memory only).
PIXEL_FLAT_BAND_ROWS = 128
#: Relative weight of the second-difference penalty that keeps splines defined where a
#: breakpoint interval holds (almost) no data.
_PENALTY = 1e-6


@dataclass
class FiberFlat:
    """Fiber-to-fiber throughput and the common flat-field spectrum of one channel.

    Attributes
    ----------
    ftf : ndarray, shape (nfiber, ncol)
        Relative throughput of every fiber at each of its own columns (dimensionless). At
        every column the median over the live fibers is 1; dead fibers are 0.
    dead : ndarray of bool, shape (nfiber,)
        Dead fibers: those given as dead plus live ones found without light.
    newly_dead : ndarray of bool, shape (nfiber,)
        Fibers given as live but flagged dead here (too little light).
    source_wave : ndarray, shape (ncol,)
        Median wavelength (air Angstrom) of the live fibers at each column.
    source_spectrum : ndarray, shape (ncol,)
        Common spectrum at ``source_wave`` (electrons per Angstrom for ``ftf = 1``).
    source_knots, source_coeffs : ndarray
        The common spectrum as a cubic B-spline in wavelength (knots in Angstrom,
        coefficients in electrons per Angstrom); see :meth:`source`.
    rejected : ndarray of bool, shape (nfiber, ncol)
        Pixels of live fibers left out of the final fit (masked, not finite, clipped).
    chi2 : ndarray, shape (nfiber,)
        Reduced chi^2 of the final model of each fiber (NaN for dead fibers).
    snr : float
        Median signal-to-noise ratio per column of the live fibers' pixels.
    """

    ftf: np.ndarray
    dead: np.ndarray
    newly_dead: np.ndarray
    source_wave: np.ndarray
    source_spectrum: np.ndarray
    source_knots: np.ndarray
    source_coeffs: np.ndarray
    rejected: np.ndarray
    chi2: np.ndarray
    snr: float

    def source(self, wave: np.ndarray) -> np.ndarray:
        """Common spectrum (electrons per Angstrom) at ``wave`` (Angstrom); NaN outside."""
        spline = BSpline(self.source_knots, self.source_coeffs, _DEGREE, extrapolate=False)
        return spline(np.asarray(wave, dtype=float))

    def model(self, wave: np.ndarray) -> np.ndarray:
        """Expected flat-field spectra (electrons per column) on wavelengths ``wave``.

        Parameters
        ----------
        wave : ndarray, shape (nfiber, ncol)
            Wavelength (Angstrom) of every fiber at every column.

        Returns
        -------
        ndarray, shape (nfiber, ncol)
            ``ftf * S(wave) * dwave/dc``; NaN where ``wave`` is outside the fitted range.
        """
        wave = np.asarray(wave, dtype=float)
        return self.ftf * self.source(wave) * np.gradient(wave, axis=1)


# --------------------------------------------------------------------------- splines


def clamped_knots(lo: float, hi: float, spacing: float) -> np.ndarray:
    """Knot vector of a clamped cubic B-spline on [lo, hi] with near-``spacing`` intervals."""
    nint = max(1, int(np.ceil((hi - lo) / spacing)))
    inner = np.linspace(lo, hi, nint + 1)
    return np.concatenate([[lo] * _DEGREE, inner, [hi] * _DEGREE])


def _difference_penalty(nbasis: int) -> sparse.csr_array:
    """Second-difference penalty D^T D, (nbasis, nbasis) sparse."""
    d2 = sparse.diags_array([1.0, -2.0, 1.0], offsets=[0, 1, 2],
                            shape=(max(nbasis - 2, 1), nbasis))
    return (d2.T @ d2).tocsr()


@njit(cache=True, nogil=True)
def _normal_bands(values, first, w, y, nbasis):
    """Lower bands of ``B^T W B`` and ``B^T W y`` for a banded cubic B-spline design
    (four non-zero values per row, written out: ~3x faster than loops over them)."""
    bands = np.zeros((4, nbasis))
    rhs = np.zeros(nbasis)
    for i in range(values.shape[0]):
        wi = w[i]
        if wi == 0.0:
            continue
        f = first[i]
        a0, a1, a2, a3 = values[i, 0], values[i, 1], values[i, 2], values[i, 3]
        b0, b1, b2, b3 = a0 * wi, a1 * wi, a2 * wi, a3 * wi
        yi = y[i]
        rhs[f] += b0 * yi
        rhs[f + 1] += b1 * yi
        rhs[f + 2] += b2 * yi
        rhs[f + 3] += b3 * yi
        bands[0, f] += b0 * a0
        bands[0, f + 1] += b1 * a1
        bands[0, f + 2] += b2 * a2
        bands[0, f + 3] += b3 * a3
        bands[1, f] += b0 * a1
        bands[1, f + 1] += b1 * a2
        bands[1, f + 2] += b2 * a3
        bands[2, f] += b0 * a2
        bands[2, f + 1] += b1 * a3
        bands[3, f] += b0 * a3
    return bands, rhs


class SplineDesign:
    """Cubic B-spline basis evaluated once at fixed abscissae (in any order).

    Every abscissa has k+1 consecutive non-zero basis functions starting at ``first``, so
    the normal equations are banded; a compiled loop accumulates them in one pass. The
    abscissae need not be sorted: data can stay in its own order (e.g. fiber by fiber).
    """

    def __init__(self, x: np.ndarray, knots: np.ndarray):
        self.x = np.asarray(x, float)
        self.knots = np.asarray(knots, float)
        self._derivative_designs = None
        self.nbasis = len(knots) - _DEGREE - 1
        if self.x.size and (self.x.min() < knots[_DEGREE] or self.x.max() > knots[-_DEGREE - 1]):
            raise ValueError("abscissae outside the knots")
        # bounds checked above: scipy's own check uses Python's min/max (0.1 s per million)
        design = BSpline.design_matrix(self.x, knots, _DEGREE, extrapolate=True)
        self.values = design.data.reshape(-1, _DEGREE + 1)
        self.first = design.indices.reshape(-1, _DEGREE + 1)[:, 0].copy()
        pen = _difference_penalty(self.nbasis)
        self.penalty_bands = np.array(
            [np.concatenate([pen.diagonal(-d), np.zeros(d)]) for d in range(_DEGREE + 1)])

    def fit(self, y: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Coefficients minimising sum w (y - B c)^2 plus a tiny smoothness penalty."""
        bands, rhs = _normal_bands(self.values, self.first, np.asarray(w, float),
                                   np.asarray(y, float), self.nbasis)
        scale = np.median(bands[0][bands[0] > 0]) if np.any(bands[0] > 0) else 1.0
        bands += _PENALTY * scale * self.penalty_bands
        return solveh_banded(bands, rhs, lower=True)

    def evaluate(self, coeffs: np.ndarray) -> np.ndarray:
        """Spline value at every abscissa."""
        return _banded_product(self.values, self.first, np.asarray(coeffs, float))

    def evaluate_derivatives(self, coeffs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """First and second derivative of the spline at every abscissa.

        The derivative of a cubic spline is a quadratic spline on the inner knots (and the
        second a linear one); their design matrices at the fixed abscissae are built on
        first use and reused, so every call is two banded products.
        """
        return tuple(_banded_product(*term) for term in self.derivative_terms(coeffs))

    def derivative_terms(self, coeffs: np.ndarray) -> list[tuple[np.ndarray, ...]]:
        """(values, first, coefficients) of the banded designs of the first and second
        derivative (see :meth:`evaluate_derivatives`)."""
        if self._derivative_designs is None:
            t = self.knots
            designs = []
            for trim, degree in ((1, _DEGREE - 1), (2, _DEGREE - 2)):
                m = BSpline.design_matrix(self.x, t[trim:-trim], degree, extrapolate=True)
                designs.append((m.data.reshape(-1, degree + 1),
                                m.indices.reshape(-1, degree + 1)[:, 0].copy()))
            self._derivative_designs = designs
        spline = BSpline(self.knots, coeffs, _DEGREE)
        return [(v, f, np.ascontiguousarray(spline.derivative(n).c, float))
                for n, (v, f) in enumerate(self._derivative_designs, start=1)]


@njit(cache=True, nogil=True)
def _banded_product(values, first, coeffs):
    """``B @ coeffs`` for a design whose row ``i`` holds ``values[i]`` from column
    ``first[i]`` on."""
    n, k1 = values.shape
    out = np.empty(n)
    for i in range(n):
        acc = 0.0
        f = first[i]
        for p in range(k1):
            acc += values[i, p] * coeffs[f + p]
        out[i] = acc
    return out


def _fit_rows(y: np.ndarray, w: np.ndarray, basis: np.ndarray, penalty: np.ndarray
              ) -> np.ndarray:
    """Weighted least-squares fit of every row of ``y`` with one shared basis.

    Parameters
    ----------
    y, w : ndarray, shape (nrow, npix)
        Data and weights (0 for pixels to ignore).
    basis : ndarray, shape (npix, nbasis)
    penalty : ndarray, shape (nbasis, nbasis)
        Smoothness penalty, scaled per row to a tiny fraction of the data term.

    Returns
    -------
    ndarray, shape (nrow, npix)
        The fitted curves.
    """
    nb = basis.shape[1]
    normal = np.zeros((len(y), nb, nb))
    idx = np.arange(nb)
    for d in range(_DEGREE + 1):  # cubic B-splines overlap only their 3 neighbours
        band = w @ (basis[:, : nb - d] * basis[:, d:])  # (nrow, nb - d)
        normal[:, idx[: nb - d], idx[d:]] = band
        normal[:, idx[d:], idx[: nb - d]] = band
    rhs = (w * y) @ basis
    scale = np.trace(normal, axis1=1, axis2=2) / basis.shape[1]
    normal += (_PENALTY * np.where(scale > 0, scale, 1.0))[:, None, None] * penalty[None]
    coeffs = np.linalg.solve(normal, rhs[:, :, None])[:, :, 0]
    return coeffs @ basis.T


# --------------------------------------------------------------------------- fiber-to-fiber


def _row_median(values: np.ndarray, good: np.ndarray) -> np.ndarray:
    """Median of the good values of every row (NaN values ignored); NaN for rows without any
    (:func:`panacea.medians.nanmedian`: numpy's arithmetic, all rows at once)."""
    return nanmedian(np.where(good, values, np.nan), axis=1).astype(float, copy=False)


def _as_inputs(spectra, variance, wave, dead, mask):
    """Validate shapes, sum stacked exposures, return float arrays and the bad-pixel mask."""
    spectra = np.asarray(spectra, dtype=float)
    variance = np.asarray(variance, dtype=float)
    if spectra.shape != variance.shape:
        raise ValueError(f"spectra {spectra.shape} and variance {variance.shape} differ in shape")
    bad = np.zeros(spectra.shape, bool) if mask is None else np.asarray(mask, dtype=bool)
    if bad.shape != spectra.shape:
        raise ValueError(f"mask {bad.shape} does not match spectra {spectra.shape}")
    if spectra.ndim == 3:  # several exposures: the common spectrum absorbs colour changes
        bad = bad.any(axis=0)
        spectra, variance = spectra.sum(axis=0), variance.sum(axis=0)
    if spectra.ndim != 2:
        raise ValueError(f"spectra must be (nfiber, ncol) or (nexp, nfiber, ncol), "
                         f"not {spectra.shape}")
    wave = np.asarray(wave, dtype=float)
    dead = np.asarray(dead, dtype=bool)
    if wave.shape != spectra.shape:
        raise ValueError(f"wave {wave.shape} does not match spectra {spectra.shape}")
    if dead.shape != spectra.shape[:1]:
        raise ValueError(f"dead {dead.shape} must have one entry per fiber ({spectra.shape[0]})")
    return spectra, variance, wave, dead, bad


def fiber_to_fiber(
    spectra: np.ndarray,
    variance: np.ndarray,
    wave: np.ndarray,
    dead: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    knot_spacing: float = SOURCE_KNOT_SPACING,
    throughput_spacing: float = THROUGHPUT_KNOT_SPACING,
    nsigma: float = 5.0,
    niter: int = 3,
    min_snr: float = MIN_SNR,
    min_throughput: float = MIN_THROUGHPUT,
) -> FiberFlat:
    """Relative throughput of every fiber from twilight or internal-flat spectra.

    Parameters
    ----------
    spectra : ndarray, shape (nfiber, ncol) or (nexp, nfiber, ncol)
        Extracted flat-field spectra (electrons per column), bias subtracted. Several
        exposures are summed (the product of source and throughput still factorises).
    variance : ndarray, same shape as ``spectra``
        Their variance (electrons^2).
    wave : ndarray, shape (nfiber, ncol)
        Wavelength (air Angstrom) of every fiber at every column, increasing with column.
    dead : ndarray of bool, shape (nfiber,)
        Fibers known to be dead (no light expected).
    mask : ndarray of bool, same shape as ``spectra``, optional
        Pixels to ignore (True = bad).
    knot_spacing : float
        Breakpoint spacing of the common spectrum, in pixels of the median dispersion.
    throughput_spacing : float
        Breakpoint spacing (columns) of each fiber's throughput curve.
    nsigma : float
        Clipping threshold (standard deviations of the model noise).
    niter : int
        Alternations of the source and throughput fits (each followed by clipping).
    min_snr : float
        Minimum median signal-to-noise ratio per column of the live fibers.
    min_throughput : float
        Live fibers whose median level is below this fraction of the median fiber are
        flagged as dead (with a warning).

    Returns
    -------
    FiberFlat
        ``ftf`` normalised to a median of 1 over the live fibers at every column.

    Raises
    ------
    ValueError
        Inconsistent shapes, wavelengths not increasing, no live fiber, or a flat too faint
        (median S/N per column below ``min_snr``).
    """
    spectra, variance, wave, dead, bad = _as_inputs(spectra, variance, wave, dead, mask)
    nfib, ncol = spectra.shape
    live = ~dead
    if not live.any():
        raise ValueError("every fiber is dead: no fiber-to-fiber can be measured")
    dlam = np.gradient(wave, axis=1)
    if not np.all(dlam[live] > 0):
        raise ValueError("wavelengths must be finite and increase with column for live fibers")

    finite = np.isfinite(spectra) & np.isfinite(variance) & (variance > 0) & ~bad
    usable = live[:, None] & finite
    y = np.where(usable, spectra, 0.0) / dlam  # electrons per Angstrom
    vy = np.where(usable, variance, 1.0) / dlam**2
    if usable.sum() < ncol:
        raise ValueError("too few valid pixels for a fiber-to-fiber")
    snr = float(np.median(y[usable] / np.sqrt(vy[usable])))
    if not snr >= min_snr:
        raise ValueError(f"flat too faint for a fiber-to-fiber: median S/N per column "
                         f"{snr:.2f} < {min_snr:g}")

    # ---- starting point: one grey level per fiber; fibers without light become dead
    level = _row_median(y, usable)
    ref = np.nanmedian(level[live])
    newly_dead = live & ~(level > min_throughput * ref)
    if newly_dead.any():
        log.warning("fibers %s have less than %.0f%% of the median flat level; flagged dead",
                    np.flatnonzero(newly_dead).tolist(), 100 * min_throughput)
    dead = dead | newly_dead
    live = ~dead
    usable &= live[:, None]
    ftf = np.where(live, level / ref, 0.0)[:, None] * np.ones(ncol)

    # ---- basis functions, built once
    pix = np.flatnonzero(usable.ravel())  # every usable pixel of a live fiber
    order = np.argsort(wave.ravel()[pix], kind="stable")
    pix = pix[order]
    x = wave.ravel()[pix]
    knots = clamped_knots(x[0], x[-1], knot_spacing * float(np.median(dlam[live])))
    src = SplineDesign(x, knots)
    cols = np.arange(ncol, dtype=float)
    tknots = clamped_knots(0.0, ncol - 1.0, throughput_spacing)
    tbasis = BSpline.design_matrix(cols, tknots, _DEGREE).toarray()
    tpen = _difference_penalty(tbasis.shape[1]).toarray()
    excess = _row_median(variance - np.maximum(spectra, 0), usable)
    excess = np.clip(np.nan_to_num(excess), 0.0, None)  # read noise etc. (e-^2 per column)

    good = usable.copy()
    var_model = vy
    s_pix = np.zeros((nfib, ncol))
    for it in range(niter + 1):
        # common spectrum from all live fibers' pixels, each divided by its throughput
        yf, vf, tf = (a.ravel()[pix] for a in (y, var_model, ftf))
        w = np.where(good.ravel()[pix] & (tf > 0), tf**2 / vf, 0.0)
        coeffs = src.fit(np.divide(yf, tf, out=np.zeros_like(yf), where=tf > 0), w)
        s_pix.ravel()[pix] = src.evaluate(coeffs)
        if it == niter:
            break
        # smooth throughput of each fiber: data over the common spectrum at its wavelengths
        ok = good & (s_pix > 0)
        wr = np.where(ok, s_pix**2 / var_model, 0.0)
        ratio = np.divide(y, s_pix, out=np.zeros_like(y), where=ok)
        ftf = np.where(live[:, None], _fit_rows(ratio, wr, tbasis, tpen), 0.0)
        norm = np.median(ftf[live], axis=0)
        ftf /= np.where(norm > 0, norm, 1.0)
        # noise of the model (not of the data: unbiased weights), then clip
        counts = ftf * s_pix * dlam
        var_model = np.where(usable, (np.maximum(counts, 0) + excess[:, None]), 1.0) / dlam**2
        resid = (y - ftf * s_pix) / np.sqrt(var_model)
        good = usable & (np.abs(resid) <= nsigma)
        log.debug("fiber_to_fiber iteration %d: %d pixels clipped", it + 1,
                  int(usable.sum() - good.sum()))

    resid = (y - ftf * s_pix) / np.sqrt(var_model)
    ngood = good.sum(axis=1)
    dof = np.maximum(ngood - tbasis.shape[1], 1)
    chi2 = np.where(live, np.where(good, resid**2, 0.0).sum(axis=1) / dof, np.nan)
    source_wave = np.median(wave[live], axis=0)
    spline = BSpline(knots, coeffs, _DEGREE, extrapolate=False)
    result = FiberFlat(
        ftf=ftf,
        dead=dead,
        newly_dead=newly_dead,
        source_wave=source_wave,
        source_spectrum=spline(source_wave),
        source_knots=knots,
        source_coeffs=coeffs,
        rejected=live[:, None] & ~good,
        chi2=chi2,
        snr=snr,
    )
    log.info("fiber-to-fiber: %d live fibers, median S/N %.0f per column, throughput "
             "5-95%% range %.3f-%.3f, median chi2 %.2f, %d pixels rejected",
             int(live.sum()), snr, *np.percentile(ftf[live], [5, 95]),
             float(np.nanmedian(chi2)), int(result.rejected.sum()))
    return result


# --------------------------------------------------------------------------- pixel flat


def pixel_map(trace: np.ndarray, values: np.ndarray, nrow: int) -> np.ndarray:
    """A per-fiber quantity at every pixel of a channel frame, interpolated between fibers.

    Used for the wavelength (``bigw``) and fiber-to-fiber (``bigf``) of every pixel.

    Parameters
    ----------
    trace : ndarray, shape (nfiber, ncol)
        Row of every fiber's centre at every column (increasing with fiber).
    values : ndarray, shape (nfiber, ncol)
        The quantity (e.g. wavelength in Angstrom) of every fiber at every column.
    nrow : int
        Rows of the frame.

    Returns
    -------
    ndarray, shape (nrow, ncol)
        Rows outside the traces take the nearest fiber's value.
    """
    trace = np.asarray(trace, dtype=float)
    values = np.asarray(values, dtype=float)
    rows = np.arange(nrow, dtype=float)
    # np.interp's arithmetic in one pass over the frame where the traces increase strictly
    # (as fibers do); np.interp itself on any other column
    plain = np.all(np.isfinite(trace), axis=0)
    if trace.shape[0] > 1:
        plain &= np.all(np.diff(trace, axis=0) > 0, axis=0)
    out = _pixel_map_kernel(trace, values, nrow, plain)
    for c in np.flatnonzero(~plain):
        out[:, c] = np.interp(rows, trace[:, c], values[:, c])
    return out


@njit(cache=True, nogil=True, error_model="numpy")  # IEEE division (columns not plain)
def _pixel_map_kernel(trace, values, nrow, plain):
    """np.interp(rows, trace[:, c], values[:, c]) for the ``plain`` columns (traces finite
    and strictly increasing), with np.interp's operations: the slope of each interval
    ``(f1 - f0) / (x1 - x0)``, then ``slope * (row - x0) + f0``, the values at or beyond
    the ends held, and its retries from the upper end of an interval for NaN. Row by row,
    with the interval of every column carried to the next row."""
    nfib, ncol = trace.shape
    out = np.empty((nrow, ncol))
    slopes = np.empty((max(nfib - 1, 1), ncol))
    for i in range(nfib - 1):
        for c in range(ncol):
            slopes[i, c] = (values[i + 1, c] - values[i, c]) / (trace[i + 1, c] - trace[i, c])
    j = np.zeros(ncol, np.int64)
    for r in range(nrow):
        x = float(r)
        for c in range(ncol):
            if not plain[c]:
                continue
            if x < trace[0, c]:
                out[r, c] = values[0, c]
                continue
            if x > trace[nfib - 1, c]:
                out[r, c] = values[nfib - 1, c]
                continue
            k = j[c]
            while k < nfib - 1 and trace[k + 1, c] <= x:
                k += 1
            j[c] = k
            if k == nfib - 1 or trace[k, c] == x:
                out[r, c] = values[k, c]
                continue
            slope = slopes[k, c]
            v = slope * (x - trace[k, c]) + values[k, c]
            if np.isnan(v):
                v = slope * (x - trace[k + 1, c]) + values[k + 1, c]
                if np.isnan(v) and values[k, c] == values[k + 1, c]:
                    v = values[k, c]
            out[r, c] = v
    return out


def _near_traces(trace: np.ndarray, nrow: int, half_width: float) -> np.ndarray:
    """Pixels within ``half_width`` rows of any of the given traces, (nrow, ncol) bool."""
    ncol = trace.shape[1]
    near = np.zeros((nrow, ncol), bool)
    r0 = np.floor(trace - half_width + 0.5).astype(int)
    cols = np.broadcast_to(np.arange(ncol), trace.shape)
    for j in range(int(np.ceil(2 * half_width)) + 1):
        rows = r0 + j
        ok = (rows >= 0) & (rows < nrow) & (np.abs(rows - trace) <= half_width)
        near[rows[ok], cols[ok]] = True
    return near


def pixel_flat(
    image: np.ndarray,
    variance: np.ndarray,
    trace: np.ndarray,
    *,
    wave: np.ndarray | None = None,
    source: Callable[[np.ndarray], np.ndarray] | None = None,
    dead: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    window: int = 61,
    half_width: float = 3.5,
    min_snr: float = 20.0,
    nsigma: float = 5.0,
    niter: int = 2,
    shrink: bool = True,
    return_error: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Pixel-to-pixel flat field (relative quantum efficiency) from a flat-field frame.

    Along every row the illuminated pixels are fitted by a running quadratic
    (Savitzky-Golay, ``window`` columns) with iterative outlier rejection; that keeps the
    slowly changing cross-dispersion profile and spectrum while it removes pixel-to-pixel
    variations. The flat is the frame divided by this model. For a source with sharp
    spectral features (twilight), pass ``wave`` and ``source`` (e.g.
    :meth:`FiberFlat.source`): the frame is first divided by the source spectrum at every
    pixel's wavelength, so that only smooth structure is left for the row fit.

    Parameters
    ----------
    image : ndarray, shape (nrow, ncol)
        Bias-subtracted flat-field frame (electrons); a sum of frames improves the result.
    variance : ndarray, shape (nrow, ncol)
        Its variance (electrons^2).
    trace : ndarray, shape (nfiber, ncol)
        Row of every fiber's centre at every column.
    wave : ndarray, shape (nfiber, ncol), optional
        Wavelength (Angstrom) of every fiber at every column; needed with ``source``.
    source : callable, optional
        Source spectrum (electrons per Angstrom) as a function of wavelength (Angstrom).
    dead : ndarray of bool, shape (nfiber,), optional
        Dead fibers: their rows are not measured.
    mask : ndarray of bool, shape (nrow, ncol), optional
        Pixels to leave unmeasured (True = bad, e.g. cosmic rays or bad columns).
    window : int
        Columns of the running quadratic (odd).
    half_width : float
        Pixels within this many rows of a live fiber's trace are measured.
    min_snr : float
        Minimum signal-to-noise ratio of a pixel for it to be measured.
    nsigma : float
        Rejection threshold (standard deviations, photon noise plus the measured
        pixel-to-pixel scatter). High outliers (cosmic rays) are left unmeasured.
    niter : int
        Iterations of the row fit (each after rejection against the previous model; the
        first rejection is against block medians of the rows).
    shrink : bool
        Return the minimum-variance estimate: each measured deviation from 1 is scaled by
        ``q^2 / (q^2 + noise^2)``, with ``q`` the pixel-to-pixel rms measured on the
        best-exposed pixels and ``noise`` the pixel's relative photon noise, so that a
        noisy pixel is never made worse by the flat. Strong low outliers (cold pixels)
        are kept as measured. With ``False`` the plain ratio frame / model is returned.
    return_error : bool
        Also return the 1-sigma uncertainty of every pixel of the flat.

    Returns
    -------
    flat : ndarray of float32, shape (nrow, ncol)
        Relative quantum efficiency (mean 1 on smooth scales); exactly 1 for pixels not
        measured (too little light, far from a live fiber, masked or rejected high).
    error : ndarray of float32, shape (nrow, ncol)
        Only with ``return_error``: 1-sigma uncertainty of ``flat`` (dimensionless); for
        pixels not measured ``q`` when shrinking, infinite otherwise.

    Raises
    ------
    ValueError
        Inconsistent shapes, an even or too short ``window``, ``source`` without ``wave``,
        or no pixel with enough light.
    """
    image = np.asarray(image)
    variance = np.asarray(variance)
    trace = np.asarray(trace, dtype=float)
    nrow, ncol = image.shape
    if variance.shape != image.shape:
        raise ValueError(f"variance {variance.shape} does not match image {image.shape}")
    if trace.ndim != 2 or trace.shape[1] != ncol:
        raise ValueError(f"trace {trace.shape} does not match image columns ({ncol})")
    if window % 2 != 1 or window < 5 or window > ncol:
        raise ValueError(f"window must be odd and between 5 and {ncol}, not {window}")
    live = np.ones(trace.shape[0], bool) if dead is None else ~np.asarray(dead, dtype=bool)
    # Every step but the pixel-to-pixel rms works along rows, so the frame is processed in
    # bands of rows (float64 working arrays of a band, not of the frame); the rms is
    # gathered from all bands in row order, so the result does not depend on the bands.
    bands = [slice(r, min(r + PIXEL_FLAT_BAND_ROWS, nrow))
             for r in range(0, nrow, PIXEL_FLAT_BAND_ROWS)]

    ok = np.isfinite(image) & np.isfinite(variance) & (variance > 0)
    if mask is not None:
        ok &= ~np.asarray(mask, dtype=bool)
    if source is not None:
        if wave is None:
            raise ValueError("pixel_flat needs wave to divide by a source spectrum")
        bigw = pixel_map(trace, np.asarray(wave, dtype=float), nrow)
        shape = source(bigw) * np.gradient(bigw, axis=1)
        del bigw
        ok &= np.isfinite(shape) & (shape > 0)
        shape[~ok] = 1.0
    else:
        shape = None  # the source is flat: divisions by 1 left out (exactly the same)
    valid = ok.copy()  # pixels with data, near a fiber or not
    ok &= _near_traces(trace[live], nrow, half_width)

    def band(rows: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray | float]:
        """Data and its excess variance (both divided by the source) of a band, and the
        source."""
        sh = 1.0 if shape is None else shape[rows]
        # noise from the model, not the data (a pixel's own fluctuation must not set its
        # weight or its selection): read-noise part of the variance plus the model's counts
        data, excess = _band_data(image[rows], variance[rows], ok[rows],
                                  np.broadcast_to(np.asarray(sh, float), image[rows].shape))
        return data, excess, sh

    model = np.empty((nrow, ncol))
    use = np.empty((nrow, ncol), bool)
    for rows in bands:
        data, excess, sh = band(rows)
        # first guess: medians of short blocks of each row (robust to cosmic rays), where a
        # block has enough good pixels, else a running mean; outliers from it (generously: 5 %
        # pixel-to-pixel scatter allowed) start out rejected; then clipped running quadratics
        denom = uniform_filter1d(ok[rows].astype(float), window, axis=1, mode="nearest")
        m = uniform_filter1d(data, window, axis=1, mode="nearest") / np.maximum(denom, 1e-3)
        robust = _block_median(np.where(valid[rows], image[rows].astype(float) / sh, 0.0),
                               valid[rows])
        m = np.where(np.isfinite(robust), robust, m)
        var = excess + np.maximum(m, 0.0) / sh
        use[rows] = ok[rows] & (np.abs(data - m) <= nsigma * np.sqrt(var + (0.05 * m) ** 2))
        model[rows] = m
    del valid
    centre = _savgol_centre_weight(window)
    rel = np.empty((nrow, ncol))
    noise2 = np.empty((nrow, ncol))
    lit = np.empty((nrow, ncol), bool)
    bright = np.empty((nrow, ncol), bool)
    # the bright pixels of a band, in row order (rel, noise2)
    sel_rel = np.empty(PIXEL_FLAT_BAND_ROWS * ncol)
    sel_noise2 = np.empty(PIXEL_FLAT_BAND_ROWS * ncol)
    for _ in range(niter):
        rel_bright, noise2_bright = [], []
        for rows in bands:
            data, excess, sh = band(rows)
            filled = np.where(use[rows], data, model[rows])
            smooth = savgol_filter(filled, window, 2, axis=1, mode="interp")
            # leave each pixel out of its own model, so its deviation is not diluted
            nb = _deviations(data, excess, np.broadcast_to(sh, data.shape), filled, smooth,
                             use[rows], ok[rows], centre, float(min_snr**2), model[rows],
                             rel[rows], noise2[rows], lit[rows], bright[rows], sel_rel,
                             sel_noise2)
            rel_bright.append(sel_rel[:nb].copy())
            noise2_bright.append(sel_noise2[:nb].copy())
        if not sum(r.size for r in rel_bright):
            raise ValueError(f"no pixel reaches S/N {min_snr:g}: the flat is too faint "
                             f"for a pixel flat")
        qe_rms = _excess_scatter(np.concatenate(rel_bright), np.concatenate(noise2_bright))
        del rel_bright, noise2_bright
        # faint pixels too: a cosmic ray must not stay
        _reselect(rel, noise2, lit, bright, nsigma, float(qe_rms**2), use, False)
    del model, sel_rel, sel_noise2
    # high outliers (cosmic rays) unmeasured
    _reselect(rel, noise2, lit, bright, nsigma, float(qe_rms**2), use, True)
    measured = np.isfinite(noise2)
    log.info("pixel flat: %d pixels measured (S/N >= %g), pixel-to-pixel rms %.4f, "
             "median noise of a measured pixel %.4f%s", int(measured.sum()), min_snr, qe_rms,
             float(np.sqrt(np.median(noise2[measured]))), " (shrunk)" if shrink else "")
    flat = np.empty((nrow, ncol), np.float32)
    error = np.empty((nrow, ncol), np.float32) if return_error else None
    for rows in bands:
        f, e = _finish(rel[rows], noise2[rows], qe_rms if shrink else None, nsigma,
                       with_error=return_error)
        flat[rows] = f
        if return_error:
            error[rows] = e
    return (flat, error) if return_error else flat


def combine_pixel_flats(
    flats: Sequence[np.ndarray],
    errors: Sequence[np.ndarray],
    *,
    shrink: bool = True,
    nsigma: float = 5.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Inverse-variance combination of independent pixel-flat measurements.

    The quantum efficiency of a pixel does not change from night to night, so the flats of
    many nights (internal flats and twilights alike) can be combined pixel by pixel; this
    is how a pixel flat much better than the photon noise of one night's flats is built.

    Parameters
    ----------
    flats, errors : sequence of ndarray, shape (nrow, ncol)
        Plain (not shrunk) measurements and their 1-sigma errors, as returned by
        ``pixel_flat(..., shrink=False, return_error=True)``; an infinite error marks a
        pixel that was not measured.
    shrink : bool
        Apply the minimum-variance shrinkage of :func:`pixel_flat` to the combination.
    nsigma : float
        Deviation (standard deviations) beyond which a low pixel is kept as measured
        when shrinking.

    Returns
    -------
    flat, error : ndarray of float32, shape (nrow, ncol)
        Combined flat (1 where no input measured the pixel) and its uncertainty.
    """
    if len(flats) == 0 or len(flats) != len(errors):
        raise ValueError("need one error array for each of at least one flat")
    wsum = np.zeros(np.shape(flats[0]))
    rsum = np.zeros_like(wsum)
    for flat, error in zip(flats, errors):
        err = np.asarray(error, dtype=float)
        if err.shape != wsum.shape or np.shape(flat) != wsum.shape:
            raise ValueError("all flats and errors must have the same shape")
        w = np.where(np.isfinite(err) & (err > 0), 1.0 / np.where(err > 0, err, 1.0) ** 2, 0.0)
        wsum += w
        rsum += w * (np.asarray(flat, dtype=float) - 1.0)
    measured = wsum > 0
    rel = np.where(measured, rsum / np.where(measured, wsum, 1.0), 0.0)
    noise2 = np.where(measured, 1.0 / np.where(measured, wsum, 1.0), np.inf)
    qe_rms = _excess_scatter(rel[measured], noise2[measured]) if measured.any() else 0.0
    log.info("combined %d pixel flats: %d pixels measured, pixel-to-pixel rms %.4f, median "
             "noise %.4f", len(flats), int(measured.sum()), qe_rms,
             float(np.sqrt(np.median(noise2[measured]))) if measured.any() else np.nan)
    return _finish(rel, noise2, qe_rms if shrink else None, nsigma)


def _finish(rel: np.ndarray, noise2: np.ndarray, qe_rms: float | None, nsigma: float,
            with_error: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Flat and error from relative deviations and their variance (inf = not measured).

    With ``qe_rms`` the deviations are shrunk to the posterior mean for a pixel-to-pixel
    scatter ``qe_rms`` (strong low outliers, cold pixels, are kept as measured) and
    unmeasured pixels get error ``qe_rms``; without it the plain values are returned and
    unmeasured pixels get an infinite error. Without ``with_error`` the error is None.
    """
    if qe_rms is None:
        return ((1.0 + rel).astype(np.float32),
                np.sqrt(noise2).astype(np.float32) if with_error else None)
    q2 = qe_rms**2
    cold = rel < -nsigma * np.sqrt(noise2 + q2)
    with np.errstate(divide="ignore"):
        post2 = 1.0 / (1.0 / q2 + 1.0 / noise2) if q2 > 0 else np.zeros_like(noise2)
    gain = np.where(cold, 1.0, np.divide(post2, noise2, out=np.zeros_like(post2),
                                         where=np.isfinite(noise2)))
    flat = (1.0 + gain * rel).astype(np.float32)
    if not with_error:
        return flat, None
    return flat, np.sqrt(np.where(cold, noise2, post2)).astype(np.float32)


def _block_median(values: np.ndarray, good: np.ndarray, block: int = 32) -> np.ndarray:
    """Median of the good values in blocks of ``block`` columns of every row, interpolated
    linearly to every column; NaN where a block has fewer than half its pixels good.

    Blocks tile the row from column 0; one more block ends at the last column.
    """
    ncol = values.shape[1]
    nblock = ncol // block
    if nblock < 2:
        return np.full(values.shape, np.nan)
    starts = np.unique(np.r_[np.arange(nblock) * block, ncol - block])
    cols = starts[:, None] + np.arange(block)  # (nb, block)
    v = np.where(good, values, np.inf)[:, cols]  # (nrow, nb, block)
    v.sort(axis=2)
    n = good[:, cols].sum(axis=2)
    lo = np.take_along_axis(v, np.maximum(n - 1, 0)[..., None] // 2, axis=2)[..., 0]
    hi = np.take_along_axis(v, np.minimum(n // 2, block - 1)[..., None], axis=2)[..., 0]
    med = np.where(2 * n >= block, 0.5 * (lo + hi), np.nan)
    # linear interpolation from block centres to columns (constant beyond the end centres)
    centres = starts + (block - 1) / 2
    c = np.clip(np.arange(ncol), centres[0], centres[-1])
    i0 = np.clip(np.searchsorted(centres, c, side="right") - 1, 0, len(centres) - 2)
    f = (c - centres[i0]) / (centres[i0 + 1] - centres[i0])
    return med[:, i0] * (1 - f) + med[:, i0 + 1] * f


def _savgol_centre_weight(window: int) -> float:
    """Weight of the central sample in a quadratic Savitzky-Golay smoothing filter."""
    impulse = np.zeros(window)
    impulse[window // 2] = 1.0
    return float(savgol_filter(impulse, window, 2, mode="constant")[window // 2])


@njit(cache=True, nogil=True)
def _band_data(image, variance, ok, sh):
    """A band's data ``image / sh`` and excess variance ``max(variance - max(image, 0), 0)
    / sh**2`` in float64 (0 where not ``ok``), as the array code computes them."""
    nrow, ncol = image.shape
    data = np.empty((nrow, ncol))
    excess = np.empty((nrow, ncol))
    for r in range(nrow):
        for c in range(ncol):
            s = sh[r, c]
            if ok[r, c]:
                img = np.float64(image[r, c])
                data[r, c] = img / s
                e = np.float64(variance[r, c]) - max(img, 0.0)
                excess[r, c] = max(e, 0.0) / (s * s)
            else:
                data[r, c] = 0.0
                excess[r, c] = 0.0 / (s * s)
    return data, excess


@njit(cache=True, nogil=True)
def _deviations(data, excess, sh, filled, smooth, use, ok, centre, min_snr2, model, rel, noise2,
                lit, bright, sel_rel, sel_noise2):
    """One band of an iteration of :func:`pixel_flat` after the row fit ``smooth``: the
    model with each used pixel left out of its own fit, the lit and bright pixels, their
    relative deviations and variances (written into ``model``, ``rel``, ``noise2``, ``lit``,
    ``bright``), and the bright pixels' values in row order in ``sel_rel``, ``sel_noise2``;
    returns how many. ``sh`` is the source at every pixel (1 when there is none).

    The arithmetic is that of the array code: ``m = (smooth - centre * filled) /
    (1 - centre)`` where used, ``var = excess + max(m, 0) / sh``, bright where
    ``m * m >= min_snr2 * var``, ``rel = data / m - 1``, ``noise2 = var / m**2``."""
    nrow, ncol = data.shape
    one = 1.0 - centre
    nb = 0
    for r in range(nrow):
        for c in range(ncol):
            sm = smooth[r, c]
            m = (sm - centre * filled[r, c]) / one if use[r, c] else sm
            model[r, c] = sm
            litb = ok[r, c] and m > 0
            lit[r, c] = litb
            if not litb:
                rel[r, c] = 0.0
                noise2[r, c] = np.inf
                bright[r, c] = False
                continue
            var = excess[r, c] + m / sh[r, c]  # m > 0: max(m, 0) is m
            rb = data[r, c] / m - 1.0
            nb2 = var / (m * m)
            rel[r, c] = rb
            noise2[r, c] = nb2
            brightb = m * m >= min_snr2 * var
            bright[r, c] = brightb
            if brightb:
                sel_rel[nb] = rb
                sel_noise2[nb] = nb2
                nb += 1
    return nb


@njit(cache=True, nogil=True)
def _reselect(rel, noise2, lit, bright, nsigma, q2, use, final):
    """Pixels within ``nsigma`` of 0 in ``rel`` (``sqrt(noise2 + q2)`` per pixel): with
    ``final`` False the lit ones are the next iteration's ``use`` (both signs); with
    ``final`` the bright ones not high keep their values, the others become unmeasured
    (``rel`` 0, ``noise2`` inf)."""
    nrow, ncol = rel.shape
    for r in range(nrow):
        for c in range(ncol):
            limit = nsigma * np.sqrt(noise2[r, c] + q2)
            if final:
                if not (bright[r, c] and rel[r, c] <= limit):
                    rel[r, c] = 0.0
                    noise2[r, c] = np.inf
            else:
                use[r, c] = lit[r, c] and abs(rel[r, c]) <= limit


def _excess_scatter(rel: np.ndarray, noise2: np.ndarray) -> float:
    """Robust rms of ``rel`` beyond the expected noise (quadrature difference, >= 0)."""
    step = max(1, rel.size // 200_000)  # a regular subsample is plenty
    rel, noise2 = rel[::step], noise2[::step]
    best = noise2 <= np.percentile(noise2, 25)  # the best-exposed pixels
    q16, q84 = np.percentile(rel[best], [16, 84])
    total2 = (0.5 * (q84 - q16)) ** 2
    return float(np.sqrt(max(total2 - np.median(noise2[best]), 0.0)))


# --------------------------------------------------------------------------- illumination


def illumination_pattern(
    flat_ftf: np.ndarray,
    twilight_ftf: np.ndarray,
    positions: np.ndarray,
    dead: np.ndarray,
    *,
    degree: int = 3,
    nsigma: float = 4.0,
    niter: int = 3,
) -> np.ndarray:
    """Illumination pattern of the internal flat over the IFU, measured against a twilight.

    The internal (LDLS) flat does not light the IFU uniformly, so the fiber-to-fiber
    measured from it is the true throughput times a smooth function of the fiber's
    position. Its ratio to a twilight fiber-to-fiber (uniform illumination) is fitted at
    every column with a 2-D Legendre polynomial in the IFU coordinates, with whole fibers
    clipped when they deviate. Dividing an internal flat's ``ftf`` by the pattern removes
    the illumination bias; the pattern belongs to the calibration unit and can be measured
    on a night with both kinds of flat and reused on nights without twilights.

    Parameters
    ----------
    flat_ftf, twilight_ftf : ndarray, shape (nfiber, ncol)
        Fiber-to-fiber from the internal flat and from twilights (:attr:`FiberFlat.ftf`).
    positions : ndarray, shape (nfiber, 2)
        IFU x, y of every fiber (arcsec), e.g. :func:`panacea.instrument.fiber_positions`.
    dead : ndarray of bool, shape (nfiber,)
        Fibers to leave out (dead in either flat).
    degree : int
        Total degree of the 2-D polynomial.
    nsigma : float
        Fibers whose rms deviation from the fit exceeds ``nsigma`` robust standard
        deviations of all fibers are left out of the next fit.
    niter : int
        Fit and clipping iterations.

    Returns
    -------
    ndarray, shape (nfiber, ncol)
        Pattern (median 1 over the live fibers at every column), defined for every fiber.

    Raises
    ------
    ValueError
        Inconsistent shapes or fewer live fibers than polynomial terms.
    """
    flat_ftf = np.asarray(flat_ftf, dtype=float)
    twilight_ftf = np.asarray(twilight_ftf, dtype=float)
    positions = np.asarray(positions, dtype=float)
    if flat_ftf.shape != twilight_ftf.shape or positions.shape != (flat_ftf.shape[0], 2):
        raise ValueError(f"shapes differ: flat {flat_ftf.shape}, twilight {twilight_ftf.shape},"
                         f" positions {positions.shape}")
    live = ~np.asarray(dead, dtype=bool) & np.all(flat_ftf > 0, axis=1) & np.all(
        twilight_ftf > 0, axis=1)
    span = np.ptp(positions, axis=0)
    scaled = 2 * (positions - positions.min(axis=0)) / np.where(span > 0, span, 1.0) - 1
    terms = [(i, j) for i in range(degree + 1) for j in range(degree + 1 - i)]
    if live.sum() <= len(terms):
        raise ValueError(f"{int(live.sum())} live fibers cannot fit {len(terms)} terms")
    design = np.stack([legendre.legval(scaled[:, 0], np.eye(degree + 1)[i])
                       * legendre.legval(scaled[:, 1], np.eye(degree + 1)[j])
                       for i, j in terms], axis=1)
    ratio = np.divide(flat_ftf, twilight_ftf, out=np.ones_like(flat_ftf), where=live[:, None])
    use = live.copy()
    for _ in range(niter):
        coeffs, *_ = np.linalg.lstsq(design[use], ratio[use], rcond=None)
        pattern = design @ coeffs
        rms = np.sqrt(np.mean((ratio / pattern - 1) ** 2, axis=1))
        centre = np.median(rms[live])
        spread = 1.4826 * np.median(np.abs(rms[live] - centre))
        use = live & (rms <= centre + nsigma * max(spread, 1e-6))
    pattern /= np.median(pattern[live], axis=0)
    log.info("illumination pattern of the internal flat: %d fibers used, peak-to-peak %.2f%%,"
             " fiber residual rms %.2f%%", int(use.sum()), 100 * np.ptp(pattern[live]),
             100 * float(np.median(rms[live])))
    return pattern
