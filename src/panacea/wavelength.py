"""Arc-line identification and the 2-D wavelength solution of a channel.

The solution maps (fiber, column) of the stitched, oriented channel frame to air wavelength
(Angstrom). It is built from per-fiber extracted arc spectra, one set per lamp, in five steps:

1. **Expected positions.** A cubic through the facts sheet's approximate line columns
   (``source=sheet`` rows of ``arc_lines.csv``) predicts the column of every listed line.
2. **Global alignment.** The fiber-median spectrum of each lamp, compressed with ``asinh`` so
   that weak lamps count as much as bright ones, is cross-correlated with a comb of the
   expected line positions over a grid of shifts and stretches; then the lines found in the
   median spectra refine the mapping (expected column -> observed column) with a robust
   quadratic.
3. **Line centroids.** Every listed line is fitted in every live fiber with a
   pixel-integrated Gaussian plus a constant, all lines and fibers at once (vectorised
   Gauss-Newton). Neighbouring lines of the same lamp, including bright unlisted lines found
   in the median spectra, are deblended by subtracting their fitted models. A first pass
   starts at the global positions; a smooth model of the per-fiber offsets then predicts the
   start of a second pass. Windows with saturated pixels are not used; a line saturated in
   many fibers is dropped everywhere.
4. **2-D model.** Column as a function of wavelength and fiber,
   ``c_k(lambda) = z_k + sum_{i>=1, j} a_ij P_i(x) P_j(y)`` with Legendre polynomials ``P`` in
   the normalised wavelength ``x`` and fiber index ``y``, and a free zero-point ``z_k`` per
   fiber. Weighted least squares with iterative clipping of single measurements and of whole
   lines whose fiber-averaged residual is inconsistent (blends, misidentifications).
5. **Evaluation.** The model is inverted by Newton's method at every column of every fiber.

No file I/O happens here: the arrays come from :mod:`panacea.extract` (see
:func:`arc_spectra_from_frames`) and the solution goes to the calibration bundle.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.polynomial import legendre as leg
from scipy.ndimage import gaussian_filter1d, median_filter
from scipy.special import erf

from panacea import instrument
from panacea.ccd import Frame, Mask
from panacea.errors import PanaceaError
from panacea.extract import boxcar

log = logging.getLogger(__name__)

#: Gaussian sigma (px) of the line spread, from the nominal FWHM.
LSF_SIGMA = instrument.LSF_FWHM_PIX / (2.0 * np.sqrt(2.0 * np.log(2.0)))
#: Half-width (px) of the window in which each line is fitted.
FIT_HALF_WIDTH = 7
#: Search range (px) and stretch range (fraction) of the global alignment.
MAX_SHIFT = 80.0
MAX_STRETCH = 0.02
#: Lines saturated in more than this fraction of the live fibers are dropped everywhere.
SATURATED_FRACTION = 0.05
#: Minimum signal-to-noise ratio of a line fit in one fiber.
MIN_SNR = 8.0
#: Systematic floor (px) added in quadrature to centroid errors in the 2-D fit.
CENTROID_FLOOR = 0.01


class WavelengthError(PanaceaError):
    """The wavelength solution cannot be computed (too few lines, no arcs)."""


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
        Column predicted by the global alignment (px).
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

    @property
    def line_used(self) -> np.ndarray:
        """True for lines used in at least one fiber, shape (nline,)."""
        return self.used.any(axis=0)

    def __len__(self) -> int:
        return self.wavelength.size


@dataclass
class WavelengthSolution:
    """Wavelength of every fiber at every column, with the model and its diagnostics.

    The model gives the column of wavelength ``lambda`` in fiber ``k`` as
    ``fiber_offset[k] + sum_{i=1..deg_x} sum_{j=0..deg_y} coeffs[i-1, j] P_i(x) P_j(y)`` with
    ``x = (2 lambda - wave_lo - wave_hi) / (wave_hi - wave_lo)`` (``wave_range``) and
    ``y = (2 k - nfiber + 1) / (nfiber - 1)``; :attr:`wave` is its inverse at pixel centres.

    Attributes
    ----------
    channel : str
        Channel name.
    wave : ndarray (nfiber, ncol)
        Air wavelength (Angstrom) at every pixel centre.
    rms_pix, rms_angstrom : ndarray (nfiber,)
        RMS of the used line residuals of each fiber (px and Angstrom); NaN for fibers
        without lines (dead).
    lines : ArcLineFits
        Lines, fitted columns per fiber and flags.
    coeffs : ndarray (deg_x, deg_y + 1)
        Legendre coefficients (px) of the smooth part.
    fiber_offset : ndarray (nfiber,)
        Zero-point of each fiber (px); interpolated for fibers without lines.
    wave_range : tuple of float
        Wavelengths (Angstrom) mapped to x = -1 and +1.
    dead : ndarray of bool (nfiber,)
        Fibers without a measured solution (evaluated from the smooth model).
    """

    channel: str
    wave: np.ndarray
    rms_pix: np.ndarray
    rms_angstrom: np.ndarray
    lines: ArcLineFits
    coeffs: np.ndarray
    fiber_offset: np.ndarray
    wave_range: tuple[float, float]
    dead: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    @property
    def dispersion(self) -> np.ndarray:
        """Angstrom per pixel of every fiber at every column, (nfiber, ncol)."""
        return np.gradient(self.wave, axis=1)

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
        return leg.legval(_norm(lam[None, :], self.wave_range), b[..., None], tensor=False)


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


def _pixel_gauss(cols: np.ndarray, mu: np.ndarray, sigma: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel-integrated unit Gaussian and its derivatives with respect to mu and sigma."""
    zp = (cols + 0.5 - mu) / sigma
    zm = (cols - 0.5 - mu) / sigma
    g = 0.5 * (erf(zp / np.sqrt(2.0)) - erf(zm / np.sqrt(2.0)))
    pp = np.exp(-0.5 * zp**2) / np.sqrt(2.0 * np.pi)
    pm = np.exp(-0.5 * zm**2) / np.sqrt(2.0 * np.pi)
    return g, (pm - pp) / sigma, (zm * pm - zp * pp) / sigma


def _robust_std(x: np.ndarray, axis=None) -> np.ndarray:
    """Normalised median absolute deviation."""
    med = np.nanmedian(x, axis=axis, keepdims=True)
    return 1.4826 * np.nanmedian(np.abs(x - med), axis=axis)


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
    for lamp, frames in frames_by_lamp.items():
        frames = [frames] if isinstance(frames, Frame) else list(frames)
        if not frames:
            continue
        flux = var = sat = None
        for fr in frames:
            f, v = boxcar(fr.image, trace, half_width, fr.variance)
            s, _ = boxcar(((fr.mask & Mask.SATURATED) != 0).astype(np.float32), trace,
                          half_width)
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
    ok: np.ndarray
    saturated: np.ndarray


def _fit_lines(spectra: np.ndarray, variance: np.ndarray, saturated: np.ndarray,
               lamp: np.ndarray, start: np.ndarray, fit: np.ndarray,
               passes: int = 3, iterations: int = 8, max_move: float = 3.0) -> _Fits:
    """Fit pixel-integrated Gaussians plus a constant to many lines in many fibers at once.

    Parameters
    ----------
    spectra, variance : ndarray (nlamp, nfib, ncol)
        Extracted arc spectra (e-) and their variance (e-^2), one plane per lamp.
    saturated : ndarray of bool (nlamp, nfib, ncol)
        Samples that include saturated pixels.
    lamp : ndarray of int (nline,)
        Plane of ``spectra`` holding each line.
    start : ndarray (nfib, nline)
        Starting centroid (px); the fit window is centred on it.
    fit : ndarray of bool (nfib, nline)
        Which (fiber, line) pairs to fit; the others neither are fitted nor deblended.
    passes : int
        Deblending passes: in passes after the first, the models of all other lines of the
        same lamp are subtracted from each line's window before it is refitted.
    iterations : int
        Gauss-Newton iterations per pass.
    max_move : float
        Largest accepted distance (px) of the centroid from ``start``.

    Returns
    -------
    _Fits
    """
    nlamp, nfib, ncol = spectra.shape
    nline = lamp.size
    half = FIT_HALF_WIDTH
    offs = np.arange(-half, half + 1)
    c0 = np.rint(np.nan_to_num(start, nan=-10 * ncol)).astype(int)
    cols = c0[..., None] + offs  # (nfib, nline, w)
    inside = (cols[..., 0] >= 0) & (cols[..., -1] < ncol)
    fit = fit & inside
    colc = np.clip(cols, 0, ncol - 1)
    kk = np.broadcast_to(np.arange(nfib)[:, None, None], cols.shape)
    ll = np.broadcast_to(lamp[None, :, None], cols.shape)
    data = spectra[ll, kk, colc]
    var = variance[ll, kk, colc]
    sat = saturated[ll, kk, colc].any(axis=-1)
    fit = fit & ~sat
    floor = np.maximum(np.nanmedian(variance[..., :], axis=-1), 1.0)  # (nlamp, nfib)
    var = np.maximum(var, floor[lamp].T[..., None] * 0.1)
    w = np.where(fit[..., None] & np.isfinite(data) & np.isfinite(var), 1.0 / var, 0.0)
    data = np.nan_to_num(data)
    x = cols.astype(float)

    # starting values
    edge = np.minimum(data[..., :2].mean(-1), data[..., -2:].mean(-1))
    mu = np.where(fit, start, c0).astype(float)
    sig = np.full(mu.shape, LSF_SIGMA)
    amp = np.maximum((data - edge[..., None]).sum(-1), 1.0)
    bkg = edge
    model_others = np.zeros_like(data)
    for p in range(passes):
        if p:
            # model of every line on the frame, per lamp, then the others' share in each window
            g, _, _ = _pixel_gauss(x, mu[..., None], sig[..., None])
            good = fit & np.isfinite(mu) & np.isfinite(amp) & np.isfinite(sig)
            contrib = np.where(good[..., None], amp[..., None] * g, 0.0)
            total = np.zeros((nlamp, nfib, ncol))
            np.add.at(total, (ll, kk, colc), contrib)
            model_others = total[ll, kk, colc] - contrib
        y = data - model_others
        for _ in range(iterations):
            g, dmu, dsig = _pixel_gauss(x, mu[..., None], sig[..., None])
            r = y - (amp[..., None] * g + bkg[..., None])
            jac = np.stack([g, amp[..., None] * dmu, amp[..., None] * dsig, np.ones_like(g)],
                           axis=-1)  # (nfib, nline, w, 4)
            jw = jac * w[..., None]
            ata = np.einsum("...wi,...wj->...ij", jw, jac)
            atb = np.einsum("...wi,...w->...i", jw, r)
            ata = np.where(fit[..., None, None], ata, np.eye(4))
            diag = np.einsum("...ii->...i", ata)
            ata = ata + np.eye(4) * (1e-3 * diag + 1e-12 * diag.max(-1, keepdims=True))[..., None, :]
            step = np.linalg.solve(ata, atb[..., None])[..., 0]
            step[..., 1] = np.clip(step[..., 1], -1.0, 1.0)
            step[..., 2] = np.clip(step[..., 2], -0.3 * sig, 0.3 * sig)
            amp = amp + step[..., 0]
            mu = mu + step[..., 1]
            sig = np.clip(sig + step[..., 2], 0.3 * LSF_SIGMA, 3.0 * LSF_SIGMA)
            bkg = bkg + step[..., 3]
    g, dmu, dsig = _pixel_gauss(x, mu[..., None], sig[..., None])
    r = y - (amp[..., None] * g + bkg[..., None])
    jac = np.stack([g, amp[..., None] * dmu, amp[..., None] * dsig, np.ones_like(g)], axis=-1)
    ata = np.einsum("...wi,...wj->...ij", jac * w[..., None], jac)
    npix = (w > 0).sum(-1)
    chi2 = (w * r**2).sum(-1) / np.maximum(npix - 4, 1)
    ok = fit & np.isfinite(mu) & np.all(np.isfinite(ata), axis=(-2, -1))
    cov = np.full(ata.shape, np.nan)
    det_ok = ok & (np.abs(np.linalg.det(np.where(ok[..., None, None], ata, np.eye(4)))) > 0)
    cov[det_ok] = np.linalg.inv(ata[det_ok])
    scale = np.sqrt(np.maximum(chi2, 1.0))
    mu_err = np.sqrt(np.abs(cov[..., 1, 1])) * scale
    amp_err = np.sqrt(np.abs(cov[..., 0, 0])) * scale
    ok &= det_ok & (np.abs(mu - start) < max_move) & (amp > MIN_SNR * amp_err)
    ok &= (sig > 0.5 * LSF_SIGMA) & (sig < 2.0 * LSF_SIGMA)
    ok &= (mu > half) & (mu < ncol - 1 - half)
    return _Fits(mu=np.where(ok, mu, np.nan), mu_err=np.where(ok, mu_err, np.nan),
                 sigma=np.where(ok, sig, np.nan), amp=np.where(ok, amp, np.nan),
                 amp_err=amp_err, ok=ok, saturated=sat)


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


def _compressed(median: np.ndarray) -> tuple[np.ndarray, float]:
    """Continuum-subtracted fiber-median spectrum and its noise (e-)."""
    resid = median - median_filter(median, size=61, mode="nearest")
    noise = 1.4826 * np.median(np.abs(np.diff(resid))) / np.sqrt(2.0)
    return resid, max(float(noise), 1e-6)


def _global_alignment(resid: dict[str, np.ndarray], noise: dict[str, float],
                      expected: dict[str, np.ndarray], ncol: int) -> tuple[float, float, float]:
    """Shift and stretch that best align the expected line columns with the median spectra.

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
    for lamp, r in resid.items():
        if expected[lamp].size == 0:
            continue
        comb = gaussian_filter1d(np.arcsinh(np.clip(r, 0.0, None) / (5.0 * noise[lamp])), 2.0)
        pos = (centre + stretches[:, None, None] * (expected[lamp][None, None, :] - centre)
               + shifts[None, :, None])
        score += np.interp(pos, cols, comb, left=0.0, right=0.0).sum(-1)
    i, j = np.unravel_index(np.argmax(score), score.shape)
    return float(shifts[j]), float(stretches[i]), centre
