"""Arc-line identification and the 2-D wavelength solution of a channel.

The solution maps (fiber, column) of the stitched, oriented channel frame to air wavelength
(Angstrom). It is built from per-fiber extracted arc spectra, one set per lamp:

1. **Fiber alignment.** Each fiber's arc spectra (compressed with ``asinh`` so that weak
   lamps count as much as bright ones, summed over lamps) are cross-correlated with the
   fiber-median spectra; the median is rebuilt from the aligned fibers and the shifts
   measured again. Fibers may differ by up to :data:`MAX_FIBER_SHIFT` px.
2. **Global identification.** A cubic through the facts sheet's approximate line columns
   (``source=sheet`` rows of ``arc_lines.csv``) predicts the column of every listed line.
   A comb of these columns is cross-correlated with the aligned median spectra over a grid
   of shifts (+-:data:`MAX_SHIFT` px) and stretches (+-:data:`MAX_STRETCH`); the lines then
   found in the median spectra refine the mapping with a robust quadratic.
3. **Centroids.** Every listed line is fitted in every live fiber with a pixel-integrated
   Gaussian plus a constant, all lines and fibers at once (vectorised Gauss-Newton).
   Neighbouring lines of the same lamp are deblended by subtracting each other's fitted
   models over several passes. A first pass starts at the aligned global positions; a
   smooth 2-D model of its offsets plus a per-fiber constant gives the start of the final
   pass. Fits near saturated pixels (in the fiber or its neighbours), with a low
   signal-to-noise ratio or a reduced chi-square far above the line's typical one are not
   used; a line saturated in most fibers is dropped.
4. **Line screening.** Lines closer than 1.5 FWHM to a listed line of the same lamp, lines
   whose centroid moves between a full and a core window (a blend with an unlisted line) or
   that are wider than the other lines are flagged ``blend``; lines found in fewer than half
   of the usable fibers are ``not detected``.
5. **2-D model.** Column as a function of wavelength and fiber,
   ``c_k(lambda) = z_k + sum_{i=1..n} sum_{j=0..m} a_ij P_i(x) P_j(y)`` with Legendre
   polynomials ``P`` of the normalised wavelength ``x`` and fiber index ``y``, and a free
   zero-point ``z_k`` per fiber. Weighted least squares (centroid errors with a floor of
   :data:`CENTROID_FLOOR` px) with iterative clipping of single measurements and
   leave-one-out rejection of whole lines whose fiber-averaged position disagrees with the
   others. The degrees are chosen by the data: ``n`` (up to a cap that large gaps without
   lines lower, see :func:`_degree`) and ``m`` by leave-one-line-out cross-validation of
   the lines' fiber-averaged positions (:func:`_choose_model`): the simplest model whose
   held-out error is within one standard error of the best one.
6. **Line residuals.** The model's residuals at each used line, smoothed across fibers, are
   interpolated between the lines (monotone cubic) and added to the model when predicting
   every line from the others does better than the polynomial alone
   (:func:`_line_residuals`): this follows the part of a non-polynomial distortion (ripples
   of a few hundred px) that the lines sample. A model whose median fiber RMS exceeds
   :data:`MAX_FIT_RMS` is refused.
7. **Evaluation.** The model is inverted by Newton's method at every column of every fiber;
   fibers without lines (dead) take interpolated zero-points.

No file I/O happens here: the arrays come from :mod:`panacea.extract` (see
:func:`arc_spectra_from_frames`) and the solution goes to the calibration bundle.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
from numpy.polynomial import legendre as leg
from scipy.fft import irfft, next_fast_len, rfft
from scipy.interpolate import PchipInterpolator
from scipy.ndimage import gaussian_filter1d, median_filter
from scipy.special import erf

from panacea import instrument
from panacea.ccd import Frame, Mask
from panacea.errors import PanaceaError
from panacea.extract import aperture, boxcar

log = logging.getLogger(__name__)

#: Gaussian sigma (px) of the nominal line spread.
LSF_SIGMA = instrument.LSF_FWHM_PIX / (2.0 * np.sqrt(2.0 * np.log(2.0)))

# identification
#: Search range (px) of the global shift and (fraction) of the global stretch.
MAX_SHIFT = 80.0
MAX_STRETCH = 0.02
#: Largest shift (px) of one fiber's arc spectra relative to the fiber median.
MAX_FIBER_SHIFT = 20

# centroids
#: Floor (px) of the centroid errors in the smooth model of the first-pass offsets.
SMOOTH_FLOOR = 0.05
#: Half-widths (px) of the line-fit window and of the core window of the blend test.
FIT_HALF_WIDTH = 7
CORE_HALF_WIDTH = 4
#: Extra columns (px) on each side of the fit window that must be free of saturation.
SATURATION_MARGIN = 5
#: Lines saturated in more than this fraction of the live fibers are dropped everywhere;
#: otherwise only the saturated fibers and their neighbours are left out.
SATURATED_FRACTION = 0.5
#: Minimum signal-to-noise ratio of the flux of a line fit in one fiber.
MIN_SNR = 8.0
#: Fits whose reduced chi-square exceeds this many times the line's median are not used.
MAX_CHI2_RATIO = 5.0

# line screening
#: Blend tests: largest fiber-median shift (px) between the full-window and core-window
#: centroids, and largest excess width over the trend of the other lines (fraction).
BLEND_SHIFT = 0.02
BLEND_WIDTH = 0.05

# 2-D model
#: Systematic floor (px) added in quadrature to the centroid errors.
CENTROID_FLOOR = 0.01
#: Largest leave-one-out residual (px) of a line's fiber-averaged position.
LINE_TOLERANCE = 0.025
#: Lines with a larger leverage in the 1-D fit of the line means are not judged.
MAX_LEVERAGE = 0.8
#: The Legendre degree in wavelength is at most this number divided by the largest gap
#: between lines (fraction of the detector, see :func:`_largest_gap`).
GAP_DEGREE = 2.4
#: Weight of the extrapolated stretches beyond the first and last lines in that gap.
EDGE_WEIGHT = 2.0
#: Smallest fraction of the detector the used lines must span, and the largest gap accepted
#: without a warning.
MIN_SPAN = 0.5
WARN_GAP = 0.4
#: Largest median fiber RMS (px) of the used lines accepted (the randomized nights' ripples
#: leave 0.05-0.16 px; a model that misses lines by more is refused).
MAX_FIT_RMS = 0.3

#: Largest wavelength degree the cross-validation may choose. (The degree across fibers is
#: not cross-validated: the held-out score averages a line over the fibers and cannot see it.)
CV_MAX_DEG_X = 9
#: Relative excess of the held-out RMS over the best model's that a simpler model may have.
CV_TOLERANCE = 0.05
#: Fibers used by the cross-validation: every this many.
CV_FIBER_STEP = 4

#: Line-residual interpolation (:func:`_line_residuals`): fewest used lines, and the
#: fraction by which its held-out RMS must beat the polynomial's residuals to be applied.
INTERP_MIN_LINES = 6
INTERP_GAIN = 0.0

#: Numeric codes of the lamps in :meth:`WavelengthSolution.line_table`.
LAMP_CODES = {"hg": 0, "cd": 1, "fear": 2}


class WavelengthError(PanaceaError, ValueError):
    """The wavelength solution cannot be computed (no arcs, too few lines, poor coverage)."""


# --------------------------------------------------------------------------- data model


@dataclass
class ArcLineFits:
    """Arc lines of a channel and their fitted positions in every fiber.

    Attributes
    ----------
    wavelength : ndarray (nline,)
        Air wavelength (Angstrom).
    lamp, element, source : ndarray of str (nline,)
        Lamp (``hg``, ``cd``, ``fear``), element and table source (``sheet``/``lab``).
    strength : ndarray (nline,)
        Relative strength from the line table.
    expected : ndarray (nline,)
        Column of the line in the fiber-median spectrum from the global identification (px).
    column : ndarray (nfiber, nline)
        Fitted centroid (px, pixel centres at integers); NaN where not measured.
    column_err : ndarray (nfiber, nline)
        Centroid uncertainty (px).
    sigma : ndarray (nfiber, nline)
        Fitted Gaussian sigma of the line spread (px).
    flux : ndarray (nfiber, nline)
        Fitted line flux (e-).
    used : ndarray of bool (nfiber, nline)
        Measurement used in the final 2-D fit.
    status : ndarray of str (nline,)
        ``used``, or why the line was left out (``saturated``, ``blend``, ``outside``,
        ``not detected``, ``rejected``, ``lamp missing``).
    """

    wavelength: np.ndarray
    lamp: np.ndarray
    element: np.ndarray
    source: np.ndarray
    strength: np.ndarray
    expected: np.ndarray
    column: np.ndarray
    column_err: np.ndarray
    sigma: np.ndarray
    flux: np.ndarray
    used: np.ndarray
    status: np.ndarray

    def __len__(self) -> int:
        return self.wavelength.size


@dataclass
class WavelengthSolution:
    """Wavelength of every fiber at every column, with the model and its diagnostics.

    The model gives the column of wavelength ``lambda`` in fiber ``k`` as
    ``fiber_offset[k] + sum_{i=1..deg_x} sum_{j=0..deg_y} coeffs[i-1, j] P_i(x) P_j(y)`` with
    ``x = (2 lambda - wave_lo - wave_hi) / (wave_hi - wave_lo)`` (``wave_range``) and
    ``y = (2 k - nfiber + 1) / (nfiber - 1)``, plus, when the held-out lines chose it, the
    polynomial's residuals at the lines interpolated between them (:attr:`line_x`,
    :attr:`line_resid`); :attr:`wave` is its inverse at pixel centres.

    Attributes
    ----------
    channel : str
        Channel name.
    wave : ndarray (nfiber, ncol)
        Air wavelength (Angstrom) at every pixel centre.
    rms_pix, rms_angstrom : ndarray (nfiber,)
        RMS of the used line residuals of each fiber (px and Angstrom); NaN for fibers
        without lines.
    lines : ArcLineFits
        Lines, fitted columns per fiber and flags.
    coeffs : ndarray (deg_x, deg_y + 1)
        Legendre coefficients (px) of the smooth part.
    fiber_offset : ndarray (nfiber,)
        Zero-point of each fiber (px); interpolated for fibers without lines.
    wave_range : tuple of float
        Wavelengths (Angstrom) mapped to x = -1 and +1.
    unmeasured : ndarray of bool (nfiber,)
        Fibers without used lines (dead fibers): their zero-point is interpolated from the
        neighbouring fibers.
    """

    channel: str
    wave: np.ndarray
    rms_pix: np.ndarray
    rms_angstrom: np.ndarray
    lines: ArcLineFits
    coeffs: np.ndarray
    fiber_offset: np.ndarray
    wave_range: tuple[float, float]
    unmeasured: np.ndarray
    #: how the model was chosen: degrees, the cross-validated RMS (px) of each tried
    #: (deg_x, deg_y) and the lines held out
    choice: dict | None = None
    #: normalised wavelengths x of the used lines (sorted) and the residual of the polynomial
    #: model at them in every fiber (px, (nfiber, nline)), interpolated between the lines and
    #: added to the model (:func:`_line_residuals`); None when the data did not choose it
    line_x: np.ndarray | None = None
    line_resid: np.ndarray | None = None

    @property
    def dispersion(self) -> np.ndarray:
        """Angstrom per pixel of every fiber at every column, (nfiber, ncol)."""
        return np.gradient(self.wave, axis=1)

    @property
    def rms(self) -> np.ndarray:
        """Alias of :attr:`rms_pix`: RMS line residual of each fiber (px)."""
        return self.rms_pix

    @property
    def accuracy(self) -> float:
        """The solution's accuracy (px; the bundle's WAVERMS): the median fiber RMS of the
        line fits or, where the lines' residuals are interpolated between the lines (the
        solution then passes through them), the held-out RMS of that interpolation, which
        the sky-line refinement uses as its error floor."""
        choice = self.choice or {}
        if choice.get("interp"):
            held_out = (choice.get("interp_cv") or (np.nan, np.nan))[1]
            if np.isfinite(held_out):
                return float(held_out)
        return float(np.nanmedian(self.rms))

    def line_table(self) -> np.ndarray:
        """Summary of the lines for the calibration bundle, shape (nline, 4).

        Columns: air wavelength (Angstrom); lamp code (:data:`LAMP_CODES`, -1 if unknown);
        number of fibers in which the line was used; RMS residual of the line over those
        fibers (px, NaN when unused).
        """
        lines = self.lines
        model = self.column(lines.wavelength)
        resid = np.where(lines.used, lines.column - model, np.nan)
        nused = lines.used.sum(axis=0)
        with np.errstate(invalid="ignore"):
            rms = np.sqrt(np.nansum(resid**2, axis=0) / nused)
        codes = [LAMP_CODES.get(lp, -1) for lp in lines.lamp]
        return np.column_stack([lines.wavelength, codes, nused, rms]).astype(np.float64)

    def column(self, wavelength: np.ndarray | float, fibers: np.ndarray | None = None
               ) -> np.ndarray:
        """Model column (px) of ``wavelength`` (Angstrom) in each fiber.

        Parameters
        ----------
        wavelength : float or ndarray (n,)
            Air wavelengths (Angstrom).
        fibers : ndarray of int, optional
            Fiber indices (default all).

        Returns
        -------
        ndarray (nfiber, n)
        """
        nfib = self.wave.shape[0]
        k = np.arange(nfib) if fibers is None else np.asarray(fibers)
        lam = np.atleast_1d(np.asarray(wavelength, float))
        b = _fiber_coeffs(self.coeffs, self.fiber_offset[k], _norm_fiber(k, nfib))
        x = _norm(lam[None, :], self.wave_range)
        col = leg.legval(x, b[..., None], tensor=False)
        if self.line_x is not None and self.line_resid is not None:
            col = col + _interp_residuals(self.line_x, self.line_resid[k],
                                          np.broadcast_to(x, col.shape))
        return col


# --------------------------------------------------------------------------- helpers


def _norm(value: np.ndarray, lo_hi: tuple[float, float]) -> np.ndarray:
    """Map ``[lo, hi]`` to ``[-1, 1]``."""
    lo, hi = lo_hi
    return (2.0 * np.asarray(value, float) - lo - hi) / (hi - lo)


def _norm_fiber(k: np.ndarray, nfib: int) -> np.ndarray:
    """Fiber index mapped to [-1, 1]."""
    return (2.0 * np.asarray(k, float) - (nfib - 1)) / max(nfib - 1, 1)


def _fiber_coeffs(coeffs: np.ndarray, offset: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-fiber Legendre coefficients in x, shape (deg_x + 1, nfib)."""
    smooth = coeffs @ leg.legvander(y, coeffs.shape[1] - 1).T  # (deg_x, nfib)
    return np.vstack([offset[None, :], smooth])


def _pixel_gauss(edges: np.ndarray, mu: np.ndarray, sigma: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel-integrated unit Gaussian and its derivatives with respect to mu and sigma.

    Parameters
    ----------
    edges : ndarray (..., npix + 1)
        Pixel edges (px).
    mu, sigma : ndarray (..., 1)
        Centre and width (px).

    Returns
    -------
    g, dg_dmu, dg_dsigma : ndarray (..., npix)
    """
    z = (edges - mu) / sigma
    cdf = 0.5 * erf(z / np.sqrt(2.0))
    pdf = np.exp(-0.5 * z**2) / np.sqrt(2.0 * np.pi)
    return np.diff(cdf, axis=-1), -np.diff(pdf, axis=-1) / sigma, -np.diff(z * pdf, axis=-1) / sigma


def _nanmedian(x: np.ndarray, axis: int | None = None, keepdims: bool = False) -> np.ndarray:
    """``numpy.nanmedian`` that returns NaN for all-NaN slices without a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(x, axis=axis, keepdims=keepdims)


def _robust_std(x: np.ndarray, axis: int | None = None) -> np.ndarray:
    """Normalised median absolute deviation, ignoring NaN."""
    return 1.4826 * _nanmedian(np.abs(x - _nanmedian(x, axis=axis, keepdims=True)), axis=axis)


# --------------------------------------------------------------------------- inputs


def arc_spectra_from_frames(
    frames_by_lamp: Mapping[str, Frame | Sequence[Frame]],
    trace: np.ndarray,
    half_width: float = 3.0,
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Boxcar-extract arc frames into the per-lamp input of :func:`solve_wavelength`.

    Parameters
    ----------
    frames_by_lamp : mapping of str to Frame or sequence of Frame
        Bias-subtracted arc frames (e-) of each lamp; several frames of a lamp are summed.
    trace : ndarray (nfiber, ncol)
        Row of each fiber's centre at every column.
    half_width : float
        Half-width of the extraction aperture (rows).

    Returns
    -------
    dict of str to (flux, variance, saturated)
        Per lamp: electrons per column (nfiber, ncol), their variance (e-^2) and a boolean
        mask of the (fiber, column) samples that include a saturated pixel.
    """
    out = {}
    ap = None
    for lamp, frames in frames_by_lamp.items():
        frames = [frames] if isinstance(frames, Frame) else list(frames)
        if not frames:
            continue
        flux = var = sat = None
        for fr in frames:
            if ap is None or ap.shape != fr.image.shape:  # the weights once per frame shape
                ap = aperture(trace, half_width, fr.image.shape)
            f, v = boxcar(fr.image, ap, variance=fr.variance)
            s, _ = boxcar(((fr.mask & Mask.SATURATED) != 0).astype(np.float32), ap)
            flux = f if flux is None else flux + f
            var = v if var is None else var + v
            sat = s > 0 if sat is None else sat | (s > 0)
        out[lamp] = (flux, var, sat)
    return out


# --------------------------------------------------------------------------- line fitting


@dataclass
class _Fits:
    """Results of :func:`_fit_lines`, arrays of shape (nfib, nline)."""

    mu: np.ndarray
    mu_err: np.ndarray
    sigma: np.ndarray
    amp: np.ndarray
    amp_err: np.ndarray
    chi2: np.ndarray
    ok: np.ndarray
    saturated: np.ndarray
    near_saturated: np.ndarray


def _fit_lines(spectra: np.ndarray, variance: np.ndarray, saturated: np.ndarray,
               lamp: np.ndarray, start: np.ndarray, fit: np.ndarray,
               passes: int = 6, iterations: int = 6, max_move: float = 3.0,
               half: int = FIT_HALF_WIDTH) -> _Fits:
    """Fit pixel-integrated Gaussians plus a constant to many lines in many fibers at once.

    Parameters
    ----------
    spectra, variance : ndarray (nlamp, nfib, ncol)
        Extracted arc spectra (e-) and their variance (e-^2), one plane per lamp.
    saturated : ndarray of bool (nlamp, nfib, ncol)
        Samples that include saturated pixels; a fit is skipped when they occur within
        :data:`SATURATION_MARGIN` px of its window, in its fiber or a neighbouring one.
    lamp : ndarray of int (nline,)
        Plane of ``spectra`` holding each line.
    start : ndarray (nfib, nline)
        Starting centroid (px); the fit window is centred on it.
    fit : ndarray of bool (nfib, nline)
        Which (fiber, line) pairs to fit; the others neither are fitted nor deblended.
    passes : int
        Deblending passes: in each pass the current models of all other lines of the same
        lamp (at first from the starting values) are subtracted from each line's window
        before it is refitted.
    iterations : int
        Gauss-Newton iterations of the first pass (later passes, which start from converged
        values, take two each).
    max_move : float
        Largest accepted distance (px) of the centroid from ``start``.
    half : int
        Half-width (px) of the fit window.

    Returns
    -------
    _Fits
    """
    nlamp, nfib, ncol = spectra.shape
    nline = lamp.size
    offs = np.arange(-half, half + 1)
    c0 = np.rint(np.nan_to_num(start, nan=-10 * ncol)).astype(int)
    inside = (c0 - half >= 0) & (c0 + half < ncol)
    kk, li = np.nonzero(fit & inside)
    cols = np.clip(c0[kk, li][:, None] + offs, 0, ncol - 1)  # (n, w)
    plane = lamp[li][:, None]
    wide = np.arange(-half - SATURATION_MARGIN, half + SATURATION_MARGIN + 1)
    wide = np.clip(c0[kk, li][:, None] + wide, 0, ncol - 1)
    sat_all = np.zeros((nfib, nline), bool)
    sat_all[kk, li] = saturated[plane, kk[:, None], wide].any(axis=-1)
    near_sat = sat_all.copy()  # saturated fibers may bleed into their neighbours
    near_sat[1:] |= sat_all[:-1]
    near_sat[:-1] |= sat_all[1:]
    keep = ~near_sat[kk, li]
    kk, li, cols, plane = kk[keep], li[keep], cols[keep], plane[keep]
    data = spectra[plane, kk[:, None], cols]
    var = variance[plane, kk[:, None], cols]
    w = np.where(np.isfinite(data) & np.isfinite(var), 1.0 / np.maximum(var, 1.0), 0.0)
    data = np.nan_to_num(data)
    edges = np.concatenate([cols, cols[:, -1:] + 1], axis=1) - 0.5
    flat = (plane * nfib + kk[:, None]) * ncol + cols  # index into (nlamp, nfib, ncol)

    mu = start[kk, li].astype(float)
    sig = np.full(mu.size, LSF_SIGMA)
    bkg = np.minimum(data[:, :2].mean(-1), data[:, -2:].mean(-1))
    # starting flux from the peak, little affected by a neighbour in the window
    amp = np.maximum(data[:, half] - bkg, 1.0) * np.sqrt(2 * np.pi) * LSF_SIGMA
    damp = np.eye(4)[None] * 1e-3
    for p in range(passes):
        # deblend: subtract the current models of all other lines of the same lamp
        gauss = _pixel_gauss(edges, mu[:, None], sig[:, None])  # also the first step's
        own = amp[:, None] * gauss[0]
        total = np.bincount(flat.ravel(), weights=own.ravel(), minlength=nlamp * nfib * ncol)
        y = data - (total[flat] - own)
        for it in range(iterations if p == 0 else 2):
            g, dmu, dsig = gauss if it == 0 else _pixel_gauss(edges, mu[:, None], sig[:, None])
            r = y - (amp[:, None] * g + bkg[:, None])
            jac = np.stack([g, amp[:, None] * dmu, amp[:, None] * dsig, np.ones_like(g)], axis=1)
            jw = jac * w[:, None, :]
            ata = jw @ jac.transpose(0, 2, 1)
            atb = (jw @ r[:, :, None])[..., 0]
            diag = np.einsum("nii->ni", ata)
            ata = ata + damp * (diag + 1e-12 * diag.max(-1, keepdims=True) + 1e-30)[:, None, :]
            step = np.linalg.solve(ata, atb[..., None])[..., 0]
            amp = amp + step[:, 0]
            mu = mu + np.clip(step[:, 1], -1.0, 1.0)
            sig = np.clip(sig + np.clip(step[:, 2], -0.3 * sig, 0.3 * sig),
                          0.3 * LSF_SIGMA, 3.0 * LSF_SIGMA)
            bkg = bkg + step[:, 3]
    g, dmu, dsig = _pixel_gauss(edges, mu[:, None], sig[:, None])
    r = y - (amp[:, None] * g + bkg[:, None])
    jac = np.stack([g, amp[:, None] * dmu, amp[:, None] * dsig, np.ones_like(g)], axis=1)
    ata = (jac * w[:, None, :]) @ jac.transpose(0, 2, 1)
    chi2 = (w * r**2).sum(-1) / np.maximum((w > 0).sum(-1) - 4, 1)
    good = np.isfinite(mu) & np.all(np.isfinite(ata), axis=(1, 2))
    good &= np.abs(np.linalg.det(np.where(good[:, None, None], ata, np.eye(4)))) > 0
    cov = np.full(ata.shape, np.nan)
    cov[good] = np.linalg.inv(ata[good])
    scale = np.sqrt(np.maximum(chi2, 1.0))
    mu_err = np.sqrt(np.abs(cov[:, 1, 1])) * scale
    amp_err = np.sqrt(np.abs(cov[:, 0, 0])) * scale
    good &= (np.abs(mu - start[kk, li]) < max_move) & (amp > MIN_SNR * amp_err)
    good &= (sig > 0.5 * LSF_SIGMA) & (sig < 2.0 * LSF_SIGMA)
    good &= (mu > half) & (mu < ncol - 1 - half)

    values = {"mu": mu, "mu_err": mu_err, "sigma": sig, "amp": amp, "amp_err": amp_err,
              "chi2": chi2}
    out = {name: np.full((nfib, nline), np.nan) for name in values}
    for name, value in values.items():
        out[name][kk[good], li[good]] = value[good]
    # a fit much worse than the line's typical fit (cosmic ray, bad column) is not used
    typical = _nanmedian(out["chi2"], axis=0)
    ok = np.isfinite(out["mu"]) & (out["chi2"] < MAX_CHI2_RATIO * np.maximum(typical, 1.0))
    for name in values:
        out[name][~ok] = np.nan
    return _Fits(ok=ok, saturated=sat_all, near_saturated=near_sat, **out)


# --------------------------------------------------------------------------- identification


def _sheet_model(lines: Sequence[instrument.ArcLine], ncol: int, channel: instrument.Channel
                 ) -> np.polynomial.Polynomial:
    """Expected column as a function of wavelength from the facts sheet's line columns."""
    sheet = [a for a in lines if a.source == "sheet"]
    if len(sheet) >= 4:
        w = np.array([a.wavelength for a in sheet])
        c = np.array([a.column for a in sheet])
        return np.polynomial.Polynomial.fit(w, c, 3 if len(sheet) >= 6 else 2)
    # no usable sheet: a linear mapping of the channel's range onto the detector
    return np.polynomial.Polynomial.fit([channel.wave_lo, channel.wave_hi], [0, ncol - 1], 1)


def _line_residual(spectrum: np.ndarray) -> tuple[np.ndarray, float]:
    """A 1-D spectrum minus its running median (61 px), and the noise of the result (e-)."""
    resid = spectrum - median_filter(spectrum, size=61, mode="nearest")
    noise = 1.4826 * np.median(np.abs(np.diff(resid))) / np.sqrt(2.0)
    return resid, max(float(noise), 1e-6)


def _compress(flux: np.ndarray) -> np.ndarray:
    """Arc spectra (..., ncol) with their floor removed, compressed with ``asinh`` in units of
    five times their noise, so that weak and bright lines count alike in correlations."""
    resid = flux - np.percentile(flux[..., ::4], 20, axis=-1, keepdims=True)
    noise = 1.4826 * np.median(np.abs(np.diff(resid, axis=-1))[..., ::4], axis=-1,
                               keepdims=True)
    return np.arcsinh(np.clip(resid, 0.0, None) / (5.0 * np.maximum(noise, 1e-6) / np.sqrt(2)))


def _shift_columns(spectra: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Move each fiber's spectrum (nlamp, nfib, ncol) left by its integer ``shifts``."""
    ncol = spectra.shape[-1]
    idx = np.clip(np.arange(ncol)[None, :] + shifts[:, None], 0, ncol - 1)
    return np.take_along_axis(spectra, np.broadcast_to(idx, spectra.shape), axis=-1)


def _fiber_shifts(spectra: np.ndarray, live: np.ndarray, max_shift: int = MAX_FIBER_SHIFT
                  ) -> np.ndarray:
    """Shift (px) of every fiber's arc spectra relative to the fiber-median spectra.

    Cross-correlates the compressed spectra of each fiber, summed over lamps, with their
    fiber median; the median is rebuilt from the aligned fibers and the shifts measured
    again. Dead fibers get the shift of their nearest live neighbours.

    Parameters
    ----------
    spectra : ndarray (nlamp, nfib, ncol)
        Extracted arc spectra (e-).
    live : ndarray of bool (nfib,)
        Fibers with light.
    max_shift : int
        Largest shift searched (px).

    Returns
    -------
    ndarray (nfib,)
        Column of a feature in each fiber minus its column in the median spectrum.
    """
    _, nfib, ncol = spectra.shape
    comp = _compress(spectra)
    nfft = next_fast_len(ncol + max_shift + 1, real=True)  # no wrap-around within the lags
    spec_ft = rfft(comp, n=nfft, axis=-1)
    shifts = np.zeros(nfib)
    lags = np.arange(-max_shift, max_shift + 1)
    for _ in range(2):
        aligned = _shift_columns(comp, np.rint(shifts).astype(int))
        template = np.median(aligned[:, live], axis=1)  # (nlamp, ncol)
        xc = irfft(spec_ft * np.conj(rfft(template, n=nfft, axis=-1))[:, None], n=nfft,
                   axis=-1).sum(axis=0)[:, lags % nfft]  # (nfib, nlag)
        i = np.clip(np.argmax(xc, axis=1), 1, lags.size - 2)
        y0, y1, y2 = (np.take_along_axis(xc, (i + d)[:, None], 1)[:, 0] for d in (-1, 0, 1))
        curv = y0 - 2 * y1 + y2
        frac = np.where(curv < 0, 0.5 * (y0 - y2) / np.where(curv < 0, curv, -1.0), 0.0)
        shifts = lags[i] + np.clip(frac, -0.5, 0.5)
    k = np.arange(nfib)
    shifts = np.where(live, shifts, np.interp(k, k[live], shifts[live]))
    return shifts - np.median(shifts[live])


def _global_alignment(combs: Mapping[int, tuple[np.ndarray, float, np.ndarray]], ncol: int
                      ) -> tuple[float, float, float]:
    """Shift and stretch that best align the expected line columns with the median spectra.

    Parameters
    ----------
    combs : mapping of lamp plane to (spectrum, noise, expected)
        Continuum-subtracted fiber-median spectrum (e-), its noise (e-) and the expected
        columns of the lamp's lines (px).
    ncol : int
        Columns of the detector.

    Returns
    -------
    shift, stretch, centre : float
        Observed column ``= centre + stretch * (expected - centre) + shift``.
    """
    centre = 0.5 * (ncol - 1)
    shifts = np.arange(-MAX_SHIFT, MAX_SHIFT + 0.25, 0.5)
    stretches = 1.0 + np.linspace(-MAX_STRETCH, MAX_STRETCH, 41)
    cols = np.arange(ncol)
    score = np.zeros((stretches.size, shifts.size))
    for spectrum, noise, expected in combs.values():
        if expected.size == 0:
            continue
        comb = gaussian_filter1d(np.arcsinh(np.clip(spectrum, 0.0, None) / (5.0 * noise)), 2.0)
        pos = (centre + stretches[:, None, None] * (expected[None, None, :] - centre)
               + shifts[None, :, None])
        score += np.interp(pos, cols, comb, left=0.0, right=0.0).sum(axis=-1)
    i, j = np.unravel_index(np.argmax(score), score.shape)
    return float(shifts[j]), float(stretches[i]), centre


def _robust_polyfit(x: np.ndarray, y: np.ndarray, deg: int, clip: float = 1.0,
                    iterations: int = 5) -> tuple[np.polynomial.Polynomial, np.ndarray]:
    """Polynomial fit rejecting points more than ``clip`` (absolute) from the fit."""
    keep = np.isfinite(y)
    deg = int(min(deg, max(keep.sum() - 2, 0)))
    poly = np.polynomial.Polynomial.fit(x[keep], y[keep], deg)
    for _ in range(iterations):
        new = np.isfinite(y) & (np.abs(y - poly(x)) < clip)
        if new.sum() <= deg or np.array_equal(new, keep):
            break
        keep = new
        poly = np.polynomial.Polynomial.fit(x[keep], y[keep], deg)
    return poly, keep


def _smooth_offsets(offset: np.ndarray, weight: np.ndarray, column: np.ndarray, ncol: int,
                    clip: float = 1.0) -> np.ndarray:
    """Per-line offset plus a robust low-order 2-D polynomial of how it changes across fibers.

    Each line's offset is its own fiber median (so that the shape of the offsets along the
    columns is not forced on the lines: a low-order polynomial there once pulled the lines at
    one end of a channel away by px, and they were lost); lines measured in no fiber take
    the value interpolated between their neighbours. What remains, the change of the offsets
    across fibers, is a Legendre polynomial of degree 4 in fiber and up to 2 in column,
    fitted with the weights floored at :data:`SMOOTH_FLOOR` px.

    Parameters
    ----------
    offset, weight : ndarray (nfib, nline)
        Offsets from the global positions (px, NaN where unmeasured) and their weights
        (px^-2).
    column : ndarray (nline,)
        Global column of each line (px).
    ncol : int
        Columns of the detector.
    clip : float
        Offsets further than this (px) from the fit are rejected.

    Returns
    -------
    ndarray (nfib, nline)
        Smooth offsets (px) at every fiber and line.
    """
    nfib = offset.shape[0]
    valid = np.isfinite(offset) & (weight > 0)
    line_med = _nanmedian(np.where(valid, offset, np.nan), axis=0)
    have = np.isfinite(line_med)
    if not have.any():
        return np.zeros_like(offset)
    order = np.argsort(column[have])
    base = np.where(have, line_med,
                    np.interp(column, column[have][order], line_med[have][order]))
    resid = offset - base[None, :]
    y = _norm_fiber(np.arange(nfib), nfib)
    x = np.clip(_norm(column, (0.0, ncol - 1.0)), -1.2, 1.2)
    deg_x = 2 if np.ptp(column[have]) > 0.25 * ncol else 0
    design = (leg.legvander(y, 4)[:, None, :, None] * leg.legvander(x, deg_x)[None, :, None, :]
              ).reshape(nfib, column.size, -1)
    w = np.where(valid, 1.0 / (1.0 / np.maximum(weight, 1e-300) + SMOOTH_FLOOR**2), 0.0)
    good = valid & (np.abs(np.nan_to_num(resid)) < clip)
    coef = np.zeros(design.shape[-1])
    for _ in range(5):
        if good.sum() < design.shape[-1]:
            break
        sw = np.sqrt(w[good])
        coef = np.linalg.lstsq(design[good] * sw[:, None], resid[good] * sw, rcond=None)[0]
        new = valid & (np.abs(np.nan_to_num(resid - design @ coef, nan=np.inf)) < clip)
        if np.array_equal(new, good):
            break
        good = new
    return base[None, :] + design @ coef


# --------------------------------------------------------------------------- 2-D model


def _design(x: np.ndarray, y: np.ndarray, deg_x: int, deg_y: int) -> np.ndarray:
    """Legendre products P_i(x) P_j(y), i = 1..deg_x, j = 0..deg_y: (nfib, nline, nterm)."""
    vx = leg.legvander(x, deg_x)[:, 1:]
    vy = leg.legvander(y, deg_y)
    return (vx[None, :, :, None] * vy[:, None, None, :]).reshape(y.size, x.size, -1)


def _fit_2d(col: np.ndarray, err: np.ndarray, valid: np.ndarray, x: np.ndarray,
            y: np.ndarray, deg_x: int, deg_y: int, clip: float = 4.0, iterations: int = 8,
            design: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Weighted fit of centroids with per-fiber zero-points and a smooth 2-D Legendre part.

    Parameters
    ----------
    col, err : ndarray (nfib, nline)
        Centroids and their errors (px).
    valid : ndarray of bool (nfib, nline)
        Measurements that may be used.
    x : ndarray (nline,)
        Normalised wavelengths of the lines.
    y : ndarray (nfib,)
        Normalised fiber indices.
    design : ndarray (nfib, nline, nterm), optional
        ``_design(x, y, deg_x, deg_y)``, when the caller already has it.

    Returns
    -------
    coeffs : ndarray (deg_x, deg_y + 1)
    offset : ndarray (nfib,)
        Zero-points (NaN for fibers without used measurements).
    used : ndarray of bool (nfib, nline)
    resid : ndarray (nfib, nline)
        Centroid minus model (px) for every valid measurement.
    """
    if design is None:
        design = _design(x, y, deg_x, deg_y)
    sig2 = err**2 + CENTROID_FLOOR**2
    c = np.where(valid, col, 0.0)
    used = valid.copy()
    for _ in range(iterations):
        w = np.where(used, 1.0 / np.where(valid, sig2, 1.0), 0.0)
        wk = w.sum(1)
        safe = np.maximum(wk, 1e-300)
        xbar = np.einsum("kl,klp->kp", w, design) / safe[:, None]
        cbar = (w * c).sum(1) / safe
        a = design - xbar[:, None, :]
        b = c - cbar[:, None]
        au, wu = a[used], w[used]
        normal = au.T @ (au * wu[:, None])
        coef = np.linalg.lstsq(normal, au.T @ (b[used] * wu), rcond=None)[0]
        offset = np.where(wk > 0, cbar - xbar @ coef, np.nan)
        resid = np.where(valid, c - design @ coef - offset[:, None], np.nan)
        norm = resid / np.sqrt(sig2)
        scale = max(1.0, float(_robust_std(norm[used])))
        new = valid & (np.abs(norm) < clip * scale)
        if np.array_equal(new, used):
            break
        used = new
    return coef.reshape(deg_x, deg_y + 1), offset, used, resid


def _worst_line(resid: np.ndarray, err: np.ndarray, used: np.ndarray, x: np.ndarray,
                deg_x: int) -> int | None:
    """Line whose fiber-averaged residual is inconsistent with the others, or None.

    The leave-one-out residual of each line's weighted mean residual is computed from the
    leverage ``h`` of a 1-D Legendre fit of degree ``deg_x`` to the line means; a line is an
    outlier when it exceeds :data:`LINE_TOLERANCE`, five times its standard error and five
    times the typical leave-one-out residual. Lines with ``h`` above :data:`MAX_LEVERAGE`
    (alone in a part of the detector) are not judged.
    """
    w = np.where(used, 1.0 / (err**2 + CENTROID_FLOOR**2), 0.0)
    wl = w.sum(0)
    have = wl > 0
    if have.sum() <= deg_x + 2:
        return None
    rbar = np.where(have, (w * np.nan_to_num(resid)).sum(0) / np.maximum(wl, 1e-300), 0.0)
    v = leg.legvander(x[have], deg_x)
    cov = np.linalg.pinv(v.T @ (v * wl[have, None]))
    h = np.zeros(x.size)
    h[have] = wl[have] * np.einsum("li,ij,lj->l", v, cov, v)
    one_minus_h = np.clip(1.0 - h, 1e-6, None)
    loo = np.abs(rbar / one_minus_h)
    scatter = _robust_std(np.where(used, resid, np.nan), axis=0)
    stderr = np.sqrt(scatter**2 / np.maximum(used.sum(0), 1) / one_minus_h)
    testable = have & (h < MAX_LEVERAGE)  # a line that alone holds the fit cannot be judged
    if testable.sum() < 3:
        return None
    spread = 1.4826 * np.median(loo[testable])
    bad = testable & (loo > LINE_TOLERANCE) & (loo > 5 * stderr) & (loo > 5 * spread)
    if not bad.any():
        return None
    return int(np.argmax(np.where(bad, loo, -1.0)))


def _choose_model(col: np.ndarray, err: np.ndarray, used: np.ndarray, x: np.ndarray,
                  y: np.ndarray, max_deg_x: int, clip: float,
                  deg_ys: Sequence[int] = (4,)) -> dict:
    """Degrees (in wavelength, across fibers) chosen by leave-one-line-out cross-validation.

    For every candidate ``(deg_x, deg_y)`` with ``deg_x`` in 1..``max_deg_x`` and ``deg_y`` in
    ``deg_ys``, each used line is held out in turn, the model fitted to the others (with the
    per-fiber zero-points, on every :data:`CV_FIBER_STEP`-th fiber) and the held-out line's
    mean residual over its fibers recorded. (A leverage shortcut from one fit per degree
    missed the swings of high degrees beyond the outermost lines.) The score is the RMS of
    these residuals (px); the chosen model is the simplest (fewest terms) whose score is
    within :data:`CV_TOLERANCE` of the best (a standard-error rule let a single discrepant
    line excuse far too simple a model).

    Returns
    -------
    dict
        ``deg_x``, ``deg_y``, ``cv_rms`` (px, of the chosen model), ``scores`` {(deg_x,
        deg_y): rms}, ``method`` ``"cv"`` (``"cap"`` when too few lines to hold any out).
    """
    lines = np.nonzero(used.any(axis=0))[0]
    max_deg_x = int(min(max_deg_x, lines.size - 3))
    if max_deg_x < 1 or lines.size < 5:
        return {"deg_x": max(max_deg_x, 1), "deg_y": deg_ys[0], "method": "cap",
                "cv_rms": np.nan,
                "scores": {}}
    scores = {}
    # every CV_FIBER_STEP-th fiber: the score averages over fibers, the cost scales with them
    c, e, use, yy = (a[::CV_FIBER_STEP] for a in (col, err, used, y))
    for dy in deg_ys:
        for dx in range(1, max_deg_x + 1):
            r = []
            design = _design(x, yy, dx, dy)  # the same for every held-out line
            for line in lines:
                v = use.copy()
                v[:, line] = False
                coef, off, _, _ = _fit_2d(c, e, v, x, yy, dx, dy, clip, iterations=2,
                                          design=design)
                pred = _design(x[line:line + 1], yy, dx, dy)[:, 0, :] @ coef.ravel() + off
                fib = use[:, line] & np.isfinite(pred)
                w = 1 / (e[fib, line] ** 2 + CENTROID_FLOOR**2)
                r.append(float(np.sum(w * (c[fib, line] - pred[fib])) / np.sum(w)))
            scores[(dx, dy)] = float(np.sqrt(np.mean(np.square(r))))
    best = min(scores, key=scores.get)
    ok = [k for k in scores if scores[k] <= (1 + CV_TOLERANCE) * scores[best]]
    dx, dy = min(ok, key=lambda k: (k[0] * (k[1] + 1), k[0], k[1]))
    log.debug("wavelength model by cross-validation: degree %d x %d (held-out RMS %.4f px; "
              "best %s %.4f px)", dx, dy, scores[(dx, dy)], best, scores[best])
    return {"deg_x": dx, "deg_y": dy, "method": "cv", "cv_rms": scores[(dx, dy)],
            "scores": scores}


def _invert(coeffs: np.ndarray, offset: np.ndarray, wave_range: tuple[float, float],
            ncol: int, iterations: int = 4) -> np.ndarray:
    """Wavelength (Angstrom) at every pixel centre of every fiber by Newton's method."""
    nfib = offset.size
    b = _fiber_coeffs(coeffs, offset, _norm_fiber(np.arange(nfib), nfib))[..., None]
    db = leg.legder(b, axis=0)
    cols = np.arange(ncol, dtype=float)[None, :]
    # starting point from a coarse grid of the fiber-average model
    grid = np.linspace(-1.3, 1.3, 257)
    cgrid = leg.legval(grid, b.mean(axis=1)[:, 0])
    x = np.interp(cols, cgrid, grid) + np.zeros((nfib, 1))
    for _ in range(iterations):
        x = x - (leg.legval(x, b, tensor=False) - cols) / leg.legval(x, db, tensor=False)
    lo, hi = wave_range
    return 0.5 * (x * (hi - lo) + lo + hi)


def _fiber_rms(res: np.ndarray, used: np.ndarray) -> np.ndarray:
    """RMS (px) of the used residuals of each fiber (NaN without used lines)."""
    n = used.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sqrt((np.where(used, res, 0.0) ** 2).sum(axis=1) / n)


def _interp_residuals(line_x: np.ndarray, line_resid: np.ndarray, xq: np.ndarray
                      ) -> np.ndarray:
    """Line residuals (px) interpolated at ``xq`` (nfib, n): a monotone cubic (PCHIP)
    between the lines of each fiber, the outermost line's value beyond them."""
    xc = np.clip(xq, line_x[0], line_x[-1])
    if np.all(xc == xc[:1]):  # the same columns for every fiber: one interpolator for all
        return PchipInterpolator(line_x, line_resid, axis=1)(xc[0])
    out = np.empty(xq.shape)
    for k in range(xq.shape[0]):
        out[k] = PchipInterpolator(line_x, line_resid[k])(xc[k])
    return out


def _line_residuals(res: np.ndarray, err: np.ndarray, used: np.ndarray, x: np.ndarray,
                    y: np.ndarray, deg_y: int
                    ) -> tuple[np.ndarray | None, np.ndarray | None, tuple[float, float]]:
    """The polynomial model's residuals at the lines, to be interpolated between them, when
    the held-out lines show that this follows what the polynomial misses (ripples).

    Each used line's residuals are smoothed across fibers with a Legendre polynomial of
    degree ``deg_y`` (the ripple's phase drifts with fiber). Each line in turn is then
    predicted from the others (:func:`_interp_residuals`); the interpolation is kept when
    the RMS of these held-out errors is below ``1 - INTERP_GAIN`` times the RMS of the
    residuals themselves (what the polynomial alone leaves at the lines).

    Returns
    -------
    line_x : ndarray (nline,) or None
        Sorted normalised wavelengths of the lines (None: not chosen).
    line_resid : ndarray (nfib, nline) or None
        Fiber-smoothed residuals (px).
    cv : tuple of float
        RMS (px) over lines and fibers of the residuals and of the held-out errors.
    """
    lines = np.nonzero(used.any(axis=0))[0]
    if lines.size < INTERP_MIN_LINES:
        return None, None, (np.nan, np.nan)
    lines = lines[np.argsort(x[lines])]
    vy = leg.legvander(y, deg_y)
    smooth = np.zeros((y.size, lines.size))
    for j, line in enumerate(lines):
        m = used[:, line]
        d = int(min(deg_y, max(m.sum() - 2, 0)))
        sw = 1.0 / np.sqrt(err[m, line] ** 2 + CENTROID_FLOOR**2)
        coef = np.linalg.lstsq(vy[m, :d + 1] * sw[:, None], res[m, line] * sw, rcond=None)[0]
        smooth[:, j] = vy[:, :d + 1] @ coef
    xl = x[lines]
    held = np.empty_like(smooth)
    for j in range(lines.size):
        keep = np.arange(lines.size) != j
        held[:, j] = smooth[:, j] - _interp_residuals(
            xl[keep], smooth[:, keep], np.full((y.size, 1), xl[j]))[:, 0]
    rms = (float(np.sqrt(np.mean(smooth**2))), float(np.sqrt(np.mean(held**2))))
    if not rms[1] < (1 - INTERP_GAIN) * rms[0]:
        return None, None, rms
    return xl, smooth, rms


def _apply_residuals(wave: np.ndarray, wave_range: tuple[float, float], line_x: np.ndarray,
                     line_resid: np.ndarray, iterations: int = 2) -> np.ndarray:
    """Wavelengths (Angstrom) of the polynomial model ``wave`` moved so that the column
    model includes the interpolated line residuals (px): ``lambda = lambda_poly - r(lambda)
    * dispersion``, iterated."""
    disp = np.gradient(wave, axis=1)
    out = wave
    for _ in range(iterations):
        out = wave - _interp_residuals(line_x, line_resid, _norm(out, wave_range)) * disp
    return out


# --------------------------------------------------------------------------- solver


def solve_wavelength(
    arcs: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    channel: instrument.Channel | str,
    dead: np.ndarray | None = None,
    *,
    deg_x: int = 7,
    deg_y: int = 4,
    clip: float = 4.0,
    min_lines: int = 6,
    lines: Sequence[instrument.ArcLine] | None = None,
    choose: bool = True,
) -> WavelengthSolution:
    """Identify arc lines and fit the 2-D wavelength solution of one channel.

    Parameters
    ----------
    arcs : mapping of str to (flux, variance, saturated)
        Per lamp (``hg``, ``cd``, ``fear``): extracted arc spectra of every fiber
        (nfiber, ncol) in e-, their variance (e-^2) and a boolean mask of the samples that
        include saturated pixels (see :func:`arc_spectra_from_frames`). Samples with a
        non-finite flux or a non-positive variance carry no weight. Lamps without lines in
        the channel are ignored; a channel lamp missing from ``arcs`` is logged and its lines
        are left out.
    channel : Channel or str
        The channel; its lines come from :func:`panacea.instrument.arc_lines`.
    dead : ndarray of bool (nfiber,), optional
        Dead fibers; their zero-points are interpolated from their neighbours.
    deg_x : int
        Legendre degree in wavelength of the column model used to screen the lines (lowered
        when the lines are few or leave large gaps); with ``choose`` the final degree is
        cross-validated up to the larger of this and :data:`CV_MAX_DEG_X`, under the same gap
        rule.
    deg_y : int
        Legendre degree across fibers of each wavelength term.
    clip : float
        Rejection threshold of single centroids, in units of the normalised residual scale.
    min_lines : int
        Fewest usable lines accepted.
    lines : sequence of ArcLine, optional
        Line list to use instead of the bundled table.
    choose : bool
        Choose the degrees by cross-validation (:func:`_choose_model`).

    Returns
    -------
    WavelengthSolution

    Raises
    ------
    WavelengthError
        When the inputs are inconsistent, no arc spectra cover the channel's lamps, fewer
        than ``min_lines`` lines remain or the usable lines span less than
        :data:`MIN_SPAN` of the detector. It is also a :class:`ValueError`.
    """
    ch = channel if isinstance(channel, instrument.Channel) else instrument.get_channel(channel)
    table = list(instrument.arc_lines(ch.name) if lines is None else lines)
    if not table:
        raise WavelengthError(f"{ch.name}: no arc lines listed")
    shapes = {np.shape(a) for v in arcs.values() for a in v}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise WavelengthError(f"{ch.name}: arc spectra, variances and masks must share one "
                              f"2-D shape; got {sorted(shapes)}")
    nfib, ncol = next(iter(shapes))
    dead = np.zeros(nfib, bool) if dead is None else np.asarray(dead, bool)
    if dead.shape != (nfib,):
        raise WavelengthError(f"{ch.name}: dead mask of shape {dead.shape} for {nfib} fibers")
    live = ~dead
    if not live.any():
        raise WavelengthError(f"{ch.name}: every fiber is dead")
    listed = sorted({a.lamp for a in table})
    lamps = [lp for lp in listed if lp in arcs]
    if not lamps:
        raise WavelengthError(f"{ch.name}: no arc spectra of the lamps {', '.join(listed)}")
    missing = [lp for lp in listed if lp not in arcs]
    if missing:
        log.warning("%s: no arc spectra of lamp(s) %s; solving from %s", ch.name,
                    ", ".join(missing), ", ".join(lamps))

    wl = np.array([a.wavelength for a in table])
    lamp_of = np.array([a.lamp for a in table])
    strength = np.array([a.strength for a in table])
    plane = np.array([lamps.index(lp) if lp in lamps else 0 for lp in lamp_of])
    status = np.where(np.isin(lamp_of, lamps), "", "lamp missing").astype(object)
    spectra = np.stack([np.asarray(arcs[lp][0], float) for lp in lamps])
    variance = np.stack([np.asarray(arcs[lp][1], float) for lp in lamps])
    saturated = np.stack([np.asarray(arcs[lp][2], bool) for lp in lamps])
    bad = ~np.isfinite(spectra) | ~(variance > 0)  # no weight, and no effect on correlations
    spectra[bad], variance[bad] = 0.0, np.inf

    # ---- identification: fiber shifts, global mapping of the expected columns
    model0 = _sheet_model(table, ncol, ch)
    fshift = _fiber_shifts(spectra, live)
    guess = _identify(spectra, saturated, live, fshift, plane, model0(wl), status == "")
    log.debug("%s: fiber shifts %+.1f to %+.1f px", ch.name, fshift[live].min(),
              fshift[live].max())
    half = FIT_HALF_WIDTH
    status[(status == "") & ((guess < half) | (guess > ncol - 1 - half))] = "outside"
    sep = np.abs(guess[:, None] - guess[None, :])
    companion = ((plane[:, None] == plane[None, :]) & (sep < 1.5 * instrument.LSF_FWHM_PIX)
                 & (strength[None, :] > 0.05 * strength[:, None])
                 & ~np.eye(wl.size, dtype=bool) & (status == "")[None, :])
    status[(status == "") & companion.any(axis=1)] = "blend"

    # ---- centroids in every fiber and line screening
    fits = _measure(spectra, variance, saturated, live, plane, guess, fshift, status)

    # ---- 2-D model with rejection of single centroids and of whole lines
    wave_range = (_wavelength_at(model0, 0.0, wl), _wavelength_at(model0, ncol - 1.0, wl))
    x = _norm(wl, wave_range)
    y = _norm_fiber(np.arange(nfib), nfib)
    while True:
        candidate = status == ""
        if candidate.sum() < min_lines:
            raise WavelengthError(
                f"{ch.name}: only {int(candidate.sum())} usable arc lines (need {min_lines}); "
                f"line status: {_status_summary(status)}")
        deg = _degree(deg_x, guess[candidate], ncol)
        valid = fits.ok & candidate[None, :] & live[:, None]
        coeffs, offset, used, res = _fit_2d(fits.mu, fits.mu_err, valid, x, y, deg, deg_y,
                                            clip)
        worst = _worst_line(res, fits.mu_err, used, x, deg)
        if worst is None:
            break
        status[worst] = "rejected"
    if choose:
        cap = _degree(max(deg_x, CV_MAX_DEG_X), guess[used.any(axis=0)], ncol)
        choice = _choose_model(fits.mu, fits.mu_err, used, x, y, cap, clip, (deg_y,))
        deg, deg_y = choice["deg_x"], choice["deg_y"]
        coeffs, offset, used, res = _fit_2d(fits.mu, fits.mu_err, valid, x, y, deg, deg_y,
                                            clip)
    else:
        choice = {"deg_x": deg, "deg_y": deg_y, "method": "fixed"}
    status[candidate & ~used.any(axis=0)] = "rejected"
    status[used.any(axis=0)] = "used"
    _check_coverage(ch.name, guess[status == "used"], ncol, status)

    have = np.isfinite(offset)
    if (~have & live).any():
        log.warning("%s: %d live fiber(s) without usable arc lines; their zero-points are "
                    "interpolated", ch.name, int((~have & live).sum()))
    kfib = np.arange(nfib)
    offset = np.where(have, offset, np.interp(kfib, kfib[have], offset[have]))
    wave = _invert(coeffs, offset, wave_range, ncol)
    _check_fit(ch.name, _fiber_rms(res, used), status, (deg, deg_y))

    # ---- residuals of the lines, interpolated between them where held-out lines say so
    line_x, line_resid, gain = _line_residuals(res, fits.mu_err, used, x, y, deg_y)
    choice = {**choice, "interp": line_x is not None, "interp_cv": gain}
    if line_x is not None:
        choice["method"] = f"{choice['method']}+lines"
        wave = _apply_residuals(wave, wave_range, line_x, line_resid)
        res = np.where(used, res, np.nan) - _interp_residuals(
            line_x, line_resid, np.broadcast_to(x, res.shape))
        log.info("%s: line residuals interpolated between the %d lines (held-out RMS %.4f "
                 "px instead of %.4f px)", ch.name, line_x.size, gain[1], gain[0])

    # ---- diagnostics
    disp = np.gradient(wave, axis=1)
    at_line = np.clip(np.rint(np.nan_to_num(fits.mu)), 0, ncol - 1).astype(int)
    res_ang = res * np.take_along_axis(disp, at_line, axis=1)
    rms_pix, rms_ang = _fiber_rms(res, used), _fiber_rms(res_ang, used)
    line_fits = ArcLineFits(
        wavelength=wl, lamp=lamp_of, element=np.array([a.element for a in table]),
        source=np.array([a.source for a in table]), strength=strength, expected=guess,
        column=fits.mu, column_err=fits.mu_err, sigma=fits.sigma, flux=fits.amp, used=used,
        status=status.astype(str))
    nlamp = ", ".join(f"{lp} {int(((status == 'used') & (lamp_of == lp)).sum())}"
                      for lp in lamps)
    log.info("%s: wavelength solution from %d of %d lines (%s; %s), degree %d x %d, median "
             "fiber RMS %.4f px = %.4f A over %d fibers", ch.name,
             int((status == "used").sum()), wl.size, nlamp, _status_summary(status), deg,
             deg_y, float(_nanmedian(rms_pix)), float(_nanmedian(rms_ang)), int(have.sum()))
    return WavelengthSolution(
        channel=ch.name, wave=wave, rms_pix=rms_pix, rms_angstrom=rms_ang, lines=line_fits,
        coeffs=coeffs, fiber_offset=offset, wave_range=wave_range, unmeasured=~have,
        choice=choice, line_x=line_x, line_resid=line_resid)


def _identify(spectra: np.ndarray, saturated: np.ndarray, live: np.ndarray,
              fshift: np.ndarray, plane: np.ndarray, expected: np.ndarray, use: np.ndarray
              ) -> np.ndarray:
    """Columns of the listed lines in the fiber-median spectra.

    Parameters
    ----------
    spectra, saturated : ndarray (nlamp, nfib, ncol)
        Arc spectra (e-) and saturation flags.
    live : ndarray of bool (nfib,)
        Fibers with light.
    fshift : ndarray (nfib,)
        Shift of each fiber relative to the median (px, see :func:`_fiber_shifts`).
    plane : ndarray of int (nline,)
        Lamp plane of each line.
    expected : ndarray (nline,)
        Columns predicted by the facts sheet (px).
    use : ndarray of bool (nline,)
        Lines whose lamp was observed.

    Returns
    -------
    ndarray (nline,)
        Column of every line in the median spectra (px).
    """
    nlamp, _, ncol = spectra.shape
    aligned = _shift_columns(spectra, np.rint(fshift).astype(int))
    med = np.empty((nlamp, 1, ncol))
    noise = np.empty(nlamp)
    for i in range(nlamp):
        med[i, 0], noise[i] = _line_residual(np.median(aligned[i][live], axis=0))
    combs = {i: (med[i, 0], noise[i], expected[use & (plane == i)]) for i in range(nlamp)}
    shift, stretch, centre = _global_alignment(combs, ncol)
    guess = centre + stretch * (expected - centre) + shift
    med_var = np.broadcast_to(noise[:, None, None] ** 2, med.shape)
    med_sat = (saturated[:, live].mean(axis=1) > 0.2)[:, None, :]
    for window in (6.0, 3.0):
        f = _fit_lines(med, med_var, med_sat, plane, guess[None, :], use[None, :], passes=2,
                       max_move=window)
        found = f.ok[0] & (f.amp[0] > 20 * f.amp_err[0])
        if found.sum() < 2:
            break
        deg = 2 if found.sum() >= 6 else (1 if found.sum() >= 4 else 0)
        poly, _ = _robust_polyfit(guess[found], f.mu[0][found], deg, clip=1.5)
        slope = poly.deriv()(guess)
        if np.all((slope > 1 - MAX_STRETCH) & (slope < 1 + MAX_STRETCH)):
            guess = poly(guess)
    log.debug("global shift %+.1f px, stretch %.4f", shift, stretch)
    return guess


def _measure(spectra: np.ndarray, variance: np.ndarray, saturated: np.ndarray,
             live: np.ndarray, plane: np.ndarray, guess: np.ndarray, fshift: np.ndarray,
             status: np.ndarray) -> _Fits:
    """Centroids of the candidate lines in every live fiber; updates ``status`` in place.

    Two passes of :func:`_fit_lines`: from the aligned global columns, then from a smooth
    model of the first pass's offsets plus a per-fiber constant. Flags lines ``saturated``,
    ``not detected`` and ``blend`` (see :func:`_blend_flags`).
    """
    ncol = spectra.shape[-1]
    fit_mask = live[:, None] & (status == "")[None, :]
    start = guess[None, :] + fshift[:, None]
    fits = _fit_lines(spectra, variance, saturated, plane, start, fit_mask, passes=2,
                      max_move=4.0)
    weight = np.where(fits.ok, 1.0 / np.maximum(fits.mu_err, 0.01) ** 2, 0.0)
    offset = fits.mu - start
    smooth = _smooth_offsets(offset, weight, guess, ncol)
    start = start + smooth + np.nan_to_num(_nanmedian(offset - smooth, axis=1))[:, None]
    fits = _fit_lines(spectra, variance, saturated, plane, start, fit_mask, max_move=2.0)
    core = _fit_lines(spectra, variance, saturated, plane, start, fit_mask, max_move=2.0,
                      half=CORE_HALF_WIDTH)
    nlive = int(live.sum())
    sat_frac = (fits.saturated & live[:, None]).sum(axis=0) / nlive
    status[(status == "") & (sat_frac > SATURATED_FRACTION)] = "saturated"
    usable = (live[:, None] & ~fits.near_saturated).sum(axis=0)
    detected = (fits.ok & live[:, None]).sum(axis=0)
    status[(status == "") & ((detected < 0.5 * usable) | (detected < 10))] = "not detected"
    status[_blend_flags(fits, core, status == "", guess)] = "blend"
    return fits


def _blend_flags(fits: _Fits, core: _Fits, candidate: np.ndarray, column: np.ndarray
                 ) -> np.ndarray:
    """Lines whose profile shows a blend: core and full-window centroids disagree (more than
    they do for the typical line: an asymmetric line spread moves them apart in every line),
    or the line is wider than the trend of the other lines.

    Parameters
    ----------
    fits, core : _Fits
        Fits in the full window and in the core window, from the same starting points.
    candidate : ndarray of bool (nline,)
        Lines to test.
    column : ndarray (nline,)
        Their columns (px, for the width trend).

    Returns
    -------
    ndarray of bool (nline,)
    """
    both = fits.ok & core.ok
    shift = np.where(both, fits.mu - core.mu, np.nan)
    diff = _nanmedian(shift, axis=0)
    typical = diff[candidate & np.isfinite(diff)]
    if typical.size >= 3:
        diff = diff - float(np.median(typical))
    stderr = _robust_std(shift, axis=0) / np.sqrt(np.maximum(both.sum(axis=0), 1))
    shifted = candidate & (np.abs(diff) > np.maximum(4 * stderr, BLEND_SHIFT))
    width = _nanmedian(fits.sigma, axis=0)
    ok = candidate & np.isfinite(width) & ~shifted
    wide = np.zeros_like(candidate)
    if ok.sum() >= 5:
        # each line against the trend of the others: where lines are sparse, a blended line
        # would otherwise pull the trend up to itself
        for i in np.nonzero(candidate & np.isfinite(width))[0]:
            others = ok & (np.arange(ok.size) != i)
            trend, _ = _robust_polyfit(column[others], width[others],
                                       2 if others.sum() >= 6 else 0, clip=0.05)
            wide[i] = width[i] > trend(column[i]) * (1 + BLEND_WIDTH)
    return shifted | wide


def _wavelength_at(model: np.polynomial.Polynomial, column: float, wl: np.ndarray) -> float:
    """Wavelength (Angstrom) at which the expected-column ``model`` reaches ``column``."""
    grid = np.linspace(wl.min() - 0.3 * np.ptp(wl), wl.max() + 0.3 * np.ptp(wl), 8001)
    return float(np.interp(column, model(grid), grid))


def _largest_gap(columns: np.ndarray, ncol: int) -> float:
    """Largest stretch of the detector without lines, as a fraction of its width.

    The stretches beyond the first and the last line, which are extrapolated, count
    ``EDGE_WEIGHT + 1`` times their length.
    """
    lo, hi = columns.min(), columns.max()
    edges = np.sort(np.concatenate([[-EDGE_WEIGHT * lo], columns,
                                    [ncol - 1 + EDGE_WEIGHT * (ncol - 1 - hi)]]))
    return float(np.max(np.diff(edges))) / ncol


def _degree(deg_x: int, columns: np.ndarray, ncol: int) -> int:
    """Legendre degree in wavelength allowed by the number and spread of the lines.

    At most ``deg_x`` and two less than the number of lines. A polynomial of degree ``n`` has
    about ``n / 2`` oscillations over the detector, so a large gap without lines (see
    :func:`_largest_gap`) limits ``n`` to :data:`GAP_DEGREE` divided by the gap's fraction
    of the detector: otherwise the fit may swing freely inside the gap.
    """
    gap = max(_largest_gap(columns, ncol), 1e-3)
    return int(max(1, min(deg_x, columns.size - 2, np.floor(GAP_DEGREE / gap))))


def _coverage_gaps(columns: np.ndarray, ncol: int) -> list[tuple[float, float]]:
    """Stretches of the detector without lines, (first, last) column (px): the two ends
    beyond the outermost lines and the gaps between neighbouring lines, ordered as
    :func:`_largest_gap` ranks them (ends count ``EDGE_WEIGHT + 1`` times their length)."""
    c = np.sort(np.asarray(columns, float))
    ends = [(0.0, float(c[0])), (float(c[-1]), ncol - 1.0)]
    inner = [(float(a), float(b)) for a, b in pairwise(c)]
    ranked = [(EDGE_WEIGHT + 1) * (b - a) for a, b in ends] + [b - a for a, b in inner]
    return [(ends + inner)[i] for i in np.argsort(ranked)[::-1]]


def _check_coverage(name: str, columns: np.ndarray, ncol: int, status: np.ndarray) -> None:
    """Raise when the used lines span too little of the detector; warn on large gaps.

    The warning follows the rule of :func:`_degree` (ends weighted ``EDGE_WEIGHT + 1``
    times, the weighted figure may exceed 100 %) but reports the real stretch without lines.
    """
    span = np.ptp(columns) / ncol
    if span < MIN_SPAN:
        raise WavelengthError(f"{name}: the usable arc lines span only {100 * span:.0f}% of "
                              f"the detector (need {100 * MIN_SPAN:.0f}%); line status: "
                              f"{_status_summary(status)}")
    gap = _largest_gap(columns, ncol)
    if gap > WARN_GAP:
        lo, hi = _coverage_gaps(columns, ncol)[0]
        where = ("beyond the last line" if hi >= ncol - 1 else
                 "before the first line" if lo <= 0 else "between two lines")
        log.warning("%s: columns %.0f to %.0f (%.0f%% of the detector, %s) hold no arc line; "
                    "the solution there is %s and may be off by more than 0.1 px", name,
                    lo, hi, 100 * (hi - lo) / ncol, where,
                    "interpolated" if where == "between two lines" else "extrapolated")


def _check_fit(name: str, rms_pix: np.ndarray, status: np.ndarray, deg: tuple[int, int]
               ) -> None:
    """Refuse a solution whose lines the model cannot follow (median fiber RMS above
    :data:`MAX_FIT_RMS` px): wrong identifications, blends or too rigid a model."""
    med = float(_nanmedian(rms_pix))
    if not np.isfinite(med) or med > MAX_FIT_RMS:
        raise WavelengthError(
            f"{name}: the wavelength model (degree {deg[0]} x {deg[1]}) leaves a median fiber "
            f"RMS of {med:.3f} px on the arc lines (at most {MAX_FIT_RMS} px accepted): lines "
            f"misidentified or blended, or too few to constrain it; line status: "
            f"{_status_summary(status)}")


def _status_summary(status: np.ndarray) -> str:
    """``'used 12, saturated 1, ...'`` from an array of line status strings."""
    names, counts = np.unique(status.astype(str), return_counts=True)
    return ", ".join(f"{n or 'candidate'} {c}" for n, c in zip(names, counts, strict=True))
