"""Point sources on the IFU: detection, PSF fit and choice, refraction track, PSF extraction.

Works on the rectified, sky-subtracted fiber spectra of one exposure and channel (any unit
per fiber and Angstrom) and the lenslet positions.

1. **Detection**: sky-line bins and bad bins are masked, the spectra are averaged (inverse
   variance) in windows of ``2 * half_width`` Angstrom, every window's fiber map is
   smoothed with the neighbouring lenslets, and the most significant fiber and window win.
   ``central_wave`` fixes the window; ``forced`` fixes the position.
2. **PSF**: an elliptical Moffat (FWHM, axis ratio, angle) integrated over each 0.59"
   lenslet on a sub-grid, plus a constant, fitted by least squares to the collapsed map
   and then to broad wavelength bins of the whole channel. The wing index is the data's
   choice (:func:`choose_beta`): the bins of highest signal are fitted again with every
   profile of :data:`BETA_CHOICES` (Moffat beta 2-10 and a Gaussian, beta = inf) walking
   downhill in their summed chi2 from beta 3.5, and the profile of least chi2 (all have the
   same number of parameters, so least BIC too) is used for every bin and the extraction.
   The fraction of the light the model puts outside the IFU (PSFOUT) is uncertain as the
   wings are: its spread over the profiles the chi2 allows (weights exp(-dchi2 / 2)) is
   added to the flux error.
3. **Refraction**: the model track (:mod:`panacea.refraction`) and, when the bins give
   positions to better than :data:`TRACK_PRECISION`, the measured one: the bin centroids
   fitted as ``x0 + a_x r(lambda)``, ``y0 + a_y r(lambda)`` with ``r`` the model's shape.
4. **Extraction**: at each wavelength the PSF (at the track's position, with the fitted
   FWHM(lambda)) weights the fibers; ``F = sum(P d / s^2) / sum(P^2 / s^2)`` with error
   ``1 / sqrt(sum(P^2 / s^2))``, the PSF normalised over the whole plane so that F is the
   total flux of the source. The sky is extracted with the same weights.
5. **Sources the PSF does not describe** (:func:`extended_reason`: a profile wider or
   flatter than seeing makes): the wing index is :data:`EXTENDED_BETA` in every channel
   (a free one only absorbs the source's extent, differently in each channel), nothing is
   extrapolated outside the IFU (the weights are normalised over the IFU: the spectrum is
   the model's light on the IFU), and the light the model puts outside it enters the flux
   error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from numba import njit
from scipy import optimize
from scipy.ndimage import median_filter, uniform_filter1d

from . import instrument
from .refraction import Weather, refraction, refraction_track

log = logging.getLogger(__name__)

#: Moffat beta of the PSF's first fits (typical of seeing-limited images), where the choice
#: of the wing index starts.
MOFFAT_BETA = 3.5
#: Wing indices the data choose from (inf: a Gaussian). Integers and half integers keep
#: the profile sums fast (:func:`_inverse_power`).
BETA_CHOICES = (2.0, 2.5, 3.0, 3.5, 4.5, 6.0, 10.0, np.inf)
#: Bins (of highest signal to noise) on which the wing index is chosen.
N_CHOICE_BINS = 3
#: Sub-pixels per lenslet side in the PSF integral.
SUBSAMPLE = 6
#: Minimum significance (sigma) of a detection.
DETECTION_SIGMA = 8.0
#: A bin's centroid error (arcsec) below which it counts for a measured track.
TRACK_PRECISION = 0.03
#: Number of broad wavelength bins for the PSF and track measurement.
N_BINS = 10
#: Wavelength bins over which the extraction weights' variance is averaged.
WEIGHT_SMOOTH = 9
#: FWHM scales as wavelength^-0.2 (Kolmogorov) between measured bins and beyond.
FWHM_EXPONENT = -0.2
#: A source whose fitted profile is wider than this (major-axis FWHM, arcsec, at the
#: detection wavelength) is not a point: HET seeing stays below ~2.5" at 5000 A (2.7" at
#: 3640 A with FWHM ~ lambda^-0.2).
MAX_POINT_FWHM = 3.0
#: ... or flatter than this (minor / major axis): the seeing's ellipticity stays below ~0.2.
MIN_POINT_RATIO = 0.75
#: Wing index used for a source that is not a point, in every channel (the broadest
#: profile of :data:`BETA_CHOICES`): its own choice would only absorb the source's extent,
#: differently in each channel.
EXTENDED_BETA = min(BETA_CHOICES)


def psf_model_name(beta: float) -> str:
    """The PSF family of a wing index: 'gauss' for beta = inf, else 'moffat'."""
    return "gauss" if not np.isfinite(beta) else "moffat"


@dataclass
class Detection:
    """Most significant point of the IFU: position, window and significance."""

    x: float
    y: float
    wave: float
    half_width: float
    significance: float
    values: np.ndarray  # per-fiber mean in the window
    errors: np.ndarray
    forced: bool = False


@dataclass
class PSF:
    """Elliptical Moffat (or Gaussian, ``beta`` = inf) fitted to a fiber map."""

    x: float
    y: float
    fwhm: float  # major axis (arcsec)
    ratio: float  # minor / major axis
    angle: float  # radians, major axis from +x towards +y
    amplitude: float  # total flux of the source in the map's units
    background: float
    x_err: float
    y_err: float
    chi2: float
    beta: float = MOFFAT_BETA
    chi2_sum: float = 0.0  # sum of squared normalised residuals (not per degree of freedom)

    @property
    def ellipticity(self) -> float:
        return 1.0 - self.ratio

    @property
    def model(self) -> str:
        """'gauss' for beta = inf, else 'moffat'."""
        return psf_model_name(self.beta)


@dataclass
class PSFChoice:
    """How the wing index was chosen: every profile tried and its summed chi2."""

    beta: float
    tried: dict[float, float]  # beta -> chi2 summed over the choice bins
    outside: float  # fraction of the light outside the IFU at the reference wavelength
    outside_err: float  # its uncertainty over the profiles the chi2 allows
    n_bins: int

    @property
    def model(self) -> str:
        return psf_model_name(self.beta)


@dataclass
class Source:
    """A detected source, its PSF, track and extracted spectrum."""

    detection: Detection
    psf: PSF
    ref_wave: float
    model_track: tuple[np.ndarray, np.ndarray]
    measured_track: tuple[np.ndarray, np.ndarray] | None
    fwhm: np.ndarray  # FWHM (arcsec) at every grid wavelength
    x: np.ndarray  # position (arcsec) at every grid wavelength
    y: np.ndarray
    weights: np.ndarray  # (nfib, nwave) PSF fraction per fiber
    spectrum: np.ndarray
    error: np.ndarray  # statistical error with the uncertainty of the light outside the IFU
    sky: np.ndarray
    sky_error: np.ndarray
    bins: list[PSF] = field(default_factory=list)
    bin_waves: np.ndarray = field(default_factory=lambda: np.zeros(0))
    choice: PSFChoice | None = None
    #: why the PSF does not describe the source ('' for a point source); the spectrum is
    #: then the light on the IFU, not extrapolated outside it
    extended: str = ""
    #: fraction of the model's light outside the IFU at ``ref_wave``
    outside: float = 0.0

    @property
    def extrapolated(self) -> float:
        """Fraction of the light added to the spectrum for outside the IFU: ``outside``
        for a point source, 0 for an extended one."""
        return 0.0 if self.extended else self.outside

    @property
    def beta(self) -> float:
        """Wing index used (the data's choice, or :data:`EXTENDED_BETA`)."""
        return self.psf.beta

    @property
    def psf_model(self) -> str:
        return psf_model_name(self.beta)

    @property
    def track_used(self) -> str:
        return "measured" if self.measured_track is not None else "model"

    @property
    def track(self) -> tuple[np.ndarray, np.ndarray]:
        """The refraction track used: the measured one when there is one, else the model."""
        return self.measured_track if self.measured_track is not None else self.model_track


# --------------------------------------------------------------------------- PSF model


def _subgrid(n: int = SUBSAMPLE) -> tuple[np.ndarray, np.ndarray]:
    s = ((np.arange(n) + 0.5) / n - 0.5) * instrument.LENSLET_PITCH
    gx, gy = np.meshgrid(s, s)
    return gx.ravel(), gy.ravel()


def fwhm_to_alpha(beta: float) -> float:
    """Scale length over FWHM of the profile: Moffat ``(1 + r^2/alpha^2)^-beta`` or, for
    ``beta`` = inf, Gaussian ``exp(-r^2/alpha^2)``."""
    if not np.isfinite(beta):
        return 1.0 / (2 * np.sqrt(np.log(2.0)))
    return 1.0 / (2 * np.sqrt(2 ** (1 / beta) - 1))


def moffat_fractions(xy: np.ndarray, x0, y0, fwhm, ratio=1.0, angle=0.0,
                     beta: float = MOFFAT_BETA) -> np.ndarray:
    """Fraction of a point source's light falling on every lenslet.

    ``x0, y0, fwhm`` (arcsec) may be arrays of one value per wavelength: the result is then
    (nfib, nwave); for scalars (nfib,). ``beta`` = inf gives a Gaussian.
    """
    x0, y0, fwhm = np.broadcast_arrays(*(np.atleast_1d(np.asarray(v, float))
                                         for v in (x0, y0, fwhm)))
    sx, sy = _subgrid()
    alpha = fwhm * fwhm_to_alpha(beta)
    out = _moffat_sum(np.ascontiguousarray(xy, float), sx, sy, np.ascontiguousarray(x0),
                      np.ascontiguousarray(y0), np.ascontiguousarray(alpha), float(ratio),
                      float(angle), float(beta))
    out *= (instrument.LENSLET_PITCH / SUBSAMPLE) ** 2  # area of a sub-pixel
    return out[:, 0] if out.shape[1] == 1 else out


@njit(cache=True, nogil=True)
def _moffat_sum(xy, sx, sy, x0, y0, alpha, ratio, angle, beta):
    """Elliptical Moffat profile summed over every lenslet's sub-pixels, (nfib, nwave)."""
    nfib, nsub, nw = xy.shape[0], sx.size, x0.size
    c, s = np.cos(angle), np.sin(angle)
    out = np.zeros((nfib, nw))
    gauss = not np.isfinite(beta)
    for k in range(nw):
        a2 = alpha[k] * alpha[k]
        norm = 1.0 / (np.pi * a2 * ratio) if gauss else (beta - 1) / (np.pi * a2 * ratio)
        for f in range(nfib):
            acc = 0.0
            for j in range(nsub):
                dx = xy[f, 0] + sx[j] - x0[k]
                dy = xy[f, 1] + sy[j] - y0[k]
                u = dx * c + dy * s
                v = (-dx * s + dy * c) / ratio
                r2 = (u * u + v * v) / a2
                acc += np.exp(-r2) if gauss else _inverse_power(1.0 + r2, beta)
            out[f, k] = norm * acc
    return out


@njit(cache=True, nogil=True, inline="always")
def _inverse_power(t, beta):
    """``t ** -beta``; for a half-integer ``beta`` (3.5 is the default) by products and a
    square root, ~5 times faster than a power."""
    if 2 * beta == int(2 * beta) and beta > 0:
        whole = int(beta)
        p = 1.0
        for _ in range(whole):
            p *= t
        if whole != beta:
            p *= np.sqrt(t)
        return 1.0 / p
    return t ** -beta


@njit(cache=True, nogil=True)
def _moffat_gradient(xy, sx, sy, x0, y0, alpha, ratio, angle, beta):
    """One wavelength's Moffat sums (column 0, as :func:`_moffat_sum`) and their
    derivatives with respect to x0, y0, alpha, ratio and angle (columns 1-5), (nfib, 6).

    The sub-pixel loop only sums ``val`` and ``dval`` times u, v, r2, v^2 and u v
    (``dval`` = d val / d r2); the factors common to a fiber's sub-pixels are applied
    once per fiber (2.6 times faster than applying them per sub-pixel; the same values to
    ~5e-16 relative)."""
    nfib, nsub = xy.shape[0], sx.size
    c, s = np.cos(angle), np.sin(angle)
    a2 = alpha * alpha
    inv_a2 = 1.0 / a2
    inv_ratio = 1.0 / ratio
    gauss = not np.isfinite(beta)
    norm = 1.0 / (np.pi * a2 * ratio) if gauss else (beta - 1) / (np.pi * a2 * ratio)
    out = np.zeros((nfib, 6))
    for f in range(nfib):
        g0 = su = sv = sr = svv = suv = 0.0
        bx = xy[f, 0] - x0
        by = xy[f, 1] - y0
        for j in range(nsub):
            dx = bx + sx[j]
            dy = by + sy[j]
            u = dx * c + dy * s
            v = (-dx * s + dy * c) * inv_ratio
            r2 = (u * u + v * v) * inv_a2
            if gauss:
                val = np.exp(-r2)
                dval = -val  # d exp(-r2) / d r2
            else:
                t = 1.0 + r2
                val = _inverse_power(t, beta)
                dval = -beta * val / t  # d(t^-beta)/dt, and dt = d r2
            g0 += val
            su += dval * u
            sv += dval * v
            sr += dval * r2
            svv += dval * v * v
            suv += dval * u * v
        # d r2/dx0 = 2 (u du/dx0 + v dv/dx0) / a2 with du/dx0 = -c, dv/dx0 = s / ratio;
        # d r2/dalpha = -2 r2 / alpha; d r2/dratio = -2 v^2 / ratio / a2 (v is u' / ratio);
        # du/dangle = v ratio, dv/dangle = -u / ratio
        out[f, 0] = norm * g0
        out[f, 1] = norm * 2.0 * inv_a2 * (-c * su + s * inv_ratio * sv)
        out[f, 2] = norm * 2.0 * inv_a2 * (-s * su - c * inv_ratio * sv)
        out[f, 3] = norm * (-2.0 * sr / alpha - 2.0 * g0 / alpha)  # the norm goes as alpha^-2
        out[f, 4] = norm * (-2.0 * inv_ratio * inv_a2 * svv - g0 / ratio)  # and as ratio^-1
        out[f, 5] = norm * 2.0 * (ratio - inv_ratio) * inv_a2 * suv
    return out


def moffat_gradient(xy: np.ndarray, x0: float, y0: float, fwhm: float, ratio: float = 1.0,
                    angle: float = 0.0, beta: float = MOFFAT_BETA) -> np.ndarray:
    """Fraction of the light on every lenslet (column 0, as :func:`moffat_fractions`) and
    its derivatives with respect to x0, y0, fwhm, ratio and angle (columns 1-5)."""
    sx, sy = _subgrid()
    to_alpha = fwhm_to_alpha(beta)
    out = _moffat_gradient(np.ascontiguousarray(xy, float), sx, sy, float(x0), float(y0),
                           float(fwhm) * to_alpha, float(ratio), float(angle), float(beta))
    out *= (instrument.LENSLET_PITCH / SUBSAMPLE) ** 2
    out[:, 3] *= to_alpha  # d/dfwhm = d/dalpha * dalpha/dfwhm
    return out


def fit_psf(values: np.ndarray, errors: np.ndarray, xy: np.ndarray, start: tuple,
            fix_shape: tuple | None = None, shape_start: tuple = (0.95, 0.0),
            beta: float = MOFFAT_BETA) -> PSF:
    """Least-squares Moffat fit of a fiber map (fibers with error <= 0 are left out).

    ``start`` is (x, y, fwhm) and ``shape_start`` (axis ratio, angle). ``fix_shape`` =
    (fwhm, ratio, angle) fits only position, amplitude and background. ``beta`` is the
    Moffat wing index (inf: a Gaussian).

    Amplitude and background are solved linearly at every step (variable projection);
    the Jacobian of the shape parameters is analytic, projected off the linear columns
    (Kaufman's form), so that ``J^T J`` is the inverse covariance of the shape parameters
    marginalised over amplitude and background.
    """
    ok = (errors > 0) & np.isfinite(values)
    v, e, p = values[ok], errors[ok], xy[ok]
    free = slice(1, 6) if fix_shape is None else slice(1, 3)
    last: dict = {}

    def model(par):
        """Fractions, their derivatives and the linear solution at ``par`` (memoised for
        the Jacobian, which least_squares asks for at the point it just evaluated)."""
        key = tuple(par)
        if last.get("key") != key:
            if fix_shape is None:
                x, y, fwhm, ratio, angle = par
            else:
                (x, y), (fwhm, ratio, angle) = par, fix_shape
            g = moffat_gradient(p, x, y, fwhm, ratio, angle, beta)
            a = np.column_stack([g[:, 0], np.ones(len(v))]) / e[:, None]
            q, _ = np.linalg.qr(a)
            coef, *_ = np.linalg.lstsq(a, v / e, rcond=None)
            last.update(key=key, g=g, q=q, coef=coef)
        return last

    def resid(par):
        m = model(par)
        return (v - m["coef"][0] * m["g"][:, 0] - m["coef"][1]) / e

    def jac(par):
        m = model(par)
        d = -m["coef"][0] * m["g"][:, free] / e[:, None]
        return d - m["q"] @ (m["q"].T @ d)

    x0, y0, f0 = start
    if fix_shape is None:
        p0 = [x0, y0, f0, float(np.clip(shape_start[0], 0.5, 1.0)),
              float(np.clip(shape_start[1], -np.pi / 2, np.pi / 2))]
        lo = [x0 - 2.0, y0 - 2.0, 0.4, 0.5, -np.pi / 2]
        hi = [x0 + 2.0, y0 + 2.0, 5.0, 1.0, np.pi / 2]
    else:
        p0, lo, hi = [x0, y0], [x0 - 2.0, y0 - 2.0], [x0 + 2.0, y0 + 2.0]
    res = optimize.least_squares(resid, p0, jac=jac, bounds=(lo, hi), x_scale=0.1)
    coef = model(res.x)["coef"]
    chi2_sum = float(np.sum(res.fun**2))
    chi2 = chi2_sum / max(res.fun.size - len(p0) - 2, 1)
    try:
        j = jac(res.x)
        cov = np.linalg.inv(j.T @ j) * max(chi2, 1.0)
        xerr, yerr = float(np.sqrt(cov[0, 0])), float(np.sqrt(cov[1, 1]))
    except np.linalg.LinAlgError:
        xerr = yerr = float("inf")
    if fix_shape is None:
        x, y, fwhm, ratio, angle = res.x
    else:
        (x, y), (fwhm, ratio, angle) = res.x, fix_shape
    return PSF(float(x), float(y), float(fwhm), float(ratio), float(angle), float(coef[0]),
               float(coef[1]), xerr, yerr, chi2, float(beta), chi2_sum)


# --------------------------------------------------------------------------- detection


def sky_line_mask(sky: np.ndarray, threshold: float = 1.1) -> np.ndarray:
    """Grid bins dominated by sky lines: the median sky above ``threshold`` times its
    running median over ~50 bins. The median of a bin is over the fibers with sky there
    (dead fibers and a fiber's uncovered ends hold none)."""
    med = _positive_median(sky) if sky.ndim == 2 else np.nan_to_num(sky)
    run = median_filter(med, size=51, mode="nearest")
    return med > threshold * np.maximum(run, 1e-30)


def _positive_median(a: np.ndarray) -> np.ndarray:
    """Median over axis 0 of the positive values of every column (0 where there are none)."""
    v = np.sort(np.where(a > 0, a, np.inf).T, axis=1)
    n = np.sum(a > 0, axis=0)
    cols = np.arange(v.shape[0])
    lo, hi = np.maximum((n - 1) // 2, 0), np.maximum(n // 2, 0)
    return np.where(n > 0, 0.5 * (v[cols, lo] + v[cols, hi]), 0.0)


def _neighbour_matrix(xy: np.ndarray, radius: float = 0.65) -> np.ndarray:
    """Row-normalised weights of each lenslet and its nearest neighbours."""
    d = np.hypot(xy[:, None, 0] - xy[None, :, 0], xy[:, None, 1] - xy[None, :, 1])
    return (d < radius).astype(float)


def _window_means(data, err, good, lo, hi):
    """Inverse-variance mean and its error of every fiber over grid columns [lo, hi)."""
    sel = good[:, lo:hi]
    e = err[:, lo:hi]
    w = np.where(sel, 1.0 / np.where(sel, e, 1.0) ** 2, 0.0)
    wsum = w.sum(axis=1)
    mean = np.divide((w * np.where(sel, data[:, lo:hi], 0.0)).sum(axis=1), wsum,
                     out=np.zeros(len(data)), where=wsum > 0)
    merr = np.divide(1.0, np.sqrt(wsum), out=np.zeros(len(data)), where=wsum > 0)
    return mean, merr


def detect(skysub: np.ndarray, err: np.ndarray, sky: np.ndarray, grid: np.ndarray,
           xy: np.ndarray, central_wave: float | None = None, half_width: float = 10.0,
           forced: tuple[float, float] | None = None, line_mask: np.ndarray | None = None
           ) -> Detection | None:
    """The most significant source of the IFU (None when nothing reaches
    :data:`DETECTION_SIGMA`, unless ``forced``). ``line_mask`` is
    :func:`sky_line_mask` of ``sky`` when the caller has it already."""
    lines = sky_line_mask(sky) if line_mask is None else line_mask
    good = (err > 0) & ~lines[None, :]
    if central_wave is not None:
        centres = np.array([central_wave])
    else:
        centres = np.arange(grid[0] + half_width, grid[-1] - half_width + 1e-9, half_width)
    # window sums of w and w*data for every window at once, from cumulative sums
    w = np.where(good, 1.0 / np.where(good, err, 1.0) ** 2, 0.0)
    zero = np.zeros((len(w), 1))
    cw = np.concatenate([zero, np.cumsum(w, axis=1)], axis=1)
    cwd = np.concatenate([zero, np.cumsum(w * np.where(good, skysub, 0.0), axis=1)], axis=1)
    lo = np.searchsorted(grid, centres - half_width, side="left")
    hi = np.searchsorted(grid, centres + half_width, side="left")
    wsum = cw[:, hi] - cw[:, lo]  # (nfib, nwin)
    dsum = cwd[:, hi] - cwd[:, lo]
    neigh = _neighbour_matrix(xy)
    num, den = neigh @ dsum, neigh @ wsum
    sig = np.divide(num, np.sqrt(den), out=np.zeros_like(num), where=den > 0)
    sig[:, (wsum > 0).sum(axis=0) < 20] = 0.0  # windows with too few fibers
    if forced is not None:
        k = int(np.argmin(np.hypot(*(xy - np.asarray(forced)).T)))
        j = int(np.argmax(sig[k]))
    else:
        k, j = np.unravel_index(int(np.argmax(sig)), sig.shape)
    best = None
    if wsum[:, j].any():
        mean = np.divide(dsum[:, j], wsum[:, j], out=np.zeros(len(w)), where=wsum[:, j] > 0)
        merr = np.divide(1.0, np.sqrt(wsum[:, j]), out=np.zeros(len(w)),
                         where=wsum[:, j] > 0)
        best = (float(sig[k, j]), int(k), float(centres[j]), mean, merr)
    if best is None:
        return None
    sig, k, c, mean, merr = best
    if forced is None and sig < DETECTION_SIGMA:
        log.info("no source: the most significant point reaches %.1f sigma (< %.0f)", sig,
                 DETECTION_SIGMA)
        return None
    x, y = (forced if forced is not None else xy[k])
    return Detection(float(x), float(y), c, half_width, sig, mean, merr, forced is not None)


# --------------------------------------------------------------------------- the source


def _bins(grid: np.ndarray, good: np.ndarray, n: int) -> list[np.ndarray]:
    """``n`` wavelength bins of equal numbers of good grid points."""
    idx = np.flatnonzero(good)
    return [b for b in np.array_split(idx, n) if b.size > 10]


def analyse(skysub: np.ndarray, err: np.ndarray, sky: np.ndarray, sky_err: np.ndarray,
            grid: np.ndarray, xy: np.ndarray, parangle: float, weather: Weather,
            central_wave: float | None = None, half_width: float = 10.0,
            forced: tuple[float, float] | None = None, fwhm_guess: float = 1.5,
            previous: Source | None = None) -> Source | None:
    """Detect, fit and extract the source of one exposure and channel (None if none).

    ``previous`` (an analysis of the same exposure, e.g. before the sky was fitted again)
    only provides starting values for the PSF fits.
    """
    lines = sky_line_mask(sky)
    det = detect(skysub, err, sky, grid, xy, central_wave, half_width, forced, lines)
    if det is None:
        return None
    seeds = {}
    beta = MOFFAT_BETA
    if previous is not None:
        fwhm_guess = previous.psf.fwhm
        beta = previous.beta
        seeds = {round(float(w), 3): b for w, b in zip(previous.bin_waves, previous.bins)}
    psf = fit_psf(det.values, det.errors, xy, (det.x, det.y, fwhm_guess),
                  shape_start=((previous.psf.ratio, previous.psf.angle)
                               if previous is not None else (0.95, 0.0)), beta=beta)
    if forced is not None:
        psf = fit_psf(det.values, det.errors, xy, (det.x, det.y, psf.fwhm),
                      fix_shape=(psf.fwhm, psf.ratio, psf.angle), beta=beta)
        psf.x, psf.y = det.x, det.y
    log.info("source found at IFU (%.2f, %.2f) arcsec, FWHM %.2f arcsec, %.0f sigma at "
             "%.0f A", psf.x, psf.y, psf.fwhm, det.significance, det.wave)
    ref_wave = det.wave
    model = refraction_track(grid, ref_wave, parangle, weather)
    r = refraction(grid, weather)
    r = r - np.interp(ref_wave, grid, r)

    # broad bins: position, FWHM and shape as a function of wavelength
    good = (err > 0) & ~lines[None, :]
    bins, waves, maps = [], [], []
    for b in _bins(grid, good.any(axis=0), N_BINS):
        mean, merr = _window_means(skysub, err, good, b[0], b[-1] + 1)
        if (merr > 0).sum() < 20:
            continue
        wc = float(np.mean(grid[b]))
        start = (psf.x + np.interp(wc, grid, model[0]), psf.y + np.interp(wc, grid, model[1]),
                 psf.fwhm)
        seed = seeds.get(round(wc, 3))
        shape = (0.95, 0.0)
        if seed is not None:
            start, shape = (seed.x, seed.y, seed.fwhm), (seed.ratio, seed.angle)
        try:
            fit = fit_psf(mean, merr, xy, start, shape_start=shape, beta=beta)
        except (ValueError, np.linalg.LinAlgError):
            continue
        bins.append(fit)
        waves.append(wc)
        maps.append((mean, merr))
    waves = np.array(waves)
    choice = None
    if bins:
        choice, refits = choose_beta(maps, bins, xy, beta)
        if choice.beta != beta:
            bins, psf = _refit_all(maps, bins, det, psf, xy, choice.beta, forced, refits)
        beta = choice.beta
    extended = extended_reason(psf)
    if extended:
        log.info("the PSF does not describe the source (%s): wing index %g in every channel, "
                 "no light extrapolated outside the IFU", extended, EXTENDED_BETA)
        if beta != EXTENDED_BETA:
            bins, psf = _refit_all(maps, bins, det, psf, xy, EXTENDED_BETA, forced, {})
            beta = EXTENDED_BETA
    measured = None
    usable = [i for i, b in enumerate(bins) if max(b.x_err, b.y_err) < TRACK_PRECISION
              and b.amplitude > 0]
    x0, y0 = psf.x, psf.y
    if forced is None and len(usable) >= 4:
        rb = np.interp(waves[usable], grid, r)
        wx = np.array([1 / bins[i].x_err ** 2 for i in usable])
        wy = np.array([1 / bins[i].y_err ** 2 for i in usable])
        a = np.column_stack([np.ones_like(rb), rb])
        cx = np.linalg.lstsq(a * np.sqrt(wx)[:, None],
                             np.array([bins[i].x for i in usable]) * np.sqrt(wx), rcond=None)[0]
        cy = np.linalg.lstsq(a * np.sqrt(wy)[:, None],
                             np.array([bins[i].y for i in usable]) * np.sqrt(wy), rcond=None)[0]
        x0, y0 = float(cx[0]), float(cy[0])
        measured = (cx[1] * r, cy[1] * r)
        fw = np.array([bins[i].fwhm for i in usable])
        lw = np.log(waves[usable] / ref_wave)
        # FWHM(lambda): power law fitted to the bins (slope free, anchored by all bins)
        slope, icpt = np.polyfit(lw, np.log(fw), 1)
        fwhm = np.exp(icpt) * (grid / ref_wave) ** slope
        ratio = float(np.median([bins[i].ratio for i in usable]))
        angle = float(np.median([bins[i].angle for i in usable]))
    else:
        fwhm = psf.fwhm * (grid / ref_wave) ** FWHM_EXPONENT
        ratio, angle = psf.ratio, psf.angle
    track = measured if measured is not None else model  # as Source.track
    x, y = x0 + track[0], y0 + track[1]
    psf.x, psf.y = x0, y0
    weights = _weights_on_grid(xy, x, y, fwhm, ratio, angle, grid, beta=beta)
    on_ifu = weights.sum(axis=0)
    inside = max(float(np.interp(ref_wave, grid, on_ifu)), 1e-3)
    spread = choice.outside_err if choice is not None else 0.0
    if extended:
        # weights normalised over the IFU: the spectrum is the light on the IFU, and all the
        # light the model puts outside it is uncertain (the model does not fit the source)
        weights = weights / np.maximum(on_ifu, 1e-3)[None, :]
        rel = np.hypot(1.0 - inside, spread) / inside
    else:
        rel = spread / inside  # the outside light is as uncertain as the PSF's wings
    spec, spec_err = psf_extract(skysub, err, weights)
    sky_spec, sky_spec_err = psf_extract(sky, err, weights, sky_err)
    spec_err = np.hypot(spec_err, np.abs(spec) * rel)
    if choice is not None:
        choice.outside = 1.0 - inside
        log.info("PSF %s (beta %s) chosen from %d profiles on %d bins; %.1f%% +- %.1f%% of "
                 "the light outside the IFU%s", choice.model, f"{beta:g}", len(choice.tried),
                 choice.n_bins, 100 * choice.outside, 100 * choice.outside_err,
                 " (not extrapolated)" if extended else "")
    log.info("refraction track (%s): %.2f arcsec across the channel (model %.2f)",
             "measured" if measured is not None else "model",
             float(np.ptp(np.hypot(*track))), float(np.ptp(np.hypot(*model))))
    return Source(det, psf, ref_wave, model, measured, fwhm, x, y, weights, spec, spec_err,
                  sky_spec, sky_spec_err, bins, waves, choice, extended, 1.0 - inside)


def extended_reason(psf: PSF) -> str:
    """Why the fitted profile ``psf`` cannot be a seeing-limited point source ('' if it can).

    A profile wider than :data:`MAX_POINT_FWHM` (arcsec) or flatter than
    :data:`MIN_POINT_RATIO` comes from the source's own extent: the night QA warns about
    such 'seeing' (``qa.yaml``, seeing above 2.5"), and a wing index fitted to it only
    describes the source's outskirts, which the data beyond the IFU do not constrain.
    """
    if psf.fwhm > MAX_POINT_FWHM:
        return f'FWHM {psf.fwhm:.2f}" > {MAX_POINT_FWHM:g}"'
    if psf.ratio < MIN_POINT_RATIO:
        return f"axis ratio {psf.ratio:.2f} < {MIN_POINT_RATIO:g}"
    return ""


def _refit_all(maps: list[tuple], bins: list[PSF], det: Detection, psf: PSF, xy: np.ndarray,
               beta: float, forced: tuple | None, done: dict[int, PSF]
               ) -> tuple[list[PSF], PSF]:
    """Every bin map and the detection map fitted again with wing index ``beta`` (``done``:
    bin fits with it already made, by bin index)."""
    bins = [_refit(m, b, xy, beta, done.get(i)) for i, (m, b) in enumerate(zip(maps, bins))]
    psf = fit_psf(det.values, det.errors, xy, (psf.x, psf.y, psf.fwhm),
                  shape_start=(psf.ratio, psf.angle), beta=beta,
                  fix_shape=None if forced is None else (psf.fwhm, psf.ratio, psf.angle))
    if forced is not None:
        psf.x, psf.y = det.x, det.y
    return bins, psf


def _refit(m: tuple, fit: PSF, xy: np.ndarray, beta: float, done: PSF | None) -> PSF:
    """``fit`` of the bin map ``m`` = (values, errors) again with wing index ``beta`` (or the
    fit of it already ``done`` while choosing)."""
    if done is not None:
        return done
    return fit_psf(m[0], m[1], xy, (fit.x, fit.y, fit.fwhm), shape_start=(fit.ratio, fit.angle),
                   beta=beta)


def _bin_snr(maps: list[tuple]) -> list[float]:
    """Signal to noise of the summed light of every bin map (values, errors)."""
    out = []
    for values, errors in maps:
        ok = errors > 0
        out.append(float(values[ok].sum() / np.sqrt(np.sum(errors[ok] ** 2)))
                   if ok.any() else 0.0)
    return out


def choose_beta(maps: list[tuple], fits: list[PSF], xy: np.ndarray,
                start: float = MOFFAT_BETA) -> tuple[PSFChoice, dict[int, PSF]]:
    """The wing index of least chi2 on the bins of highest signal to noise.

    Parameters
    ----------
    maps : list of (values, errors)
        Fiber maps of the wavelength bins.
    fits : list of PSF
        Their fits with wing index ``start``.
    xy : ndarray
        Lenslet positions (arcsec).
    start : float
        Wing index of ``fits``; the walk through :data:`BETA_CHOICES` (plus ``start``)
        starts there and goes downhill in the chi2 summed over :data:`N_CHOICE_BINS` bins;
        the vertex of a parabola in 1/beta through the minimum and its neighbours is tried
        last.

    Returns
    -------
    PSFChoice, dict
        The choice, and the fits of the chosen wing index by bin index (for the bins it
        was chosen on).
    """
    top = [int(i) for i in np.argsort(_bin_snr(maps))[::-1][:N_CHOICE_BINS]]
    grid = sorted(set(BETA_CHOICES) | {start}, key=lambda b: 1.0 / b)[::-1]  # ascending
    tried: dict[float, tuple[float, dict[int, PSF]]] = {start: (
        float(sum(fits[k].chi2_sum for k in top)), {k: fits[k] for k in top})}

    def evaluate(b: float) -> float:
        if b not in tried:
            got = {}
            for k in top:
                f, (v, e) = fits[k], maps[k]
                try:
                    got[k] = fit_psf(v, e, xy, (f.x, f.y, f.fwhm),
                                     shape_start=(f.ratio, f.angle), beta=b)
                except (ValueError, np.linalg.LinAlgError):
                    got[k] = PSF(f.x, f.y, f.fwhm, f.ratio, f.angle, 0.0, 0.0, np.inf,
                                 np.inf, np.inf, b, np.inf)
            tried[b] = (float(sum(g.chi2_sum for g in got.values())), got)
        return tried[b][0]

    i0 = grid.index(start)
    best = i0
    for step in (-1, 1):  # walk downhill; the chi2 of a wing index is unimodal
        i = best + step
        while 0 <= i < len(grid) and evaluate(grid[i]) < evaluate(grid[best]):
            best, i = i, i + step
        if best != i0:
            break
    # the neighbours of the minimum are always known: they bound the outside light
    for i in (best - 1, best + 1):
        if 0 <= i < len(grid):
            evaluate(grid[i])
    beta = grid[best]
    if 0 < best < len(grid) - 1:
        # between the grid's profiles: a wing index between two of them changes the light
        # outside the IFU by a few per cent of the flux for a source near the edge
        u = np.array([1.0 / grid[i] for i in (best - 1, best, best + 1)])
        c = np.array([tried[grid[i]][0] for i in (best - 1, best, best + 1)])
        a = np.polyfit(u - u[1], c, 2)
        if a[0] > 0:
            v = float(np.clip(u[1] - a[1] / (2 * a[0]), u[2], u[0]))
            if abs(v - u[1]) > 0.1 * min(u[0] - u[1], u[1] - u[2]):
                new = float(np.inf) if v <= 0 else round(1.0 / v, 3)
                if evaluate(new) < tried[beta][0]:
                    beta = new
    chi_best, fits_best = tried[beta]
    scale = max(float(np.median([g.chi2 for g in fits_best.values()])), 1.0)
    ref = top[0]
    outside = {}
    for b, (_, got) in tried.items():
        g = got[ref]
        outside[b] = 1.0 - float(moffat_fractions(xy, g.x, g.y, g.fwhm, g.ratio, g.angle,
                                                  b).sum())
    w = {b: np.exp(-(tried[b][0] - chi_best) / (2 * scale)) for b in tried}
    var = sum(w[b] * (outside[b] - outside[beta]) ** 2 for b in tried) / sum(w.values())
    choice = PSFChoice(beta, {b: tried[b][0] for b in sorted(tried)}, outside[beta],
                       float(np.sqrt(var)), len(top))
    return choice, fits_best


def _weights_on_grid(xy, x, y, fwhm, ratio, angle, grid, nknots: int = 48,
                     beta: float = MOFFAT_BETA) -> np.ndarray:
    """PSF fraction per fiber at every grid wavelength (computed at knots, interpolated)."""
    k = np.linspace(0, grid.size - 1, nknots).round().astype(int)
    frac = moffat_fractions(xy, x[k], y[k], fwhm[k], ratio, angle, beta)
    out = np.empty((xy.shape[0], grid.size))
    for f in range(xy.shape[0]):
        out[f] = np.interp(grid, grid[k], frac[f])
    return out


def psf_extract(data: np.ndarray, err: np.ndarray, weights: np.ndarray,
                data_err: np.ndarray | None = None, smooth: int = WEIGHT_SMOOTH
                ) -> tuple[np.ndarray, np.ndarray]:
    """PSF-weighted optimal extraction at every wavelength (fibers with err <= 0 skipped).

    ``F = sum(P d / v) / sum(P^2 / v)`` with ``v`` the variance ``err**2`` averaged over
    ``smooth`` neighbouring wavelengths: a pixel's own variance estimate follows its own
    noise (a low pixel gets a low Poisson variance), and weighting by it would bias faint
    spectra low by about a per cent; the smoothed variance keeps the sky-line structure
    without that correlation. The error is propagated with the weights actually used, from
    ``data_err`` when given (e.g. the sky model's error), else from ``err``."""
    err = np.ascontiguousarray(err, float)
    good = err > 0
    var = np.where(good, err, 0.0) ** 2
    if smooth > 1:
        vs = uniform_filter1d(var, smooth, axis=1, mode="nearest")
        ns = uniform_filter1d(good.astype(float), smooth, axis=1, mode="nearest")
        var = np.divide(vs, ns, out=np.zeros_like(vs), where=ns > 0)
    e = err if data_err is None else np.ascontiguousarray(data_err, float)
    flux, error = _psf_sums(np.ascontiguousarray(data, float), err, e, var,
                            np.ascontiguousarray(weights, float))
    return flux, error


@njit(cache=True, nogil=True)
def _psf_sums(data, err, data_err, var, weights):
    """The sums of :func:`psf_extract` over the fibers, column by column."""
    nfib, ncol = data.shape
    den = np.zeros(ncol)
    num = np.zeros(ncol)
    fvar = np.zeros(ncol)
    for f in range(nfib):
        for c in range(ncol):
            if not (err[f, c] > 0 and var[f, c] > 0):
                continue
            wi = weights[f, c] / var[f, c]
            den[c] += weights[f, c] * wi
            num[c] += wi * data[f, c]
            fvar[c] += wi * wi * data_err[f, c] * data_err[f, c]
    flux = np.zeros(ncol)
    error = np.zeros(ncol)
    for c in range(ncol):
        if den[c] > 0:
            flux[c] = num[c] / den[c]
            error[c] = np.sqrt(fvar[c]) / den[c]
    return flux, error
