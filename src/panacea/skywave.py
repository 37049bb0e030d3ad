"""Wavelength refinement of one science exposure from its own night-sky lines.

The arcs fix each fiber's wavelength solution once per night; the spectrograph then flexes
between the arcs and a science exposure, moving every line by up to a pixel or so. The
night sky carries its own reference: OH bands in red and farred, [O I] 5577/6300/6364,
Na D and the city's Hg lines. For each listed sky line that no comparable neighbour blends,
the sky fibers' extracted spectra are stacked around the column the arc solution predicts
(each fiber at its own sub-pixel phase), and one Gaussian fitted to the stack gives the
line's offset. The offsets of all lines give a shift (and, with enough lines spread over
the detector, a stretch and up to a cubic curve) in columns with an uncertainty; the
fibers' wavelengths are then re-evaluated at the shifted columns. Where too few lines are
seen, a template fit of the stacked sky with Gaussians at all listed lines of the
channel (one common shift) is made too, and the more precise of the two kept. An offset is
applied when that is expected to leave a smaller error than the arcs alone: its RMS over the
detector at least sqrt(2) times its error (which includes the arc solution's own scatter);
otherwise nothing is corrected (method ``none``, the measurement kept in ``rejected``).

All functions take and return arrays; columns and shifts are in pixels of the stitched
channel frame, wavelengths in air Angstrom.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import median_filter
from scipy.optimize import least_squares, leastsq

from . import instrument
from .medians import nanmedian

log = logging.getLogger(__name__)

#: Half width (px) of the window stacked around each line.
HALF_WINDOW = 9
#: Columns on each side of a line (beyond +-CORE px) that set its local continuum.
CORE = 5.5
#: A line is used when no other listed line of at least this fraction of its strength lies
#: within BLEND_FWHM line-spread widths of it.
BLEND_FRACTION = 0.15
BLEND_FWHM = 2.2
#: Columns within this many line-spread widths of a weaker or farther listed neighbour are
#: left out of a line's stack.
NEIGHBOUR_FWHM = 1.5
#: Smallest signal-to-noise of a line's stacked amplitude for it to count.
MIN_LINE_SNR = 8.0
#: Most model evaluations of one line fit: a Gaussian fit from the stack's own start takes
#: 5-15 (at most ~60 on the default night); one still wandering after this many runs off to
#: a zero or detector-wide width, which the width check rejects anyway.
MAX_EVALUATIONS = 200
#: Largest shift (px) searched for and accepted.
MAX_SHIFT = 2.5
#: Fewest lines, and smallest spread of their columns (fraction of the detector), for a stretch.
MIN_LINES_STRETCH = 5
MIN_SPREAD_STRETCH = 0.4
#: Fewest lines and smallest spread for a curved (up to MAX_DEGREE) offset: with dozens of
#: lines (red, farred) the sky also takes out the arc solution's low-order errors.
MIN_LINES_CURVE = 12
MIN_SPREAD_CURVE = 0.6
MAX_DEGREE = 3
#: Largest 1-sigma error (px) of an applied shift: beyond it the error itself is not trusted.
MAX_ERROR = 0.5
#: The rule that minimises the expected error: applying a measured offset ``s`` (error ``e``)
#: leaves about ``e``; leaving it out leaves the true offset, estimated as
#: ``sqrt(s**2 - e**2)``. So an offset is applied when its RMS over the detector is at least
#: ``sqrt(2)`` errors.
MIN_SIGNIFICANCE = float(np.sqrt(2.0))
#: Fraction of the arc solution's scatter (WAVERMS) added in quadrature to the error of the
#: combined offset, whatever the number of lines: the arc solution's errors are correlated
#: along the detector (ripples), so this part does not average down over the sky lines. Set
#: from the pulls of 160 exposures of 10 randomized nights against truth (benchmarks:
#: docs/skywave.md): without it red and farred pulls had an RMS of 1.4-1.5, with it 1.0-1.1.
ARC_SYSTEMATIC = 0.3
#: Fraction of the live fibers, the faintest, used as sky fibers when a source is seen: a
#: fiber brighter than the median fiber by more than SKY_CLIP robust spreads (of the fibers'
#: median fluxes); in a blank field every live fiber is sky.
SKY_FIBER_FRACTION = 0.7
SKY_CLIP = 5.0


@dataclass(frozen=True)
class SkyShift:
    """The sky's offset from the arc solution in one exposure and channel.

    Attributes
    ----------
    shift : float
        Offset (px) of the sky lines from the columns the arcs predict, at the detector's
        centre column; positive when the lines sit at larger columns.
    stretch : float
        Half the offset (px) at the last column minus that at the first.
    error : float
        1-sigma uncertainty of ``shift`` (px).
    nlines : int
        Sky lines used (0 for ``xcorr`` and ``none``).
    method : str
        ``lines`` (lines fitted one by one), ``xcorr`` (template fit of all lines together)
        or ``none`` (not measured, or not trusted: no correction).
    line_waves, line_cols, line_shifts, line_errors : ndarray
        Per-line wavelength (A), mean predicted column, measured offset and error (px).
    """

    shift: float = 0.0
    stretch: float = 0.0
    error: float = 0.0
    nlines: int = 0
    method: str = "none"
    line_waves: np.ndarray = field(default_factory=lambda: np.zeros(0))
    line_cols: np.ndarray = field(default_factory=lambda: np.zeros(0))
    line_shifts: np.ndarray = field(default_factory=lambda: np.zeros(0))
    line_errors: np.ndarray = field(default_factory=lambda: np.zeros(0))
    #: Legendre coefficients (px) of the offset over the columns (x = -1..1); empty: the
    #: linear ``shift + stretch * x``
    coeffs: tuple = ()
    #: a measurement that was not applied (method ``none``): (shift px, error px, method);
    #: empty when nothing was measured
    rejected: tuple = ()

    def offsets(self, ncol: int) -> np.ndarray:
        """Column offset (px) of the sky from the arc solution at every column."""
        if self.coeffs:
            return np.polynomial.legendre.legval(_norm_col(ncol), self.coeffs)
        return self.shift + self.stretch * _norm_col(ncol)


def _norm_col(ncol: int) -> np.ndarray:
    c = np.arange(ncol, dtype=float)
    return (c - (ncol - 1) / 2) / ((ncol - 1) / 2)


def usable_lines(wave: np.ndarray, lsf_fwhm: float = instrument.LSF_FWHM_PIX
                 ) -> list[tuple[float, np.ndarray]]:
    """Listed sky lines inside the solution ``wave`` (280, ncol) with no listed neighbour of
    comparable strength within :data:`BLEND_FWHM` widths: (wavelength A, wavelengths of the
    other listed lines near enough to reach the stacking window, whose columns are masked).
    """
    ref = nanmedian(np.asarray(wave, float), axis=0)
    disp = float(np.median(np.abs(np.diff(ref))))
    lo, hi = np.nanmin(ref) + HALF_WINDOW * disp, np.nanmax(ref) - HALF_WINDOW * disp
    lines = instrument.sky_lines()
    w = np.array([ln.wavelength for ln in lines])
    s = np.array([ln.strength for ln in lines])
    out = []
    for wi, si in zip(w, s):
        if not lo < wi < hi:
            continue
        near = (np.abs(w - wi) < BLEND_FWHM * lsf_fwhm * disp) & (w != wi)
        if np.any(s[near] >= BLEND_FRACTION * si):
            continue
        reach = (np.abs(w - wi) < (HALF_WINDOW + NEIGHBOUR_FWHM * lsf_fwhm) * disp) & (w != wi)
        out.append((float(wi), w[reach]))
    return out


def sky_fibers(flux: np.ndarray, usable: np.ndarray, median: np.ndarray | None = None
               ) -> np.ndarray:
    """The sky fibers: every usable fiber in a blank field (no fiber's median flux more than
    :data:`SKY_CLIP` robust spreads above the median fiber's), else the faintest
    :data:`SKY_FIBER_FRACTION` of them, so that a source's fibers and wings stay out of the
    stack. ``median``: each fiber's median flux (electrons per column) when already known
    (NaNs ignored, as :func:`numpy.nanmedian`)."""
    med = nanmedian(np.asarray(flux, float), axis=1) if median is None else median
    level = np.where(usable, med, np.inf)
    live = level[usable & np.isfinite(level)]
    keep = np.zeros(flux.shape[0], bool)
    if live.size == 0:
        return keep
    mid = float(np.median(live))
    spread = 1.4826 * float(np.median(np.abs(live - mid)))
    if live.size == usable.sum() and np.max(live) <= mid + SKY_CLIP * spread:
        return usable.copy()
    n = max(int(SKY_FIBER_FRACTION * usable.sum()), 1)
    keep[np.argsort(level)[:n]] = True
    return keep & usable


def _levels(flux: np.ndarray, fibers: np.ndarray, median: np.ndarray | None = None
            ) -> np.ndarray:
    """Relative level of each fiber (median over its columns, over the sky fibers' median;
    1 where that is not positive): the fibers' throughputs, nearly free of noise.
    ``median``: the fibers' median fluxes when already known."""
    med = nanmedian(np.asarray(flux, float), axis=1) if median is None else median
    ref = float(np.nanmedian(med[fibers])) if fibers.any() else 0.0
    if not ref > 0:
        return np.ones(flux.shape[0])
    rel = med / ref
    return np.where(np.isfinite(rel) & (rel > 0.2), rel, 1.0)


def _gauss(x, amp, mu, sig, base):
    return amp * np.exp(-0.5 * ((x - mu) / sig) ** 2) + base


def _gauss_residuals(p, x, y, sw):
    """Weighted residuals ``sw * (model - y)`` of a Gaussian plus constant."""
    return sw * (_gauss(x, *p) - y)


def _gauss_jacobian(p, x, y, sw):
    """Derivatives (rows: amplitude, centre, sigma, base) of :func:`_gauss_residuals`."""
    amp, mu, sig, _ = p
    u = (x - mu) / sig
    g = np.exp(-0.5 * u * u) * sw
    ag = (amp / sig) * g * u
    return np.stack((g, ag, ag * u, sw))


def _columns_of(wave: np.ndarray, wavelength: float) -> np.ndarray:
    """Column (px) of ``wavelength`` in every fiber's solution (NaN outside it)."""
    ncol = wave.shape[1]
    i = np.clip((wave < wavelength).sum(axis=1), 1, ncol - 1)
    rows = np.arange(wave.shape[0])
    w0, w1 = wave[rows, i - 1], wave[rows, i]
    col = i - 1 + (wavelength - w0) / (w1 - w0)
    inside = (wave[:, 0] < wavelength) & (wave[:, -1] > wavelength)
    return np.where(inside, col, np.nan)


def _stack(flux, variance, wave, fibers, wavelength, neighbours=(), lsf_fwhm=4.3,
           level=None):
    """Offsets from the predicted column and continuum-subtracted values of every sky fiber
    around one line, each fiber divided by its ``level`` (a throughput proxy from the whole
    spectrum: a scale from the line's own noisy pixels would weight upward noise near the
    predicted column and pull the fit towards it); ``None`` when too few fibers see it."""
    ncol = flux.shape[1]
    k = np.nonzero(fibers)[0]
    p = _columns_of(wave[k], wavelength)
    start = np.round(np.nan_to_num(p, nan=-1e6)).astype(int) - HALF_WINDOW
    ok = np.isfinite(p) & (start >= 0) & (start + 2 * HALF_WINDOW < ncol)
    k, p, start = k[ok], p[ok], start[ok]
    if k.size < 3:
        return None
    c = start[:, None] + np.arange(2 * HALF_WINDOW + 1)[None, :]
    f, v = flux[k[:, None], c], variance[k[:, None], c]
    x = c - p[:, None]
    free = np.isfinite(f) & (v > 0)
    for wn in neighbours:
        pn = _columns_of(wave[k], wn)
        free &= ~(np.abs(c - pn[:, None]) <= NEIGHBOUR_FWHM * lsf_fwhm)
    side = (np.abs(x) > CORE) & free
    # straight line through the side columns of each fiber (a constant where one side is
    # masked), by the normal equations
    both = (side & (x > 0)).any(axis=1) & (side & (x < 0)).any(axis=1)
    n = side.sum(axis=1)
    sx, sxx = (side * x).sum(axis=1), (side * x * x).sum(axis=1)
    fz = np.where(side, f, 0.0)
    sf, sxf = fz.sum(axis=1), (fz * x).sum(axis=1)
    det = n * sxx - sx**2
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = np.where(both & (det > 0), (n * sxf - sx * sf) / det, 0.0)
        icpt = np.where(both & (det > 0), (sf - slope * sx) / n, sf / n)
    line = f - (icpt[:, None] + slope[:, None] * x)
    core = (np.abs(x) <= CORE) & free
    scale = np.ones(k.size) if level is None else level[k]
    good = (n >= 2) & (scale > 0) & ~((np.abs(x) <= CORE) & ~free).any(axis=1)
    if good.sum() < 3 or np.sum(np.where(core & good[:, None], line, 0.0)) <= 0:
        return None
    sel = free & good[:, None]
    y = line / np.where(good, scale, 1.0)[:, None]
    w = (scale**2)[:, None] / np.where(sel, v, 1.0)
    return x[sel], y[sel], w[sel], float(np.mean(p[good]))


def _start_amplitude(x, y, w, mu0, sig0):
    """Starting amplitude of a line fit: the weighted least-squares amplitude of a Gaussian
    at ``mu0`` of width ``sig0`` plus a constant (the stack is in electrons over the fibers'
    relative level, so its scale is anything from a few to thousands); the unit-area value
    where that is not positive."""
    unit = 1 / (np.sqrt(2 * np.pi) * sig0)
    g = np.exp(-0.5 * ((x - mu0) / sig0) ** 2)
    sw, swg, swgg = np.sum(w), np.sum(w * g), np.sum(w * g * g)
    swy, swgy = np.sum(w * y), np.sum(w * g * y)
    det = sw * swgg - swg**2
    if not det > 0:
        return unit
    amp = (sw * swgy - swg * swy) / det
    return float(amp) if np.isfinite(amp) and amp > 0 else unit


def _fit_line(x, y, w, lsf_fwhm):
    """Gaussian fit to a stack: (offset, error, signal-to-noise) or ``None``."""
    sig0 = lsf_fwhm / 2.3548
    # start from the centroid of the core (robust to a shift of up to MAX_SHIFT)
    core = np.abs(x) <= CORE
    mu0 = float(np.clip(np.sum(x[core] * y[core]) / max(np.sum(y[core]), 1e-12), -2, 2))
    if x.size <= 4 or not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))
                           and np.all(np.isfinite(w))):
        return None
    sw = np.sqrt(w)
    p0 = np.array([_start_amplitude(x, y, w, mu0, sig0), mu0, sig0, 0.0])
    # Levenberg-Marquardt (MINPACK, as curve_fit's default) with the analytic Jacobian: a
    # third of the model evaluations of finite differences, and no curve_fit wrappers
    p, cov, info, _, ier = leastsq(_gauss_residuals, p0, args=(x, y, sw),
                                   Dfun=_gauss_jacobian, col_deriv=True, full_output=True,
                                   maxfev=MAX_EVALUATIONS, xtol=1e-12, ftol=1e-12)
    if ier not in (1, 2, 3, 4) or cov is None:
        return None
    # the covariance scaled by the reduced chi-square (weights relative, not absolute)
    cov = cov * (np.sum(info["fvec"] ** 2) / (x.size - 4))
    err = np.sqrt(np.diag(cov))
    if not np.all(np.isfinite(err)):
        return None
    amp, mu, sig, _ = p
    if not (0.5 * sig0 < abs(sig) < 2.0 * sig0) or abs(mu) > MAX_SHIFT or amp <= 0:
        return None
    return float(mu), float(err[1]), float(amp / err[0])


def _wls(x, s, e, deg):
    """Weighted Legendre fit: coefficients, covariance (unscaled), leverages."""
    v = np.polynomial.legendre.legvander(x, deg) / e[:, None]
    cov = np.linalg.pinv(v.T @ v)
    coef = cov @ (v.T @ (s / e))
    h = np.einsum("li,ij,lj->l", v, cov, v)
    return coef, cov, h


def _whitened(coef, x, s, e):
    """Residuals of offsets ``s`` (errors ``e``) from the Legendre curve ``coef``, in sigmas."""
    return (s - np.polynomial.legendre.legval(x, coef)) / e


def _max_degree(x):
    """Largest Legendre degree of the offsets that the lines at ``x`` support."""
    n = x.size
    spread = np.ptp(x) / 2 if n > 1 else 0.0
    if n < MIN_LINES_STRETCH or spread < MIN_SPREAD_STRETCH:
        return 0
    if n < MIN_LINES_CURVE or spread < MIN_SPREAD_CURVE:
        return 1
    return MAX_DEGREE


def _combine(cols, shifts, errors, ncol):
    """Weighted Legendre fit of the lines' offsets over the detector with 3-sigma clipping
    (sigma from the median absolute residual);
    the degree (up to what the lines support, :func:`_max_degree`) is the simplest whose
    leave-one-out RMS is within 5 % of the best. Returns (coefficients, error of the
    offset at the centre column, kept)."""
    x = (np.asarray(cols) - (ncol - 1) / 2) / ((ncol - 1) / 2)
    s, e = np.asarray(shifts, float), np.asarray(errors, float)
    keep = np.ones(s.size, bool)
    for _ in range(3):
        top = _max_degree(x[keep])
        loo = {}
        for deg in range(top + 1):
            coef, _, h = _wls(x[keep], s[keep], e[keep], deg)
            r = (s[keep] - np.polynomial.legendre.legval(x[keep], coef)) / e[keep]
            loo[deg] = float(np.sqrt(np.mean((r / np.clip(1 - h, 1e-3, None)) ** 2)))
        best = min(loo.values())
        deg = min(d for d in loo if loo[d] <= 1.05 * best)
        coef, cov, _ = _wls(x[keep], s[keep], e[keep], deg)
        resid = (s - np.polynomial.legendre.legval(x, coef)) / e
        n = int(keep.sum())
        chi2 = float(np.sum(resid[keep] ** 2)) / max(n - deg - 1, 1)
        scale = max(chi2, 1.0)
        # clipped on the residuals from a robust (Cauchy-loss) fit against their median
        # absolute value: a least-squares fit and a chi-square that hold the outlier itself
        # (a sky line on a standard star's Halpha wing, a misfit) would hide it
        if n > deg + 2:
            xk, sk, ek = x[keep], s[keep], e[keep]
            rob = least_squares(_whitened, coef, args=(xk, sk, ek), loss="cauchy",
                                f_scale=1.0).x
            rres = _whitened(rob, x, s, e)
            spread = 1.4826 * float(np.median(np.abs(rres[keep])))
            new = np.abs(rres) < 3 * max(spread, 1.0)
        else:
            new = np.abs(resid) < 3 * np.sqrt(scale)
        if n <= 2 or np.array_equal(new, keep) or new.sum() < max(2, n // 2):
            break
        keep = new
    v0 = np.polynomial.legendre.legvander(np.zeros(1), deg)[0]
    return coef, float(np.sqrt(v0 @ cov @ v0 * scale)), keep


def measure_sky_shift(flux: np.ndarray, variance: np.ndarray, wave: np.ndarray,
                      usable: np.ndarray, lsf_fwhm: float = instrument.LSF_FWHM_PIX,
                      arc_rms: float = 0.0) -> SkyShift:
    """Offset of an exposure's sky lines from the arc solution.

    Parameters
    ----------
    flux, variance : ndarray (280, ncol)
        Extracted spectra (electrons per column) and their variance of the exposure.
    wave : ndarray (280, ncol)
        The arc solution (air Angstrom at each fiber's pixel centres).
    usable : ndarray of bool (280,)
        Live fibers that may serve as sky.
    lsf_fwhm : float
        Line-spread FWHM (px).
    arc_rms : float
        Scatter (px) of the arc lines about the arc solution (the bundle's WAVERMS): a sky
        line's offset carries the solution's own local error at its column, so this is added
        in quadrature to every line's error (and to the template fit's, over the number of
        lines it holds), and :data:`ARC_SYSTEMATIC` times it to the combined offset's.

    Returns
    -------
    SkyShift
        Method ``lines`` (the lines measured one by one) or ``xcorr`` (the template fit,
        tried below :data:`MIN_LINES_STRETCH` lines), the one with the smaller error, when
        applying it pays (:func:`_worth_applying`: RMS over the detector at least
        :data:`MIN_SIGNIFICANCE` errors, error at most :data:`MAX_ERROR`); else ``none``
        (zero shift, nothing corrected) with the measurement kept in ``rejected`` (shift,
        error, method), empty when nothing could be measured.
    """
    ncol = flux.shape[1]
    med = nanmedian(np.asarray(flux, float), axis=1)
    fibers = sky_fibers(flux, usable, med)
    level = _levels(flux, fibers, med)
    found = []
    lines = usable_lines(wave, lsf_fwhm)
    for wl, near in lines:
        st = _stack(flux, variance, wave, fibers, wl, near, lsf_fwhm, level)
        if st is None:
            continue
        x, y, w, pc = st
        fit = _fit_line(x, y, w, lsf_fwhm)
        if fit is None or fit[2] < MIN_LINE_SNR:
            continue
        found.append((wl, pc, fit[0], fit[1]))
    candidates = []
    if found:
        wl, pc, sh, er = (np.array(v) for v in zip(*found))
        # the arc solution's own error at each line's column
        er = np.sqrt(np.maximum(er, 1e-3) ** 2 + arc_rms**2)
        coef, error, keep = _combine(pc, sh, er, ncol)
        leg = np.polynomial.legendre
        shift = float(leg.legval(0.0, coef))
        stretch = float(leg.legval(1.0, coef) - leg.legval(-1.0, coef)) / 2
        candidates.append(SkyShift(shift, stretch,
                                   float(np.hypot(error, ARC_SYSTEMATIC * arc_rms)),
                                   int(keep.sum()), "lines", wl, pc, sh, er,
                                   tuple(float(c) for c in coef)))
    # the template fit assumes one shift for every line: when enough lines were measured
    # one by one, their disagreement is the information and the template would hide it
    if len(found) < MIN_LINES_STRETCH:
        xc = _template_candidate(flux, variance, wave, fibers, lsf_fwhm, arc_rms, len(lines))
        if xc is not None:
            candidates.append(xc)
    if not candidates:
        return SkyShift()
    # of the two measurements of the same lines, the more precise one
    best = min(candidates, key=lambda r: r.error if np.isfinite(r.error) else np.inf)
    if _worth_applying(best, ncol):
        return best
    log.info("sky offset %.3f +- %.3f px (%s) not applied: within its error", best.shift,
             best.error, best.method)
    return SkyShift(rejected=(best.shift, best.error, best.method))


def _template_candidate(flux, variance, wave, fibers, lsf_fwhm, arc_rms,
                        nlines: int) -> SkyShift | None:
    """The template fit (:func:`xcorr_shift`) of the sky as a :class:`SkyShift`, its error
    with the arc solution's (WAVERMS over the square root of the ``nlines`` usable lines,
    and the part that does not average down, :data:`ARC_SYSTEMATIC`)."""
    xc = xcorr_shift(flux, wave, fibers, lsf_fwhm, variance)
    if xc is None:
        return None
    nl = max(nlines, 1)
    error = np.sqrt(xc[1] ** 2 + arc_rms**2 / nl + (ARC_SYSTEMATIC * arc_rms) ** 2)
    return SkyShift(xc[0], 0.0, float(error), 0, "xcorr")


def _worth_applying(result: SkyShift, ncol: int) -> bool:
    """Whether applying an offset is expected to leave a smaller error than leaving it out:
    its RMS over the detector at least :data:`MIN_SIGNIFICANCE` times its error, the error at
    most :data:`MAX_ERROR` and the shift within :data:`MAX_SHIFT`."""
    if not (np.isfinite(result.error) and result.error <= MAX_ERROR):
        return False
    if abs(result.shift) > MAX_SHIFT:
        return False
    rms = float(np.sqrt(np.mean(result.offsets(ncol) ** 2)))
    return rms >= MIN_SIGNIFICANCE * result.error


def _mean_sky(flux, variance, wave, fibers, level=None):
    """The sky fibers' spectra averaged on the median fiber's wavelengths (arc solution), each
    divided by its throughput ``level`` (:func:`_levels`) with equal weight, a 51-px running
    median taken out; with the variance of that mean. A fiber's own median is not used as its
    scale: in a faint sky it is read noise, and dividing by it amplifies the noise."""
    ref = nanmedian(np.asarray(wave[fibers], float), axis=0)
    idx = np.nonzero(fibers)[0]
    lev = np.ones(flux.shape[0]) if level is None else level
    total = np.zeros(ref.size)
    var = np.zeros(ref.size)
    for k in idx:
        total += np.interp(ref, wave[k], np.nan_to_num(flux[k])) / lev[k]
        var += np.interp(ref, wave[k], np.nan_to_num(variance[k], nan=0.0)) / lev[k] ** 2
    mean, var = total / idx.size, var / idx.size**2
    return ref, mean - median_filter(mean, 51, mode="nearest"), var


def xcorr_shift(flux: np.ndarray, wave: np.ndarray, fibers: np.ndarray,
                lsf_fwhm: float = instrument.LSF_FWHM_PIX,
                variance: np.ndarray | None = None) -> tuple[float, float] | None:
    """Shift (px) and its 1-sigma error from a template fit to the stacked sky.

    The sky fibers' mean spectrum (continuum removed) is fitted, at trial shifts every
    0.05 px over +-:data:`MAX_SHIFT`, by Gaussians of the line-spread width at every listed
    sky line of the channel, each with a free amplitude (linear least squares, weighted by
    the mean's variance, on the columns within :data:`HALF_WINDOW` of a line). The shift is
    the chi-square minimum (a parabola through its neighbours) and its error the shift that
    raises chi-square by one, scaled by the reduced chi-square when above one: all lines
    together, also those too faint to fit one by one.

    Parameters
    ----------
    flux : ndarray (280, ncol)
        Extracted spectra (electrons per column).
    wave : ndarray (280, ncol)
        The arc solution (air Angstrom).
    fibers : ndarray of bool (280,)
        Sky fibers.
    lsf_fwhm : float
        Line-spread FWHM (px).
    variance : ndarray (280, ncol), optional
        Variance of ``flux`` (electrons^2); without it, Poisson plus 3 e read noise per
        column is assumed.

    Returns
    -------
    tuple of float or None
        (shift, error) in px; ``None`` when no listed line is in the channel, the fit finds
        no line at 5 sigma, or the minimum sits at the edge of the search.
    """
    if fibers.sum() < 3:
        return None
    if variance is None:
        variance = np.clip(flux, 0, None) + 9.0
    level = _levels(flux, fibers)
    ref, sky, var = _mean_sky(flux, variance, wave, fibers, level)
    ncol = ref.size
    cols = np.arange(ncol, dtype=float)
    sig = lsf_fwhm / 2.3548
    lw = np.array([ln.wavelength for ln in instrument.sky_lines()])
    lw = lw[(lw > ref[0]) & (lw < ref[-1])]
    if lw.size == 0:
        return None
    pos = np.interp(lw, ref, cols)
    near = np.abs(cols[:, None] - pos[None, :]).min(axis=1) <= HALF_WINDOW
    near &= (cols > 30) & (cols < ncol - 30) & (var > 0) & np.isfinite(sky)
    if near.sum() < 10:
        return None
    y, w = sky[near], 1.0 / var[near]
    sw = np.sqrt(w)
    lags = np.arange(-MAX_SHIFT, MAX_SHIFT + 1e-9, 0.05)
    chi2 = np.empty(lags.size)
    for i, lag in enumerate(lags):
        g = np.exp(-0.5 * ((cols[near, None] - pos[None, :] - lag) / sig) ** 2)
        g = g[:, g.max(axis=0) > 0.5]  # lines whose peak falls on a used column
        if g.shape[1] == 0:
            chi2[i] = np.sum(w * y**2)
            continue
        amp, *_ = np.linalg.lstsq(g * sw[:, None], y * sw, rcond=None)
        chi2[i] = float(np.sum(w * (y - g @ amp) ** 2))
    j = int(np.argmin(chi2))
    chi0 = float(np.sum(w * y**2))
    if j in (0, lags.size - 1) or chi0 - chi2[j] < 25.0:
        return None
    a, b, c = chi2[j - 1], chi2[j], chi2[j + 1]
    curv = (a - 2 * b + c) / 0.05**2  # d2chi2/dlag2
    if not curv > 0:
        return None
    frac = 0.5 * (a - c) / (a - 2 * b + c)
    shift = float(lags[j] + 0.05 * frac)
    red = max(b / max(int(near.sum()) - lw.size - 1, 1), 1.0)
    error = float(np.sqrt(2.0 / curv * red))
    return shift, error


def apply_shift(wave: np.ndarray, result: SkyShift) -> np.ndarray:
    """Every fiber's wavelengths after the sky's offset: the arc solution evaluated at
    ``column - offset`` (linear extrapolation beyond the detector's ends)."""
    if result.method == "none":
        return wave
    return shifted(wave, result.offsets(wave.shape[1]))


def shifted(wave: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """``wave`` (nfiber, ncol) evaluated at ``column - shift`` (px; ``shift`` broadcast to
    ``wave``'s shape: one per column, or per fiber and column), linearly interpolated
    between columns and extrapolated beyond the detector's ends."""
    nfib, ncol = wave.shape
    at = np.arange(ncol, dtype=float)[None, :] - np.broadcast_to(shift, (nfib, ncol))
    i = np.clip(np.floor(at).astype(int), 0, ncol - 2)
    w0 = np.take_along_axis(wave, i, axis=1)
    w1 = np.take_along_axis(wave, i + 1, axis=1)
    return w0 + (at - i) * (w1 - w0)
