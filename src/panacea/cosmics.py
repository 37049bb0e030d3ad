"""Cosmic-ray detection on a stitched LRS2 channel frame.

Two detectors share one entry point, :func:`detect_cosmics`:

``fiber`` (default)
    A fiber-aware test. Each row is modelled by a running median along the dispersion
    direction, which follows every fiber's continuum, the fiber profiles and the traces but
    not a cosmic-ray track a few pixels long. A pixel well above that model (in units of its
    expected noise) is a cosmic ray only when the excess is *sharper than the optics allow*:
    sharper across the rows than the narrowest fiber profile, sharper along the columns than
    the line spread function, or sharper along a diagonal than both together. Emission lines
    are vertical and spread over all rows of a fiber with the fiber's own profile, so their
    excess over the running median has the profile's shape across rows and never passes the
    test, however bright the line; the starlight of a bright fiber is removed by the running
    median, so a cosmic ray on a bright star is judged against the noise, not against the
    starlight. Flagged pixels are removed from the model and their neighbours tested again
    (a track's pixels shield each other in the first pass), then the mask grows into
    neighbours that are merely high. Needs no trace; about 1 s per 2064 x 2064 frame.

``lacosmic``
    L.A.Cosmic (van Dokkum 2001) through :func:`astroscrappy.detect_cosmics`, run on the
    image minus the same running-median model (passed as ``inbkg``), so that fiber profiles
    are not mistaken for cosmic rays. Slower (several seconds per frame) and it flags more
    pixels of bright star fibers; kept as a cross-check.

All images are in electrons (e-), rows are the spatial axis, columns the dispersion axis.
"""

from __future__ import annotations

import logging
from functools import cache

import numpy as np
from numba import njit
from scipy.special import erf


log = logging.getLogger(__name__)

#: Methods accepted by :func:`detect_cosmics`.
METHODS = ("fiber", "lacosmic")
#: Columns on each side of a pixel in the running median along the dispersion direction.
MEDIAN_HALF_WIDTH = 4
#: Core Gaussian sigma (px) of the narrowest cross-dispersion profile the optics produce;
#: LRS2 profiles have 1.1-1.4 px, a little margin below that keeps bright fibers safe.
MIN_PROFILE_SIGMA = 1.0
#: Fraction of the profile in a Gaussian wing :data:`PROFILE_WING_SCALE` times wider.
PROFILE_WING_FRACTION = 0.04
PROFILE_WING_SCALE = 2.2
#: Narrowest line-spread FWHM (px) along the dispersion direction.
MIN_LSF_FWHM = 3.8


def _pixel_profile(sigma: float, phase: float, half: int, wing: float = 0.0,
                   wing_scale: float = 1.0) -> np.ndarray:
    """Pixel-integrated Gaussian (plus optional wing) centred ``phase`` px off pixel ``half``."""
    edges = np.arange(-half, half + 2) - 0.5 - phase
    cdf = (1 - wing) * 0.5 * erf(edges / (sigma * np.sqrt(2)))
    if wing:
        cdf += wing * 0.5 * erf(edges / (wing_scale * sigma * np.sqrt(2)))
    return np.diff(cdf)


@cache
def sharpness_limits(profile_sigma: float = MIN_PROFILE_SIGMA,
                     lsf_fwhm: float = MIN_LSF_FWHM) -> tuple[float, float, float]:
    """Smallest neighbour-to-pixel ratios that light passing through the optics can show.

    The light of a fiber is the product of its cross-dispersion profile (across rows) and
    its spectrum, which is never sharper than the line spread function (along columns). For
    every pair of sub-pixel phases the mean of a pixel's two opposite neighbours is divided
    by the pixel, over the pixels holding at least 5 % of the peak, and the minimum kept.
    Anything sharper than these ratios cannot be light.

    Parameters
    ----------
    profile_sigma : float
        Core sigma of the narrowest cross-dispersion profile (px).
    lsf_fwhm : float
        Narrowest line-spread FWHM along the dispersion (px).

    Returns
    -------
    vertical, horizontal, diagonal : float
        Limits across rows, along columns and along a diagonal.
    """
    phases = np.linspace(-0.5, 0.5, 11)
    lsf_sigma = lsf_fwhm / (2 * np.sqrt(2 * np.log(2)))
    vert = horiz = diag = 1.0
    for pr in phases:
        p = _pixel_profile(profile_sigma, pr, 8, PROFILE_WING_FRACTION, PROFILE_WING_SCALE)
        for pc in phases:
            line = _pixel_profile(lsf_sigma, pc, 12)
            img = p[:, None] * line[None, :]
            core = img > 0.05 * img.max()
            core[[0, -1], :] = False
            core[:, [0, -1]] = False
            r, c = np.nonzero(core)
            val = img[r, c]
            vert = min(vert, float(np.min((img[r - 1, c] + img[r + 1, c]) / (2 * val))))
            horiz = min(horiz, float(np.min((img[r, c - 1] + img[r, c + 1]) / (2 * val))))
            diag = min(diag, float(np.min(np.minimum(
                img[r - 1, c - 1] + img[r + 1, c + 1],
                img[r - 1, c + 1] + img[r + 1, c - 1]) / (2 * val))))
    return vert, horiz, diag


def dispersion_median(image: np.ndarray, half_width: int = MEDIAN_HALF_WIDTH) -> np.ndarray:
    """Running median of every row along the dispersion direction (e-).

    Parameters
    ----------
    image : ndarray (nrow, ncol)
        Frame (e-).
    half_width : int
        Columns on each side of a pixel in the median.

    Returns
    -------
    ndarray (nrow, ncol) of float32
    """
    image = np.ascontiguousarray(image, np.float32)
    if half_width == 4:  # the default: a sorting network, ~4x faster than sliding
        return _row_median9(image)
    return _row_median(image, int(half_width))


@njit(cache=True, nogil=True)
def _row_median9(image):
    """Running median of 9 along rows (edges as :func:`_row_median`) by the 19-exchange
    median-of-9 network (Paeth, Graphics Gems; Devillard's ``opt_med9``)."""
    nrow, ncol = image.shape
    out = np.empty_like(image)
    for r in range(nrow):
        for c in range(ncol):
            p0 = image[r, max(c - 4, 0)]
            p1 = image[r, max(c - 3, 0)]
            p2 = image[r, max(c - 2, 0)]
            p3 = image[r, max(c - 1, 0)]
            p4 = image[r, c]
            p5 = image[r, min(c + 1, ncol - 1)]
            p6 = image[r, min(c + 2, ncol - 1)]
            p7 = image[r, min(c + 3, ncol - 1)]
            p8 = image[r, min(c + 4, ncol - 1)]
            p1, p2 = min(p1, p2), max(p1, p2)
            p4, p5 = min(p4, p5), max(p4, p5)
            p7, p8 = min(p7, p8), max(p7, p8)
            p0, p1 = min(p0, p1), max(p0, p1)
            p3, p4 = min(p3, p4), max(p3, p4)
            p6, p7 = min(p6, p7), max(p6, p7)
            p1, p2 = min(p1, p2), max(p1, p2)
            p4, p5 = min(p4, p5), max(p4, p5)
            p7, p8 = min(p7, p8), max(p7, p8)
            # from here on only the exchanges' halves that reach the median are kept
            p3 = max(p0, p3)
            p5 = min(p5, p8)
            p4, p7 = min(p4, p7), max(p4, p7)
            p6 = max(p3, p6)
            p4 = max(p1, p4)
            p2 = min(p2, p5)
            p4 = min(p4, p7)
            p4, p2 = min(p4, p2), max(p4, p2)
            p4 = max(p6, p4)
            out[r, c] = min(p4, p2)
    return out


@njit(cache=True, nogil=True)
def _row_median(image, half):
    """Running median along rows (edges repeat the end pixel, like scipy's 'nearest'),
    keeping the window sorted as it slides: one removal and one insertion per pixel."""
    nrow, ncol = image.shape
    n = 2 * half + 1
    out = np.empty_like(image)
    buf = np.empty(n, np.float32)
    for r in range(nrow):
        for k in range(n):  # the first window, sorted by insertion
            v = image[r, min(max(k - half, 0), ncol - 1)]
            j = k
            while j > 0 and buf[j - 1] > v:
                buf[j] = buf[j - 1]
                j -= 1
            buf[j] = v
        out[r, 0] = buf[half]
        for c in range(1, ncol):
            old = image[r, min(max(c - 1 - half, 0), ncol - 1)]
            new = image[r, min(c + half, ncol - 1)]
            j = 0
            while j < n - 1 and buf[j] != old:  # bounded: NaN never compares equal
                j += 1
            # slide the hole left or right to where the new value belongs
            while j > 0 and buf[j - 1] > new:
                buf[j] = buf[j - 1]
                j -= 1
            while j < n - 1 and buf[j + 1] < new:
                buf[j] = buf[j + 1]
                j += 1
            buf[j] = new
            out[r, c] = buf[half]
    return out


def _significance(value: np.ndarray, sigma: np.ndarray, r: np.ndarray, c: np.ndarray,
                  dr: int, dc: int, limit: float) -> np.ndarray:
    """Significance (sigma) of ``limit * value[r, c]`` above the mean of the two opposite
    neighbours ``(r -+ dr, c -+ dc)``; 0 at the frame's edges."""
    nrow, ncol = value.shape
    r1, c1, r2, c2 = r - dr, c - dc, r + dr, c + dc
    inside = (np.minimum(r1, r2) >= 0) & (np.maximum(r1, r2) < nrow)
    inside &= (np.minimum(c1, c2) >= 0) & (np.maximum(c1, c2) < ncol)
    r1, r2 = np.clip(r1, 0, nrow - 1), np.clip(r2, 0, nrow - 1)
    c1, c2 = np.clip(c1, 0, ncol - 1), np.clip(c2, 0, ncol - 1)
    mean = 0.5 * (value[r1, c1] + value[r2, c2])
    err = np.sqrt((limit * sigma[r, c]) ** 2 + 0.25 * (sigma[r1, c1] ** 2 + sigma[r2, c2] ** 2))
    return np.where(inside, (limit * value[r, c] - mean) / err, 0.0)


def _too_sharp(excess: np.ndarray, light: np.ndarray, noise: np.ndarray, r: np.ndarray,
               c: np.ndarray, limits: tuple[float, float, float], nsigma: float) -> np.ndarray:
    """Whether pixels (r, c) are sharper than light in at least one direction.

    Across rows and along the columns the *excess* over the running median is tested as
    well as the light: an emission line's excess has the fiber profile's shape across rows
    and the line spread's along the columns, while a bright fiber's continuum is gone from
    it (a track through a bright star's fiber is not sharp in the light itself). Along the
    diagonals the *light* is tested.
    """
    vert, horiz, diag = limits
    sharp = _significance(excess, noise, r, c, 1, 0, vert) > nsigma
    sharp |= _significance(light, noise, r, c, 1, 0, vert) > nsigma
    sharp |= _significance(excess, noise, r, c, 0, 1, horiz) > nsigma
    sharp |= _significance(light, noise, r, c, 0, 1, horiz) > nsigma
    sharp |= _significance(light, noise, r, c, 1, 1, diag) > nsigma
    sharp |= _significance(light, noise, r, c, 1, -1, diag) > nsigma
    return sharp


def _neighbourhood(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int], dr: int,
                   dc: int) -> tuple[np.ndarray, np.ndarray]:
    """Unique pixels within +-dr rows and +-dc columns of the given pixels."""
    nrow, ncol = shape
    off_r, off_c = np.meshgrid(np.arange(-dr, dr + 1), np.arange(-dc, dc + 1), indexing="ij")
    rr = np.clip(rows[:, None] + off_r.ravel()[None, :], 0, nrow - 1)
    cc = np.clip(cols[:, None] + off_c.ravel()[None, :], 0, ncol - 1)
    flat = np.unique(rr.ravel() * ncol + cc.ravel())
    return flat // ncol, flat % ncol


def _patch_median(image: np.ndarray, exclude: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                  half: int) -> np.ndarray:
    """Median of each pixel's row window of +-``half`` columns without excluded pixels
    (edges repeat the end pixel; NaN where every pixel of the window is excluded)."""
    return _patch_median_kernel(image, exclude, np.asarray(rows, np.int64),
                                np.asarray(cols, np.int64), int(half))


@njit(cache=True, nogil=True)
def _patch_median_kernel(image, exclude, rows, cols, half):
    ncol = image.shape[1]
    out = np.full(rows.size, np.nan, np.float32)
    buf = np.empty(2 * half + 1, np.float64)
    for i in range(rows.size):
        r, n = rows[i], 0
        for k in range(-half, half + 1):
            c = min(max(cols[i] + k, 0), ncol - 1)
            v = image[r, c]
            if not exclude[r, c] and np.isfinite(v):
                j = n  # insertion sort: a window holds at most 2 * half + 1 values
                while j > 0 and buf[j - 1] > v:
                    buf[j] = buf[j - 1]
                    j -= 1
                buf[j] = v
                n += 1
        if n:
            out[i] = buf[n // 2] if n % 2 else 0.5 * (buf[n // 2 - 1] + buf[n // 2])
    return out


def _noise(light: np.ndarray, model: np.ndarray, floor: np.ndarray, model_error: float,
           r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Expected noise (e-) of pixels (r, c) without their cosmic-ray charge.

    The signal is the running median, or, where the pixel's brightest 4-neighbour is
    brighter (an emission line's peak), the smaller of that neighbour and the pixel.
    """
    nrow, ncol = light.shape
    rm, rp = np.maximum(r - 1, 0), np.minimum(r + 1, nrow - 1)
    cm, cp = np.maximum(c - 1, 0), np.minimum(c + 1, ncol - 1)
    brightest = np.maximum(np.maximum(light[rm, c], light[rp, c]),
                           np.maximum(light[r, cm], light[r, cp]))
    signal = np.maximum(np.maximum(model[r, c], np.minimum(light[r, c], brightest)), 0.0)
    return np.sqrt(floor[r, c] + signal + (model_error * signal) ** 2)


@njit(cache=True, nogil=True)
def _first_pass(light, model, floor, model_error, bad, excess_limit, above_limit):
    """:func:`_noise` of every pixel (float32 frame) and the first candidates: pixels not
    ``bad`` whose excess over ``model`` exceeds ``excess_limit`` times their noise, or
    whose excess over the mean of the pixels above and below exceeds ``above_limit``
    times it (edges repeat the end row or column)."""
    nrow, ncol = light.shape
    noise = np.empty((nrow, ncol), np.float32)
    high = np.zeros((nrow, ncol), np.bool_)
    for r in range(nrow):
        rm, rp = max(r - 1, 0), min(r + 1, nrow - 1)
        for c in range(ncol):
            cm, cp = max(c - 1, 0), min(c + 1, ncol - 1)
            v = light[r, c]
            brightest = max(max(light[rm, c], light[rp, c]), max(light[r, cm], light[r, cp]))
            signal = max(max(model[r, c], min(v, brightest)), 0.0)
            n = np.sqrt(floor[r, c] + signal + (model_error * signal) ** 2)
            noise[r, c] = n
            if bad[r, c]:
                continue
            above = v - 0.5 * (light[rm, c] + light[rp, c])
            if v - model[r, c] > excess_limit * n or above > above_limit * n:
                high[r, c] = True
    return noise, high


def _fiber_method(image: np.ndarray, variance: np.ndarray, bad: np.ndarray, *,
                  sigclip: float = 5.0, sharp_sigma: float = 4.5, sigfrac: float = 0.6,
                  model_error: float = 0.02, niter: int = 8, grow: int = 2,
                  half_width: int = MEDIAN_HALF_WIDTH, patch_half_width: int = 12,
                  profile_sigma: float = MIN_PROFILE_SIGMA,
                  lsf_fwhm: float = MIN_LSF_FWHM) -> np.ndarray:
    """The ``fiber`` detector; see :func:`detect_cosmics` for the parameters."""
    limits = sharpness_limits(profile_sigma, lsf_fwhm)
    shape = image.shape
    img = np.where(bad, np.float32(0.0), np.asarray(image, np.float32))  # float32, one copy
    if bad.any():  # bad pixels take the median of the good ones around them in their row
        br, bc = np.nonzero(bad)
        fill = _patch_median(img, bad, br, bc, patch_half_width)
        img[br, bc] = np.where(np.isfinite(fill), fill, 0.0)
    # read-noise part of the variance; the signal part comes from the model, so that a
    # cosmic ray does not inflate its own noise
    floor = np.asarray(variance, np.float32) - np.maximum(img, 0.0)
    sub = (slice(None, None, 4), slice(None, None, 4))  # 1 pixel in 16 is plenty here
    good_sub = ~bad[sub]
    if good_sub.any():
        rn2 = float(np.median(floor[sub][good_sub]))
    else:
        rn2 = float(np.median(floor[~bad])) if (~bad).any() else 1.0
    floor[bad | (floor <= 0)] = np.float32(max(rn2, 1e-2))
    model = dispersion_median(img, half_width)
    excess = img - model
    light = img.copy()  # the image with found cosmic rays replaced by the model
    # noise of a pixel minus the running median, and minus the mean of the pixels above and
    # below, in units of the pixel's noise (a median of n values has ~pi/2/n of the variance)
    scale_excess = np.sqrt(1 + np.pi / 2 / (2 * half_width + 1))
    scale_above = np.sqrt(1.5)

    def candidates(r, c):
        rm, rp = np.maximum(r - 1, 0), np.minimum(r + 1, shape[0] - 1)
        above = light[r, c] - 0.5 * (light[rm, c] + light[rp, c])
        # a track lying along a row is part of its own running median: the rows above and
        # below still show it
        high = (excess[r, c] > sigclip * scale_excess * noise[r, c])
        high |= above > sigclip * scale_above * noise[r, c]
        keep = high & ~bad[r, c] & ~cr[r, c]
        return r[keep], c[keep]

    cr = np.zeros(shape, bool)
    noise, high = _first_pass(light, model, floor, np.float32(model_error), bad,
                              sigclip * scale_excess, sigclip * scale_above)
    r, c = np.nonzero(high)
    found_r, found_c = np.zeros(0, np.int64), np.zeros(0, np.int64)  # the pixels of cr
    for it in range(niter + grow):
        growing = it >= niter
        if growing:  # the faint ends of tracks: merely high neighbours, looser sharpness
            r, c = _neighbourhood(found_r, found_c, shape, 1, 1)
            keep = ~cr[r, c] & ~bad[r, c] & (excess[r, c] > sigfrac * sigclip * noise[r, c])
            r, c = r[keep], c[keep]
        nsig = sharp_sigma * (sigfrac if growing else 1.0)
        hit = _too_sharp(excess, light, noise, r, c, limits, nsig)
        log.debug("fiber cosmics: pass %d, %d candidates, %d new", it + 1, r.size, hit.sum())
        if not hit.any():
            if growing or it == 0:
                break
            continue
        hr, hc = r[hit], c[hit]
        cr[hr, hc] = True
        found_r, found_c = np.concatenate([found_r, hr]), np.concatenate([found_c, hc])
        # found pixels leave the running median (in a wider window, to see past a track
        # lying along a row) and no longer shield their neighbours. Only the windows of
        # the new ones change: the rest of the frame keeps its model, light and noise, and
        # its pixels' tests their outcome
        pr, pc = _neighbourhood(hr, hc, shape, 0, patch_half_width)
        med = _patch_median(img, cr, pr, pc, patch_half_width)
        ok = np.isfinite(med)
        model[pr[ok], pc[ok]] = med[ok]
        found = cr[pr, pc]
        excess[pr, pc] = np.where(found, 0.0, img[pr, pc] - model[pr, pc])
        light[pr, pc] = np.where(found, model[pr, pc], img[pr, pc])
        nr, nc = _neighbourhood(pr, pc, shape, 1, 0)
        noise[nr, nc] = _noise(light, model, floor, model_error, nr, nc)
        if not growing:
            r, c = candidates(*_neighbourhood(pr, pc, shape, 1, 1))
    return cr


def _lacosmic_method(image: np.ndarray, variance: np.ndarray, bad: np.ndarray, *,
                     sigclip: float = 5.0, sigfrac: float = 0.3, objlim: float = 5.0,
                     niter: int = 4, background: bool = True,
                     half_width: int = MEDIAN_HALF_WIDTH) -> np.ndarray:
    """The ``lacosmic`` detector; see :func:`detect_cosmics` for the parameters."""
    import astroscrappy

    img = np.where(bad, 0.0, image).astype(np.float32)
    var = np.where(bad, np.median(variance[~bad]), variance).astype(np.float32)
    readnoise = float(np.sqrt(max(np.median(var - np.maximum(img, 0.0)), 1e-2)))
    inbkg = dispersion_median(img, half_width) if background else None
    mask, _ = astroscrappy.detect_cosmics(
        img, inmask=bad, inbkg=inbkg, invar=var, sigclip=sigclip, sigfrac=sigfrac,
        objlim=objlim, gain=1.0, readnoise=readnoise, satlevel=np.inf, niter=niter,
        sepmed=True, cleantype="meanmask", fsmode="median")
    return np.asarray(mask, bool) & ~bad


def detect_cosmics(image: np.ndarray, variance: np.ndarray, mask: np.ndarray | None = None,
                   method: str = "fiber", **kw) -> np.ndarray:
    """Find the pixels of a channel frame hit by cosmic rays.

    Parameters
    ----------
    image : ndarray (nrow, ncol)
        Stitched channel frame (e-), rows = spatial, columns = dispersion; bias-subtracted
        or at least overscan-subtracted (a hot column left in is not a cosmic ray, but mask
        it as ``BAD_COLUMN`` to be sure).
    variance : ndarray (nrow, ncol)
        Its variance (e-^2), read noise squared plus the Poisson term, as
        :func:`panacea.ccd.read_channel` gives it.
    mask : ndarray (nrow, ncol), optional
        Bad pixels (any non-zero value, e.g. :class:`panacea.ccd.Mask` bits): never
        flagged and left out of the models.
    method : {'fiber', 'lacosmic'}
        ``fiber`` (default): the fiber-aware sharpness test described in the module
        docstring. ``lacosmic``: L.A.Cosmic (astroscrappy) on the image minus a running
        median along the dispersion.
    **kw
        Parameters of the method.

        ``fiber``: ``sigclip`` (5.0, threshold of the excess over the running median in
        units of the expected noise), ``cfac`` (1.5, noise allowance of the sharpness test,
        in sigma), ``sigfrac`` (0.6, growth threshold as a fraction of ``sigclip``),
        ``model_error`` (0.02, fractional error of the running-median model, e.g. from the
        pixel flat), ``niter`` (3), ``grow`` (2, growth passes), ``half_width`` (4 columns),
        ``profile_sigma`` (1.0 px, narrowest fiber profile), ``lsf_fwhm`` (3.8 px, narrowest
        line spread).

        ``lacosmic``: ``sigclip`` (5.0), ``sigfrac`` (0.3), ``objlim`` (5.0), ``niter`` (4),
        ``background`` (True: pass the running median as astroscrappy's ``inbkg``),
        ``half_width`` (4).

    Returns
    -------
    ndarray of bool (nrow, ncol)
        True where a cosmic ray hit (OR it into a :class:`panacea.ccd.Mask` as ``COSMIC``).

    Raises
    ------
    ValueError
        Unknown method or parameter, or arrays of different shapes.
    """
    image = np.asarray(image, dtype=np.float32)
    variance = np.asarray(variance, dtype=np.float32)
    if image.ndim != 2 or image.shape != variance.shape:
        raise ValueError(f"image {image.shape} and variance {variance.shape} must be the "
                         "same 2-D shape")
    bad = np.zeros(image.shape, bool) if mask is None else np.asarray(mask) != 0
    if bad.shape != image.shape:
        raise ValueError(f"mask shape {bad.shape} does not match the image {image.shape}")
    bad = bad | ~np.isfinite(image) | ~np.isfinite(variance)
    if method == "fiber":
        func = _fiber_method
    elif method == "lacosmic":
        func = _lacosmic_method
    else:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    try:
        crmask = func(image, variance, bad, **kw)
    except TypeError as exc:
        raise ValueError(f"bad parameter for method {method!r}: {exc}") from exc
    log.info("%s cosmics: %d pixels (%.3f %%) flagged", method, int(crmask.sum()),
             100.0 * crmask.mean())
    return crmask
