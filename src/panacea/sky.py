"""Sky model of an exposure, fitted on every fiber's own wavelength solution.

Model of the sky in fiber ``k`` at column ``c`` (electrons per column, the units of the
extracted spectra)::

    sky[k, c] = ftf[k, c] * dwave/dc[k, c] * (
        P_k(c) S(w) + Q_k(c) S'(w) + R_k(c) S''(w) ),    w = wave[k, c]

* ``S`` (electrons per Angstrom of a median fiber) is one cubic B-spline in wavelength with
  breakpoints a fraction of a pixel apart, fitted to the pixels of all sky fibers at once
  on their own wavelengths, so nothing is resampled.
* ``P_k`` (dimensionless, a quadratic in column) is the fiber's sky level relative to
  ``ftf``: it absorbs the smooth variation of the sky across the IFU and what the
  fiber-to-fiber does not hold (e.g. the extraction aperture's share of the profile).
  For fibers with object light it is not fitted: the fiber's total sky relative to ``S``
  is predicted from the sky fibers by a quadratic in IFU position (x, y) (a plane when
  fewer than 150 sky fibers remain), and its ``Q_k`` and ``R_k`` from the sky fibers'
  trend along the slit.
* ``Q_k`` (Angstrom, linear in column) is a small wavelength zero-point error of the fiber:
  ``S(w + Q) ~ S + Q S'``.
* ``R_k`` (Angstrom^2, linear in column) is the fiber's difference in line-spread width:
  broadening a Gaussian line by ``d(sigma^2)`` adds ``d(sigma^2) / 2 * S''``.

There is no free additive term per fiber: on a faint, flat continuum it is degenerate with
``P_k``, and the noise of that pair made the lines of a 180 s uv sky 18 % too weak.
Additive errors of the frame (what the overscan leaves of the bias drift) are fitted
between the fibers before extraction (:func:`panacea.extract.optimal`). When the light of
an object in every fiber is known (``object_light``), it is taken out of the sky fibers'
fits as a continuum and out of their totals before the IFU-smooth prediction.

The fits are weighted by ``read_variance + model``, with the zero-signal variance of the
extraction: weights that follow the data's own noise bias a faint sky (a 180 s uv sky was
11 % too high).

Fibers with object light are found automatically and iteratively: a fiber is dropped from
the sky fibers when its fitted level exceeds the IFU-smooth prediction (continuum objects)
or when its residuals, smoothed over a line width, show significant emission or absorption
(emission-line objects), and the model is refitted.

The old ``'template'`` method (median sky spectrum on a common wavelength grid, interpolated
to every fiber and scaled by one number per fiber) is kept for comparison.

Nothing here reads or writes files.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import numpy as np
from numba import njit
from numpy.polynomial import legendre
from scipy.interpolate import BSpline

from panacea import instrument
from panacea.flat import clamped_knots, SplineDesign

log = logging.getLogger(__name__)

#: Breakpoint spacing of the sky spline (pixels of the median dispersion).
KNOT_SPACING = 0.6
#: Degree of the trend of the shift and width terms along the slit.
SLIT_DEGREE = 3
#: Fewest sky fibers for quadratic terms in the IFU-smooth sky level.
QUADRATIC_MIN_FIBERS = 150
#: Polynomial degree (in column) of each fiber's sky level, shift and width terms.
LEVEL_DEGREE = 2
SHIFT_DEGREE = 1
WIDTH_DEGREE = 1
#: Pixels further than this many sigma from the model are left out of the fits.
PIXEL_CLIP = 5.0
#: A fiber whose level exceeds the IFU-smooth prediction by this many (robust) sigma, or
#: whose smoothed residual peaks beyond LINE_CLIP sigma, holds object light.
LEVEL_CLIP = 4.0
LINE_CLIP = 6.0
#: Width (pixels) of the box over which residuals are summed to look for object lines.
LINE_BOX = 5
_DEGREE = 3


@dataclass
class SkyModel:
    """Sky of every fiber of one exposure and channel.

    Attributes
    ----------
    sky : ndarray, shape (nfiber, ncol)
        Sky in every fiber at each of its own columns, in the units of the input ``flux``
        (electrons per column, fiber throughput included). Zero for dead fibers.
    sky_fibers : ndarray of bool, shape (nfiber,)
        Fibers used to fit the sky (live fibers without detected object light).
    chi2_dof : ndarray, shape (nfiber,)
        Reduced chi-square of every fiber's data minus ``sky`` (NaN for dead fibers).
    chi2_dof_sky : float
        Reduced chi-square of all sky-fiber pixels after subtraction.
    method : str
        ``'spline'`` or ``'template'``.
    level : ndarray, shape (nfiber,)
        Mean sky level of each fiber relative to ``ftf`` (dimensionless).
    relative : ndarray, shape (nfiber, ncol), or None
        Throughput of each sky fiber relative to ``ftf``, measured from the sky itself: its
        inverse-variance weighted scale of the common sky (bright lines dominate) over the
        IFU-smooth trend of all sky fibers' scales (one value per fiber, repeated along the
        columns; 1 for other fibers; None for the template method). ``ftf * relative`` is
        the fiber-to-fiber re-derived from the frame (``--correct_ftf``).
    shift : ndarray, shape (nfiber,)
        Mean wavelength shift of each fiber (Angstrom; spline method only, else 0).
    width : ndarray, shape (nfiber,)
        Mean change of each fiber's line-spread variance (Angstrom^2; spline method only).
    wave : ndarray
        Wavelength grid of ``spectrum`` (air Angstrom).
    spectrum : ndarray
        Sky of a median fiber at ``wave`` (electrons per Angstrom for the spline method,
        electrons per column for the template method).
    """

    sky: np.ndarray
    sky_fibers: np.ndarray
    chi2_dof: np.ndarray
    chi2_dof_sky: float
    method: str
    level: np.ndarray
    shift: np.ndarray = field(default_factory=lambda: np.zeros(0))
    width: np.ndarray = field(default_factory=lambda: np.zeros(0))
    wave: np.ndarray = field(default_factory=lambda: np.zeros(0))
    spectrum: np.ndarray = field(default_factory=lambda: np.zeros(0))
    relative: np.ndarray | None = None


def sky_model(
    flux: np.ndarray,
    variance: np.ndarray,
    wave: np.ndarray,
    ftf: np.ndarray,
    dead: np.ndarray,
    positions: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    method: str = "spline",
    knot_spacing: float = KNOT_SPACING,
    n_iter: int = 4,
    sky_fibers: np.ndarray | None = None,
    read_variance: np.ndarray | None = None,
    object_light: np.ndarray | None = None,
    start: np.ndarray | None = None,
) -> SkyModel:
    """Fit the sky of one exposure and channel.

    Parameters
    ----------
    flux : ndarray, shape (nfiber, ncol)
        Extracted spectra (electrons per column) on each fiber's own columns.
    variance : ndarray, shape (nfiber, ncol)
        Variance of ``flux`` (electrons^2).
    wave : ndarray, shape (nfiber, ncol)
        Wavelength of every fiber's pixels (air Angstrom).
    ftf : ndarray, shape (nfiber, ncol)
        Fiber-to-fiber throughput at each fiber's own pixels (dimensionless, median ~1).
    dead : ndarray of bool, shape (nfiber,)
        Dead fibers (no sky is modelled for them).
    positions : ndarray, shape (nfiber, 2), optional
        IFU (x, y) of the fibers (arcsec); default :func:`instrument.fiber_positions`.
    mask : ndarray of bool, shape (nfiber, ncol), optional
        Pixels to ignore (cosmic rays, bad columns).
    method : {'spline', 'template'}
        The B-spline model described in the module docstring, or the old scaled median
        template.
    knot_spacing : float
        Breakpoint spacing of the sky spline (pixels of the median dispersion).
    n_iter : int
        Rounds of fit, fiber rejection and refit (at most: once a rejection after the
        second round keeps the same sky fibers, one more round ends the fit).
    sky_fibers : ndarray of bool, shape (nfiber,), optional
        Fibers to use as sky; when given no fibers are rejected automatically.
    read_variance : ndarray, shape (nfiber, ncol), optional
        ``variance`` at zero signal (read and bias noise). After the first round the fit
        is weighted by ``read_variance + model``, a variance that owes nothing to the
        data's own noise. Default ``variance - flux``, exact for a boxcar sum; for an
        optimal extraction, whose variance grows with the flux faster than one to one,
        that default biased a faint sky high: pass the extraction's own. Spline method
        only.
    object_light : ndarray, shape (nfiber,), optional
        Object light expected in every fiber as a fraction of its sky (e.g. from a star's
        PSF). It is taken out of the sky fibers' totals before the IFU-smooth fit that
        predicts the sky of the object's fibers (a star's faint wings in the sky fibers
        would tilt that prediction up towards the star), and out of the sky fibers' own
        sky as a continuum. Spline method only.
    start : ndarray, shape (nfiber, ncol), optional
        A sky model of the same frame (electrons per column, e.g. :attr:`SkyModel.sky` of
        an earlier fit): the first round is then weighted by ``read_variance + start`` and
        clipped against it as later rounds are against their own model, so that a refit
        needs fewer rounds. Spline method only.

    Returns
    -------
    SkyModel
    """
    flux = np.asarray(flux, float)
    variance = np.asarray(variance, float)
    wave = np.asarray(wave, float)
    ftf = np.asarray(ftf, float)
    live = ~np.asarray(dead, bool) & np.any(ftf > 0, axis=1)
    good = (live[:, None] & (ftf > 0) & (variance > 0) & np.isfinite(flux)
            & np.isfinite(variance))
    if mask is not None:
        good &= ~np.asarray(mask, bool)
    if positions is None:
        positions = instrument.fiber_positions()
    fixed = sky_fibers is not None
    if fixed:
        sky_fibers = np.asarray(sky_fibers, bool) & live
    if method == "template":
        return _template_model(flux, variance, wave, ftf, live, good, sky_fibers)
    if method != "spline":
        raise ValueError(f"unknown sky method {method!r}")
    return _spline_model(flux, variance, wave, ftf, live, good, np.asarray(positions, float),
                         knot_spacing, n_iter, sky_fibers, read_variance, object_light,
                         start)


# --------------------------------------------------------------------------- spline method


def _spline_model(flux, variance, wave, ftf, live, good, positions, knot_spacing, n_iter,
                  sky_fibers, read_variance, object_light, start) -> SkyModel:
    nfib, ncol = flux.shape
    fixed = sky_fibers is not None
    disp = np.gradient(wave, axis=1)
    norm = ftf * disp
    safe = np.where(good, norm, 1.0)
    y = np.where(good, flux / safe, 0.0)  # electrons per Angstrom of a median fiber
    w = np.where(good, safe**2 / np.where(good, variance, 1.0), 0.0)
    var_floor = float(np.median(variance[good])) if good.any() else 1.0
    if read_variance is None:  # a boxcar sum's variance is its read variance plus its signal
        read_variance = variance - flux

    # one design matrix for all live pixels (in their own order: fits and evaluations
    # need no sorting)
    lf = np.flatnonzero(live)
    knots, grid, design = _spline_design(wave, lf, knot_spacing)

    u = np.linspace(-1.0, 1.0, ncol)
    lev_basis = legendre.legvander(u, LEVEL_DEGREE)  # (ncol, nl)
    sh_basis = legendre.legvander(u, SHIFT_DEGREE)
    wd_basis = legendre.legvander(u, WIDTH_DEGREE)
    nl, ns = lev_basis.shape[1], sh_basis.shape[1]
    smooth_basis = _ifu_basis(positions, nfib)

    use = live.copy() if not fixed else sky_fibers.copy()
    level = np.ones((nfib, ncol))
    shift = np.zeros((nfib, ncol))
    width = np.zeros((nfib, ncol))
    pix_ok = good.copy()
    if start is not None:  # weights and clipping from the earlier model, as in later rounds
        w, pix_ok = _model_weights(y, np.asarray(start, float) / safe, norm, safe, good,
                                   read_variance, var_floor)
    spl = np.zeros((3, nfib, ncol))
    coeffs = np.zeros(design.nbasis)
    final = n_iter  # the last round: n_iter, or the one after the sky fibers settle
    for it in range(n_iter + 1):
        # common spectrum from the sky fibers, corrected by their own terms
        corr, wfit, wk = _fit_inputs(y, spl, level, shift, width, w, pix_ok, use)
        coeffs = design.fit(_rows(corr, lf), _rows(wfit, lf))
        spl = _evaluate(design, coeffs, wave.shape, lf)

        # per-fiber level, shift and width (level free for every fiber here)
        par = _solve_rows(spl, (lev_basis, sh_basis, wd_basis), y, wk, live)
        level, shift, width = _split(par, lev_basis, sh_basis, wd_basis, nl, ns)

        # IFU-smooth prediction of the fiber's total sky relative to the spline
        # (both are smooth fits, so a ratio of sums is as robust as a ratio of medians)
        model, total = _model_total(spl, level, shift, width, norm, good)
        if object_light is not None:  # a fraction of the first sky, which held it
            total = total * (1.0 - object_light)
        shape_coef = par[:, nl:]  # shift and width coefficients
        pred, scatter = _smooth_fit(np.nan_to_num(total)[:, None], smooth_basis, use)
        if it == final:
            break
        w, pix_ok = _model_weights(y, model, norm, safe, good, read_variance, var_floor)
        if not fixed:
            excess = (np.nan_to_num(total) - pred[:, 0]) / scatter
            line_sig = _line_significance(y, model, w, pix_ok)
            new_use = live & (excess < LEVEL_CLIP) & (line_sig < LINE_CLIP)
            log.debug("sky iteration %d: %d sky fibers (%d by level, %d by lines)", it,
                      new_use.sum(), (live & (excess >= LEVEL_CLIP)).sum(),
                      (live & (line_sig >= LINE_CLIP)).sum())
            if it >= 1 and np.array_equal(new_use, use):
                final = it + 1  # settled: one more round with the weights of this model
            use = new_use

    obj = live & ~use
    # electrons per column added to the sky of each fiber
    offset = np.zeros(nfib)
    if object_light is not None:
        # the sky fibers' own fits hold the object light they saw: take it out as a
        # continuum (electrons per column), not in the shape of the sky and its lines
        ngood = np.maximum(good.sum(axis=1), 1)
        mean_sky = np.sum(np.where(good, norm * model, 0.0), axis=1) / ngood
        offset[use] = -object_light[use] * mean_sky[use]
    # throughput of each sky fiber relative to ftf: its best scale of the common sky (with
    # its own shift and width terms), weighted by inverse variance so that the bright sky
    # lines dominate, over the IFU-smooth trend of those scales (the sky's own gradient)
    shape = spl[0]
    wp = np.where(pix_ok, w, 0.0)
    den = np.sum(wp * shape**2, axis=1)
    scale = np.divide(np.sum(wp * y * shape, axis=1), den, out=np.zeros(nfib), where=den > 0)
    trend, _ = _smooth_fit(scale[:, None], smooth_basis, use & (scale > 0))
    ratio = np.where(use & (trend[:, 0] > 0) & (scale > 0),
                     scale / np.where(trend[:, 0] > 0, trend[:, 0], 1.0), 1.0)
    relative = np.broadcast_to(ratio[:, None], (nfib, ncol)).copy()
    if obj.any():
        # the sky of a fiber with object light: the common sky scaled by the IFU-smooth
        # prediction of the fibers' total sky, with the shift and width terms of the sky
        # fibers' smooth trend along the slit
        # (the spectrograph's line spread changes smoothly along it; fitting them on the
        # object's fibers themselves left ~1.5 % residuals in sky-line cores)
        level[obj] = pred[obj, 0][:, None]
        offset[obj] = 0.0
        trend = _slit_trend(shape_coef, use, nfib)
        shift[obj] = trend[obj, :ns] @ sh_basis.T
        width[obj] = trend[obj, ns:] @ wd_basis.T
    sky_pa = level * spl[0] + shift * spl[1] + width * spl[2]
    sky = np.where(live[:, None], sky_pa * norm + offset[:, None], 0.0)
    chi2, chi2_sky = _chi2(flux, variance, sky, good, use, n_par=nl + ns + wd_basis.shape[1])
    log.info("sky (spline): %d sky fibers of %d live, chi2/dof of sky fibers %.3f",
             use.sum(), live.sum(), chi2_sky)
    return SkyModel(sky=sky, sky_fibers=use, chi2_dof=chi2, chi2_dof_sky=chi2_sky,
                    method="spline", level=level.mean(axis=1), shift=shift.mean(axis=1),
                    width=width.mean(axis=1), wave=grid,
                    spectrum=BSpline(knots, coeffs, _DEGREE)(grid), relative=relative)


def _model_weights(y, model, norm, safe, good, read_variance, var_floor):
    """Weights of ``y`` (per Angstrom of a median fiber) from the variance of a sky
    ``model`` (same units), not from the data: noisy low pixels would otherwise weigh more;
    and the pixels within :data:`PIXEL_CLIP` sigma of the model."""
    rv = np.broadcast_to(read_variance, y.shape)
    return _model_weights_kernel(y, np.ascontiguousarray(model, float), norm, safe, good,
                                 np.ascontiguousarray(rv, float), float(var_floor),
                                 float(PIXEL_CLIP))


@njit(cache=True, nogil=True)
def _model_weights_kernel(y, model, norm, safe, good, read_variance, var_floor, clip):
    nfib, ncol = y.shape
    w = np.zeros((nfib, ncol))
    ok = np.zeros((nfib, ncol), np.bool_)
    for f in range(nfib):
        for c in range(ncol):
            if not good[f, c]:
                continue
            v = max(read_variance[f, c] + max(norm[f, c] * model[f, c], 0.0), 0.1 * var_floor)
            w[f, c] = safe[f, c] ** 2 / v
            ok[f, c] = abs((y[f, c] - model[f, c]) * np.sqrt(w[f, c])) < clip
    return w, ok


@njit(cache=True, nogil=True)
def _fit_inputs(y, spl, level, shift, width, w, pix_ok, use):
    """Data and weights of one round's fits: ``y`` less every fiber's own shift and width
    terms, over its level (0 where the level is not positive); the weights ``w * level^2``
    of the sky fibers' usable pixels for the common spectrum; ``w`` of every fiber's
    usable pixels for the fibers' own terms."""
    nfib, ncol = y.shape
    corr = np.zeros((nfib, ncol))
    wfit = np.zeros((nfib, ncol))
    wk = np.zeros((nfib, ncol))
    for f in range(nfib):
        for c in range(ncol):
            lv = level[f, c]
            if lv > 0:
                corr[f, c] = (y[f, c] - shift[f, c] * spl[1, f, c]
                              - width[f, c] * spl[2, f, c]) / lv
            if pix_ok[f, c]:
                wk[f, c] = w[f, c]
                if use[f]:
                    wfit[f, c] = w[f, c] * lv * lv
    return corr, wfit, wk


@njit(cache=True, nogil=True)
def _model_total(spl, level, shift, width, norm, good):
    """The model ``level * S + shift * S' + width * S''`` and every fiber's total of it
    over its good pixels relative to the plain spline's (1 where that is not positive)."""
    nfib, ncol = level.shape
    model = np.empty((nfib, ncol))
    total = np.ones(nfib)
    for f in range(nfib):
        ref = 0.0
        tot = 0.0
        for c in range(ncol):
            m = level[f, c] * spl[0, f, c] + shift[f, c] * spl[1, f, c] + width[f, c] * spl[2, f, c]
            model[f, c] = m
            if good[f, c]:
                ref += norm[f, c] * spl[0, f, c]
                tot += norm[f, c] * m
        total[f] = tot / ref if ref > 0 else tot
    return model, total


#: Spline designs of the last (wavelength solution, live fibers, spacing): the sky and its
#: refit share one (building one takes ~0.15 s), and so do the exposures of a channel when
#: no sky shift is applied. One only: a design is ~50 MB, and exposures with their own
#: shift never use the previous exposure's.
_DESIGNS: dict = {}
_DESIGN_CACHE_SIZE = 1


def _spline_design(wave: np.ndarray, rows: np.ndarray, knot_spacing: float
                   ) -> tuple[np.ndarray, np.ndarray, SplineDesign]:
    """Knots, a wavelength grid (every ``len(rows)``-th of the sorted wavelengths) and the
    B-spline design of the wavelengths of fibers ``rows``, its rows in the order of
    ``wave[rows].ravel()``."""
    x = np.ascontiguousarray(wave[rows]).ravel()
    key = (wave.shape, rows.tobytes(), float(knot_spacing),
           hashlib.blake2b(x.tobytes(), digest_size=16).digest())
    if key not in _DESIGNS:
        disp = np.abs(np.gradient(wave[rows], axis=1))
        spacing = knot_spacing * float(np.median(disp))
        knots = clamped_knots(float(x.min()) - 1e-6, float(x.max()) + 1e-6, spacing)
        design = SplineDesign(x, knots)  # rows in the data's own order
        grid = np.sort(x)[:: len(rows)]
        for a in (knots, grid, design.x, design.knots, design.values, design.first):
            a.flags.writeable = False  # shared by every exposure of the channel
        while len(_DESIGNS) >= _DESIGN_CACHE_SIZE:
            _DESIGNS.pop(next(iter(_DESIGNS)))
        _DESIGNS[key] = entry = (knots, grid, design)
        return entry
    return _DESIGNS[key]


def _rows(a: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``a[rows].ravel()``, without a copy when ``rows`` are all rows of ``a``."""
    if rows.size == a.shape[0]:
        return np.ascontiguousarray(a).ravel()
    return a[rows].ravel()


def _evaluate(design: SplineDesign, coeffs, shape, rows) -> np.ndarray:
    """Spline value, first and second derivative (per Angstrom^n) at the wavelengths of
    ``rows`` (the design's rows in their order), as (3, nfib, ncol), zero elsewhere."""
    (v1, f1, c1), (v2, f2, c2) = design.derivative_terms(coeffs)
    return _evaluate_kernel(design.values, design.first, np.ascontiguousarray(coeffs, float),
                            v1, f1, c1, v2, f2, c2, rows.astype(np.int64), shape[0], shape[1])


@njit(cache=True, nogil=True)
def _evaluate_kernel(v0, f0, c0, v1, f1, c1, v2, f2, c2, rows, nfib, ncol):
    """The three banded products (design row ``i``: ``v[i]`` from column ``f[i]`` on)
    written to (3, nfib, ncol) at ``out[n, rows].ravel()`` (zeros elsewhere)."""
    out = np.zeros((3, nfib, ncol))
    for i in range(v0.shape[0]):
        f, c = rows[i // ncol], i % ncol
        acc = 0.0
        for p in range(v0.shape[1]):
            acc += v0[i, p] * c0[f0[i] + p]
        out[0, f, c] = acc
        acc = 0.0
        for p in range(v1.shape[1]):
            acc += v1[i, p] * c1[f1[i] + p]
        out[1, f, c] = acc
        acc = 0.0
        for p in range(v2.shape[1]):
            acc += v2[i, p] * c2[f2[i] + p]
        out[2, f, c] = acc
    return out


def _solve_rows(spl: np.ndarray, bases: tuple, y: np.ndarray, w: np.ndarray,
                rows: np.ndarray) -> np.ndarray:
    """Weighted linear least squares of every selected fiber, (nfib, npar); others 0.

    The model of fiber ``f`` at column ``c`` is ``sum_n spl[n, f, c] * bases[n][c] . a_n``:
    the level, shift and width polynomials times the spline and its derivatives.
    """
    nfib = spl.shape[1]
    design = np.ascontiguousarray(np.concatenate(bases, axis=1).T)  # (npar, ncol)
    which = np.concatenate([np.full(b.shape[1], n) for n, b in enumerate(bases)])
    npar = design.shape[0]
    out = np.zeros((nfib, npar))
    idx = np.flatnonzero(rows)
    if idx.size == 0:
        return out
    normal, rhs = _normal_rows(np.ascontiguousarray(spl), design, which.astype(np.int64),
                               np.ascontiguousarray(y), np.ascontiguousarray(w),
                               idx.astype(np.int64))
    diag = np.einsum("fii->fi", normal)
    normal += 1e-10 * np.maximum(diag.max(axis=1), 1e-300)[:, None, None] * np.eye(npar)
    out[idx] = np.linalg.solve(normal, rhs[:, :, None])[:, :, 0]
    return out


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _normal_rows(spl, design, which, y, w, idx):
    """Normal matrices and right-hand sides of the fibers ``idx`` (see ``_solve_rows``):
    each fiber's basis columns are formed once, then every entry is one dot product over
    the columns (reassociated, so that it vectorises: ~3x faster than pixel by pixel)."""
    npar, ncol = design.shape
    normal = np.zeros((idx.size, npar, npar))
    rhs = np.zeros((idx.size, npar))
    b = np.empty((npar, ncol))
    bw = np.empty((npar, ncol))
    for i in range(idx.size):
        f = idx[i]
        for p in range(npar):
            sp = spl[which[p], f]
            for c in range(ncol):
                b[p, c] = sp[c] * design[p, c]
                bw[p, c] = b[p, c] * w[f, c]
        for p in range(npar):
            acc = 0.0
            for c in range(ncol):
                acc += bw[p, c] * y[f, c]
            rhs[i, p] = acc
            for q in range(p + 1):
                acc = 0.0
                for c in range(ncol):
                    acc += bw[p, c] * b[q, c]
                normal[i, p, q] = acc
                normal[i, q, p] = acc
    return normal, rhs


def _split(par, lev_basis, sh_basis, wd_basis, nl, ns):
    """Level, shift and width of every fiber at every column from the fitted coefficients."""
    level = par[:, :nl] @ lev_basis.T
    shift = par[:, nl:nl + ns] @ sh_basis.T
    width = par[:, nl + ns:] @ wd_basis.T
    return level, shift, width


def _ifu_basis(positions: np.ndarray, nfib: int) -> np.ndarray:
    """Quadratic polynomial in IFU (x, y), (nfib, 6). (A linear term in slit position would
    add nothing: the fibers' slit order is raster order, exactly linear in x and y.)"""
    x, y = ((positions - positions.mean(axis=0)) / np.maximum(np.ptp(positions, axis=0), 1e-9)).T
    return np.column_stack([np.ones(nfib), x, y, x * x, x * y, y * y])


def _slit_trend(coef: np.ndarray, use: np.ndarray, nfib: int, degree: int = SLIT_DEGREE
                ) -> np.ndarray:
    """Robust polynomial trend along the slit (fiber index) of per-fiber coefficients,
    fitted on the ``use`` fibers and evaluated for all (zero with too few fibers)."""
    if use.sum() <= 2 * (degree + 1):
        return np.zeros_like(coef)
    basis = legendre.legvander(np.linspace(-1.0, 1.0, nfib), degree)
    keep = use.copy()
    for _ in range(3):
        c, *_ = np.linalg.lstsq(basis[keep], coef[keep], rcond=None)
        resid = np.abs(coef - basis @ c)
        mad = 1.4826 * np.median(resid[keep], axis=0) + 1e-30
        new = use & np.all(resid < 4 * mad, axis=1)
        if new.sum() <= 2 * (degree + 1) or np.array_equal(new, keep):
            break
        keep = new
    return basis @ c


def _smooth_fit(values: np.ndarray, basis: np.ndarray, use: np.ndarray, clip: float = 3.0
                ) -> tuple[np.ndarray, float]:
    """Robust fit of ``values`` (nfib, m) across the IFU; prediction and scatter of column 0.

    Returns the prediction for every fiber and the robust scatter (about the prediction) of
    the first column over the fibers used.
    """
    keep = use.copy()
    pred = np.zeros_like(values)
    scatter = 1.0
    if use.sum() < QUADRATIC_MIN_FIBERS:
        # few sky fibers (a bright or extended object): a plane only; the quadratic terms
        # would extrapolate wildly into the fibers the object covers
        basis = basis[:, :3]
    for _ in range(5):
        if keep.sum() <= basis.shape[1]:
            break
        coef, *_ = np.linalg.lstsq(basis[keep], values[keep], rcond=None)
        pred = basis @ coef
        d = values[:, 0] - pred[:, 0]
        scatter = max(1.4826 * float(np.median(np.abs(d[keep] - np.median(d[keep])))), 1e-6)
        new = use & (np.abs(d) < clip * scatter)
        if np.array_equal(new, keep):
            break
        keep = new
    return pred, scatter


def _line_significance(y: np.ndarray, model: np.ndarray, w: np.ndarray, ok: np.ndarray
                       ) -> np.ndarray:
    """Largest |y - model| summed over LINE_BOX pixels in units of its noise, per fiber
    (windows with a pixel that is not ``ok``, or reaching past the ends, are skipped)."""
    return _line_significance_kernel(np.ascontiguousarray(y, float),
                                     np.ascontiguousarray(model, float),
                                     np.ascontiguousarray(w, float),
                                     np.ascontiguousarray(ok, np.bool_), LINE_BOX)


@njit(cache=True, nogil=True)
def _line_significance_kernel(y, model, w, ok, box):
    nfib, ncol = y.shape
    out = np.zeros(nfib)
    for f in range(nfib):
        best = 0.0
        s = 0.0  # running sums over the window ending at column c
        v = 0.0
        bad = 0  # pixels of the window that are not ok
        npos = 0  # and those with a positive weight
        for c in range(ncol):
            if ok[f, c]:
                s += y[f, c] - model[f, c]
                if w[f, c] > 0:
                    v += 1.0 / w[f, c]
                    npos += 1
            else:
                bad += 1
            if c >= box:  # the pixel leaving the window
                o = c - box
                if ok[f, o]:
                    s -= y[f, o] - model[f, o]
                    if w[f, o] > 0:
                        v -= 1.0 / w[f, o]
                        npos -= 1
                else:
                    bad -= 1
            if c >= box - 1 and bad == 0 and npos > 0 and v > 0:
                best = max(best, abs(s) / np.sqrt(v))
        out[f] = best
    return out


def _chi2(flux, variance, sky, good, use, n_par) -> tuple[np.ndarray, float]:
    """Reduced chi-square per fiber and over the sky fibers of ``flux - sky``."""
    r2 = np.where(good, (flux - sky) ** 2 / np.where(good, variance, 1.0), 0.0)
    n = good.sum(axis=1)
    dof = np.maximum(n - n_par, 1)
    chi2 = np.where(n > 0, r2.sum(axis=1) / dof, np.nan)
    tot = float(r2[use].sum() / max(dof[use].sum(), 1)) if use.any() else float("nan")
    return chi2, tot


# --------------------------------------------------------------------------- template method


def _template_model(flux, variance, wave, ftf, live, good, sky_fibers) -> SkyModel:
    """Median sky-fiber spectrum on a common grid, interpolated and scaled per fiber."""
    nfib, ncol = flux.shape
    safe = np.where(good, ftf, 1.0)
    y = np.where(good, flux / safe, np.nan)
    if sky_fibers is None:
        lev = np.nanmedian(np.where(live[:, None], y, np.nan), axis=1)
        use = live.copy()
        for _ in range(5):
            med = np.median(lev[use])
            mad = 1.4826 * np.median(np.abs(lev[use] - med))
            new = live & (lev < med + 3 * mad)
            if np.array_equal(new, use):
                break
            use = new
    else:
        use = sky_fibers
    lf = np.flatnonzero(live)
    grid = np.median(wave[lf], axis=0)
    rect = np.full((nfib, ncol), np.nan)
    for k in np.flatnonzero(use):
        ok = good[k]
        rect[k] = np.interp(grid, wave[k][ok], y[k][ok], left=np.nan, right=np.nan)
    template = np.nanmedian(rect[use], axis=0)
    tok = np.isfinite(template)
    sky = np.zeros((nfib, ncol))
    level = np.zeros(nfib)
    for k in lf:
        t = np.interp(wave[k], grid[tok], template[tok])
        ok = good[k] & (t > 0)
        level[k] = np.median(y[k][ok] / t[ok]) if ok.any() else 1.0
        sky[k] = level[k] * t * ftf[k]
    chi2, chi2_sky = _chi2(flux, variance, sky, good, use, n_par=1)
    log.info("sky (template): %d sky fibers of %d live, chi2/dof of sky fibers %.3f",
             use.sum(), live.sum(), chi2_sky)
    return SkyModel(sky=sky, sky_fibers=use, chi2_dof=chi2, chi2_dof_sky=chi2_sky,
                    method="template", level=level, shift=np.zeros(nfib), width=np.zeros(nfib),
                    wave=grid, spectrum=template)
