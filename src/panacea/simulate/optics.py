"""True optical model of one LRS2 channel for one simulated night.

Everything here is in the oriented, stitched channel frame (rows = spatial, columns =
dispersion, 2 x 1032 rows by 2064 columns unbinned). The model has an *instrument* part that
is the same every night (seeded by the channel name) and a *night* part (seeded by the date)
that moves traces by a fraction of a pixel and lines by a few pixels.

Wavelength model: a base solution ``lambda0(u)`` (a cubic through the facts sheet's approximate
line columns, displaced by a fixed per-channel offset so that real lines do not sit exactly at
the sheet's columns), and per-fiber column offsets ``delta_k(c)``; fiber ``k`` sees wavelength
``lambda0(c - delta_k(c))`` at column ``c``. ``delta`` has a night zero-point, smooth trends
across fibers and columns and a small non-polynomial ripple.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from zlib import crc32

import numpy as np
from scipy import ndimage
from scipy.special import erf

from .. import instrument as inst
from .nuisance import Nuisances

#: Rows on each side of a trace over which the cross-dispersion profile is rendered.
PROFILE_HALF_ROWS = 9
#: Fraction of a fiber's light in the broad wing of its cross-dispersion profile.
PROFILE_WING_FRACTION = 0.04
#: Width of the wing Gaussian relative to the core.
PROFILE_WING_SCALE = 2.2
#: Fixed offset (px) of each channel's real line positions from the facts sheet's columns.
SHEET_OFFSET = {"uv": -16.0, "orange": 7.0, "red": -9.0, "farred": 11.0}
#: Dead fibers (stitched index k) per channel: the farred RU amp has two.
DEAD_FIBERS = {"uv": (), "orange": (), "red": (), "farred": (52, 117)}
#: Period (px) of the small non-polynomial ripple in the wavelength solutions.
RIPPLE_PERIOD = 1400.0
#: Offset (in FWHM) and relative width of the second Gaussian of an asymmetric line spread.
ASYM_OFFSET = 0.35
ASYM_WIDTH = 0.8
#: RMS of the pixel-to-pixel quantum-efficiency variations.
PIXEL_FLAT_RMS = 0.01
#: First-fiber row and mean fiber pitch (px) of each channel's amps.
TRACE_START = {"uv": 45.6, "orange": 40.0, "red": 33.0, "farred": 47.0}
TRACE_PITCH = {"uv": 6.83, "orange": 6.75, "red": 7.05, "farred": 6.45}


def channel_seed(name: str) -> int:
    """A stable integer seed from a string (Python's hash() is salted per process)."""
    return crc32(name.encode())


def _norm_col(ncol: int) -> np.ndarray:
    """Columns mapped to [-1, 1]."""
    c = np.arange(ncol)
    return (c - (ncol - 1) / 2) / ((ncol - 1) / 2)


@dataclass
class ChannelOptics:
    """True per-fiber geometry, wavelength, line spread, throughput and detector of a channel.

    Arrays have shape (280, ncol) unless stated; rows are stitched-frame rows.
    """

    channel: inst.Channel
    ncol: int
    nrow_amp: int
    base_coeffs: np.ndarray  # polynomial in u (columns) -> wavelength, numpy.polynomial order
    delta: np.ndarray  # column offset of each fiber's solution (px)
    wave: np.ndarray  # wavelength at pixel centres (Angstrom)
    trace: np.ndarray  # trace row at each column
    sigma: np.ndarray  # core Gaussian sigma of the cross-dispersion profile (px)
    lsf_fwhm: np.ndarray  # line-spread FWHM (px)
    fiber_scale: np.ndarray  # (280,) grey fiber throughput, 0 for dead fibers
    fiber_tilt: np.ndarray  # (280, 2) linear and quadratic colour terms of throughput
    dead: np.ndarray  # (280,) bool
    gain: np.ndarray  # (2,) true gain e-/ADU per amp (equals header)
    rdnoise: np.ndarray  # (2,) true read noise e- per amp
    header_rdnoise: np.ndarray  # (2,) read noise written in headers
    pedestal: np.ndarray  # (2,) bias level ADU
    bad_columns: list = field(default_factory=list)  # (amp index, raw column) hot columns
    #: line-spread asymmetry: signed fraction of a line's light in a shifted second Gaussian
    lsf_asym: float = 0.0
    #: scale of the line-spread width of a randomized night (1 by default)
    lsf_scale: float = 1.0
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def pixel_flat(self) -> np.ndarray:
        """Relative quantum efficiency of every pixel of the stitched frame (mean 1)."""
        if "pixflat" not in self.cache:
            rng = np.random.default_rng(channel_seed("pixflat-" + self.channel.name))
            shape = (2 * self.nrow_amp, self.ncol)
            flat = 1 + rng.normal(0, PIXEL_FLAT_RMS, shape).astype(np.float32)
            self.cache["pixflat"] = flat
        return self.cache["pixflat"]

    # ------------------------------------------------------------------ wavelength
    def with_flexure(self, shift: float, stretch: float) -> ChannelOptics:
        """The same optics with every line moved by ``shift + stretch * x`` columns (px),
        ``x`` running from -1 at the first column to +1 at the last (spectral flexure of an
        exposure against the arcs). Shares this object's cache (profiles, pixel flat)."""
        if shift == 0.0 and stretch == 0.0:
            return self
        delta = self.delta + shift + stretch * _norm_col(self.ncol)[None, :]
        wave = self.base_wavelength(np.arange(self.ncol)[None, :] - delta)
        return replace(self, delta=delta, wave=wave, cache=self.cache)

    def base_wavelength(self, u: np.ndarray) -> np.ndarray:
        """Base solution: wavelength (Angstrom) at base column ``u``."""
        return np.polynomial.polynomial.polyval(u, self.base_coeffs)

    def base_column(self, wavelength: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`base_wavelength` (monotonic on the modelled range)."""
        u = np.linspace(-300, self.ncol + 300, 8 * (self.ncol + 600))
        return np.interp(wavelength, self.base_wavelength(u), u)

    def line_columns(self, wavelength: float | np.ndarray) -> np.ndarray:
        """Column where each fiber sees a line of the given wavelength, shape (280, nline)."""
        u = np.atleast_1d(self.base_column(np.asarray(wavelength, float)))
        cols = np.arange(self.ncol)
        c = np.broadcast_to(u, (inst.NFIBERS, u.size)).copy()
        for _ in range(3):  # fixed point of c = u + delta_k(c)
            d = np.stack([np.interp(c[k], cols, self.delta[k]) for k in range(inst.NFIBERS)])
            c = u[None, :] + d
        return c

    def throughput(self, wave: np.ndarray) -> np.ndarray:
        """Fiber-to-fiber throughput of every fiber at wavelengths ``wave`` (280, n) or (n,)."""
        x = (np.asarray(wave) - 0.5 * (self.channel.wave_lo + self.channel.wave_hi)) / (
            0.5 * (self.channel.wave_hi - self.channel.wave_lo)
        )
        a, b = self.fiber_tilt[:, 0:1], self.fiber_tilt[:, 1:2]
        return self.fiber_scale[:, None] * (1 + a * x + b * (x**2 - 1 / 3))

    @property
    def fiber_throughput(self) -> np.ndarray:
        """Throughput of every fiber at its own pixel wavelengths, (280, ncol)."""
        return self.throughput(self.wave)

    # ------------------------------------------------------------------ geometry
    def profile_weights(self, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Pixel-integrated cross-dispersion profile of every fiber.

        Returns
        -------
        first_row : ndarray of int, (280, ncol)
            Stitched row of the first rendered pixel of each fiber and column.
        weights : ndarray of float32, (280, 2*PROFILE_HALF_ROWS+1, ncol)
            Fraction of the fiber's light in each row; sums to 1 over rows.
        """
        trace = self.trace + shift
        first = np.floor(trace).astype(np.int32) - PROFILE_HALF_ROWS
        nrow = 2 * PROFILE_HALF_ROWS + 1
        steps = np.arange(nrow + 1, dtype=np.float32)[None, :, None] - np.float32(0.5)
        frac = (first - trace).astype(np.float32)[:, None, :]
        inv1 = (1.0 / (self.sigma * np.sqrt(2))).astype(np.float32)[:, None, :]
        inv2 = inv1 / np.float32(PROFILE_WING_SCALE)
        z = steps + frac  # pixel edges relative to the trace, float32 for speed
        w = np.float32(PROFILE_WING_FRACTION)
        cdf = (1 - w) * 0.5 * erf(z * inv1) + w * 0.5 * erf(z * inv2)
        weights = np.diff(cdf, axis=1)
        weights /= weights.sum(axis=1, keepdims=True)
        return first, weights

    def render(self, spectra: np.ndarray, shift: float = 0.0, weights=None) -> np.ndarray:
        """Spread per-fiber spectra (electrons per column, (280, ncol)) onto the stitched frame.

        ``weights`` is the output of :meth:`profile_weights` (computed here when not given).
        Light never crosses the boundary between the two amplifiers.
        """
        key = ("profile", round(float(shift), 6))
        if weights is None:
            if key not in self.cache:
                self.cache = {k: v for k, v in self.cache.items()
                              if k[0] != "profile" or k[1] == 0.0}  # keep the unshifted one
                first, w = self.profile_weights(shift)
                self.cache[key] = (w, self._pixel_index(first, w.shape[1]))
            w, flat = self.cache[key]
        else:
            first, w = weights
            flat = self._pixel_index(first, w.shape[1])
        values = (w * spectra[:, None, :].astype(np.float32)).ravel()
        image = np.bincount(flat, weights=values, minlength=2 * self.nrow_amp * self.ncol + 1)
        return image[:-1].reshape(2 * self.nrow_amp, self.ncol)

    def _pixel_index(self, first: np.ndarray, nrow: int) -> np.ndarray:
        """Flat stitched-frame index of every rendered profile pixel.

        Pixels outside their fiber's amplifier go to a dump bin at the end.
        """
        rows = first[:, None, :] + np.arange(nrow)[None, :, None]
        amp2 = (np.arange(inst.NFIBERS) >= inst.FIBERS_PER_AMP)[:, None, None]
        lo = np.where(amp2, self.nrow_amp, 0)
        ok = (rows >= lo) & (rows < lo + self.nrow_amp)
        flat = rows * self.ncol + np.arange(self.ncol)[None, None, :]
        return np.where(ok, flat, 2 * self.nrow_amp * self.ncol).ravel()


def _smooth_fiber_field(rng: np.random.Generator, nfib: int, amplitude: float) -> np.ndarray:
    """A smooth function across fibers: low-order Legendre series with random coefficients."""
    x = np.linspace(-1, 1, nfib)
    coeffs = rng.normal(0, amplitude / 2, 4)
    return np.polynomial.legendre.legval(x, coeffs)


def _night_distortion(nuis: Nuisances, kn: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Column offsets (px, (280, ncol)) a randomized night adds to every fiber's solution:
    two beating ripples whose phase drifts across the fibers and a low-order change."""
    xc = _norm_col(cols.size)
    phase = 0.9 * kn[:, None]
    ripple = nuis.ripple_amp * (
        np.sin(2 * np.pi * cols[None, :] / nuis.ripple_period + phase)
        + nuis.ripple2_frac * np.sin(2 * np.pi * cols[None, :] / nuis.ripple2_period
                                     + 1.7 - phase))
    low = np.polynomial.legendre.legval(xc, (0.0, *nuis.lowo_coeffs))
    return ripple + low[None, :]


def build_optics(channel: inst.Channel, date: str, binning: tuple[int, int] = (1, 1),
                 nuis: Nuisances | None = None):
    """Build the true optical model of ``channel`` on night ``date`` (YYYYMMDD).

    ``nuis`` (a randomized night's draws) adds its distortions and line-spread changes; the
    default night (``None`` or not randomized) is unchanged by it.
    """
    if binning != (1, 1):
        raise ValueError("the simulator writes unbinned frames only")
    rng_inst = np.random.default_rng(channel_seed("instrument-" + channel.name))
    rng_night = np.random.default_rng(channel_seed(f"night-{date}-{channel.name}"))
    ncol, nrow_amp = inst.AMP_DATA_COLS, inst.AMP_ROWS
    nfib = inst.NFIBERS
    k = np.arange(nfib)
    kn = (k - (nfib - 1) / 2) / ((nfib - 1) / 2)
    xc = _norm_col(ncol)
    cols = np.arange(ncol)

    # --- base wavelength solution through the sheet's columns, offset per channel
    sheet = [a for a in inst.arc_lines(channel.name) if a.source == "sheet"]
    c_sheet = np.array([a.column for a in sheet]) + SHEET_OFFSET[channel.name]
    w_sheet = np.array([a.wavelength for a in sheet])
    base = np.polynomial.polynomial.polyfit(c_sheet, w_sheet, 3)

    # --- per-fiber column offsets: night zero-point, smooth trends, ripple, jitter
    night_shift = rng_night.uniform(-3.0, 3.0)
    across = _smooth_fiber_field(rng_inst, nfib, 2.0)  # px, fixed instrument pattern
    slope = _smooth_fiber_field(rng_inst, nfib, 0.8)  # px change from blue to red edge
    curv = _smooth_fiber_field(rng_inst, nfib, 0.6)
    night_tilt = rng_night.normal(0, 0.3)
    ripple_amp = 0.05 + 0.015 * kn
    ripple_phase = 1.3 * kn + rng_inst.uniform(0, 2 * np.pi)
    jitter = rng_inst.normal(0, 0.02, nfib)
    delta = (
        night_shift
        + across[:, None]
        + jitter[:, None]
        + (slope[:, None] + night_tilt) * xc[None, :]
        + curv[:, None] * (xc[None, :] ** 2 - 1 / 3)
        + ripple_amp[:, None]
        * np.sin(2 * np.pi * cols[None, :] / RIPPLE_PERIOD + ripple_phase[:, None])
    )
    lsf_scale, lsf_asym = 1.0, 0.0
    if nuis is not None and nuis.randomized:
        delta = delta + _night_distortion(nuis, kn, cols)
        lsf_scale, lsf_asym = nuis.lsf_scale, nuis.lsf_asym
    wave = np.polynomial.polynomial.polyval(cols[None, :] - delta, base)

    # --- traces: irregular pitch, curvature, tilt, night shift
    pitch = TRACE_PITCH[channel.name] + rng_inst.normal(0, 0.12, (2, inst.FIBERS_PER_AMP))
    pitch[:, 0] = 0.0
    y_local = TRACE_START[channel.name] + np.cumsum(pitch, axis=1)  # (2, 140)
    y_local += rng_inst.uniform(-2.0, 2.0, (2, 1))
    y0 = np.concatenate([y_local[0], nrow_amp + y_local[1]])
    j = np.tile(np.arange(inst.FIBERS_PER_AMP), 2)
    jn = (j - 69.5) / 69.5
    curvature = 3.5 + 1.2 * jn + 0.3 * jn**2  # px sag from centre to the ends of a trace
    tilt = 0.9 + 0.25 * jn
    trace = (
        y0[:, None]
        + curvature[:, None] * (xc[None, :] ** 2)
        + tilt[:, None] * xc[None, :]
        + rng_night.uniform(-0.3, 0.3)
    )

    sigma = 1.20 + 0.10 * xc[None, :] ** 2 + 0.06 * kn[:, None] + 0.03 * xc[None, :] * kn[:, None]
    lsf_fwhm = lsf_scale * inst.LSF_FWHM_PIX * (
        1 + 0.035 * _smooth_fiber_field(rng_inst, nfib, 1.0)[:, None] + 0.04 * xc[None, :] ** 2
    )

    dead = np.zeros(nfib, bool)
    dead[list(DEAD_FIBERS[channel.name])] = True
    fiber_scale = np.clip(rng_inst.normal(1.0, 0.07, nfib), 0.75, 1.25)
    fiber_scale[dead] = 0.0
    fiber_tilt = np.column_stack([rng_inst.normal(0, 0.03, nfib), rng_inst.normal(0, 0.02, nfib)])

    gain = np.round(rng_inst.uniform(0.82, 0.88, 2), 3)
    rdnoise = rng_inst.uniform(2.7, 3.4, 2)
    header_rdnoise = np.round(rdnoise * rng_inst.uniform(0.93, 1.07, 2), 2)
    pedestal = rng_inst.uniform(980, 1110, 2)
    bad_columns = [(int(rng_inst.integers(0, 2)), int(rng_inst.integers(100, ncol - 100)))]

    return ChannelOptics(
        channel=channel,
        ncol=ncol,
        nrow_amp=nrow_amp,
        base_coeffs=base,
        delta=delta,
        wave=wave,
        trace=trace,
        sigma=sigma,
        lsf_fwhm=lsf_fwhm,
        fiber_scale=fiber_scale,
        fiber_tilt=fiber_tilt,
        dead=dead,
        gain=gain,
        rdnoise=rdnoise,
        header_rdnoise=header_rdnoise,
        pedestal=pedestal,
        bad_columns=bad_columns,
        lsf_asym=lsf_asym,
        lsf_scale=lsf_scale,
    )


def scattered_light(image: np.ndarray, fraction: float, sigma: float) -> np.ndarray:
    """A smooth halo holding ``fraction`` of the light of ``image`` (electrons), spread by a
    Gaussian of ``sigma`` px (computed on 8 x 8 blocks and interpolated back)."""
    if fraction <= 0:
        return np.zeros_like(image)
    b = 8
    ny, nx = image.shape
    small = image[: ny // b * b, : nx // b * b].reshape(ny // b, b, nx // b, b).sum(axis=(1, 3))
    halo = ndimage.gaussian_filter(small, sigma / b, mode="constant")
    big = ndimage.zoom(halo, (ny / halo.shape[0], nx / halo.shape[1]), order=1)
    big = np.clip(big, 0, None)
    return big * (fraction * image.sum() / max(big.sum(), 1e-30))


def _gauss_pixel_integral(cols: np.ndarray, centre: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Fraction of a unit Gaussian falling in each pixel ``cols`` (pixel edges at +-0.5)."""
    s = sigma * np.sqrt(2)
    return 0.5 * (erf((cols + 0.5 - centre) / s) - erf((cols - 0.5 - centre) / s))


def lines_to_pixels(
    optics: ChannelOptics, wavelengths: np.ndarray, fluxes: np.ndarray
) -> np.ndarray:
    """Pixel-integrated emission lines seen by every fiber (before fiber throughput).

    Parameters
    ----------
    wavelengths : ndarray (nline,)
        Air wavelengths (Angstrom).
    fluxes : ndarray (nline,) or (280, nline)
        Total electrons of each line in each fiber (before fiber throughput).

    Returns
    -------
    ndarray (280, ncol)
        Electrons per column.
    """
    wavelengths = np.atleast_1d(np.asarray(wavelengths, float))
    fluxes = np.broadcast_to(np.asarray(fluxes, float), (inst.NFIBERS, wavelengths.size))
    out = np.zeros((inst.NFIBERS, optics.ncol))
    if wavelengths.size == 0:
        return out
    centres = optics.line_columns(wavelengths)  # (280, nline)
    half = 14
    offsets = np.arange(-half, half + 1)
    kk = np.arange(inst.NFIBERS)[:, None]
    for i in range(wavelengths.size):
        c = centres[:, i]
        ci = np.round(c).astype(int)
        cols = ci[:, None] + offsets[None, :]
        inside = (cols >= 0) & (cols < optics.ncol)
        if not inside.any():
            continue
        colc = np.clip(cols, 0, optics.ncol - 1)
        fwhm = optics.lsf_fwhm[kk, colc]
        f = abs(optics.lsf_asym)
        if f > 0:  # a second Gaussian off to one side; the light's centroid stays at c
            d = np.sign(optics.lsf_asym) * ASYM_OFFSET * fwhm
            prof = ((1 - f) * _gauss_pixel_integral(cols, c[:, None] - f * d, fwhm / 2.3548)
                    + f * _gauss_pixel_integral(cols, c[:, None] + (1 - f) * d,
                                                ASYM_WIDTH * fwhm / 2.3548))
        else:
            prof = _gauss_pixel_integral(cols, c[:, None], fwhm / 2.3548)
        vals = np.where(inside, prof * fluxes[:, i : i + 1], 0.0)
        np.add.at(out, (np.broadcast_to(kk, cols.shape)[inside], cols[inside]), vals[inside])
    return out


def continuum_to_pixels(
    optics: ChannelOptics, wave_fine: np.ndarray, photons_per_angstrom: np.ndarray
) -> np.ndarray:
    """Integrate a continuum spectrum, convolved with the line spread, over every fiber's pixels.

    The spectrum is resampled onto the base column axis (0.25 px steps), convolved there with
    a Gaussian of the channel's mean line-spread width (per-fiber LSF differences are applied
    to emission lines only) and integrated between each fiber's pixel edges.

    Parameters
    ----------
    wave_fine : ndarray
        Increasing wavelengths (Angstrom) covering the channel with margin.
    photons_per_angstrom : ndarray
        Electrons per Angstrom (before fiber throughput) at ``wave_fine``.

    Returns
    -------
    ndarray (280, ncol)
        Electrons per column.
    """
    step = 0.25
    u = np.arange(-60, optics.ncol + 60, step)
    lam = optics.base_wavelength(u)
    dlam_du = np.gradient(lam, u)
    f_u = np.interp(lam, wave_fine, photons_per_angstrom) * dlam_du  # electrons per unit u
    sig = optics.lsf_scale * inst.LSF_FWHM_PIX / 2.3548 / step
    x = np.arange(-int(5 * sig), int(5 * sig) + 1)
    kernel = np.exp(-0.5 * (x / sig) ** 2)
    kernel /= kernel.sum()
    f_conv = np.convolve(f_u, kernel, mode="same")
    cum = np.concatenate([[0.0], np.cumsum(0.5 * (f_conv[1:] + f_conv[:-1]) * step)])
    edges = np.arange(optics.ncol + 1) - 0.5
    cols = np.arange(optics.ncol)
    out = np.empty((inst.NFIBERS, optics.ncol))
    for k in range(inst.NFIBERS):
        d_edges = np.interp(edges, cols, optics.delta[k])
        c_edges = np.interp(edges - d_edges, u, cum)
        out[k] = np.diff(c_edges)
    return out
