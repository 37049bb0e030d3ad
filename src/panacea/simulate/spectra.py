"""Spectra of the simulated night: sun (twilight), night sky, lamps, standard and science targets,
the channel efficiency that turns F_lambda into electrons, and atmospheric refraction.

Units: F_lambda in erg/s/cm^2/Angstrom (surface brightness per arcsec^2 for the sky), wavelengths
in air Angstrom. The response of a channel (erg per electron) is ``h c / (lambda * eta)`` with
``eta`` the total efficiency (atmosphere at HET's fixed elevation, telescope, spectrograph, CCD).
"""

from __future__ import annotations

import numpy as np

from .. import instrument as inst
from ..fluxcal import C_ANGSTROM, ab_to_flambda  # one AB definition for simulator and pipeline

H_CGS = 6.62607015e-27  # erg s
#: Peak total efficiency of each channel (atmosphere + telescope + instrument + CCD).
PEAK_EFFICIENCY = {"uv": 0.13, "orange": 0.24, "red": 0.22, "farred": 0.11}
#: Fine wavelength grid used for all continua.
FINE_STEP = 0.1


def fine_grid(channel: inst.Channel, margin: float = 150.0) -> np.ndarray:
    """Fine wavelength grid (Angstrom) covering a channel with margin."""
    return np.arange(channel.wave_lo - margin, channel.wave_hi + margin, FINE_STEP)


def flambda_to_ab(flam: np.ndarray, wave: np.ndarray) -> np.ndarray:
    """F_lambda (erg/s/cm^2/Angstrom) to AB magnitude."""
    fnu = flam * wave**2 / C_ANGSTROM
    return -2.5 * np.log10(fnu) - 48.6


def efficiency(channel: inst.Channel, wave: np.ndarray, edges: tuple[float, float] = (0.0, 0.0)
               ) -> np.ndarray:
    """Total efficiency (electrons per photon at the top of the atmosphere) of a channel.

    ``edges`` = (width, inset) in Angstrom adds steep dichroic edges: logistic cut-offs of
    that width whose half points lie ``inset`` inside both ends of the channel (width 0:
    none, the default night).
    """
    lo, hi = channel.wave_lo, channel.wave_hi
    wave = np.asarray(wave)
    u = (wave - lo) / (hi - lo)
    shape = np.exp(-(((u - 0.5) / 0.62) ** 4)) * (1 + 0.08 * np.sin(2 * np.pi * (u + 0.1)))
    extinction = 10 ** (-0.4 * 1.22 * (0.012 + 0.0085 * (wave / 1e4) ** -4))
    out = PEAK_EFFICIENCY[channel.name] * shape * extinction
    width, inset = edges
    if width > 0:
        blue = 0.5 * (1 + np.tanh((wave - (lo + inset)) / (2 * width)))
        red = 0.5 * (1 + np.tanh(((hi - inset) - wave) / (2 * width)))
        out = out * blue * red
    return out


def response(channel: inst.Channel, wave: np.ndarray, edges: tuple[float, float] = (0.0, 0.0)
             ) -> np.ndarray:
    """Channel response (erg per electron): F_lambda = e-/s/Angstrom/cm^2 x response.

    ``edges`` as in :func:`efficiency`.
    """
    return H_CGS * C_ANGSTROM / np.asarray(wave) / efficiency(channel, wave, edges)


def _absorption(wave: np.ndarray, centres, depths, widths) -> np.ndarray:
    """Multiplicative spectrum of Gaussian absorption lines."""
    out = np.ones_like(wave)
    for c, d, w in zip(centres, depths, widths):
        sel = np.abs(wave - c) < 6 * w
        out[sel] *= 1 - d * np.exp(-0.5 * ((wave[sel] - c) / w) ** 2)
    return out


def planck_lambda(wave: np.ndarray, temperature: float) -> np.ndarray:
    """Planck function B_lambda (arbitrary normalisation)."""
    x = 1.438777e8 / (wave * temperature)
    return wave**-5 / np.expm1(x)


#: Strong Fraunhofer and telluric-free solar absorption lines: centre, depth, Gaussian sigma (A).
_SOLAR_LINES = [
    (3820.4, 0.5, 1.5), (3933.66, 0.85, 4.0), (3968.47, 0.85, 4.0), (4045.8, 0.5, 1.0),
    (4101.74, 0.5, 3.0), (4226.7, 0.55, 1.2), (4300.0, 0.35, 6.0), (4340.47, 0.55, 3.0),
    (4383.5, 0.5, 1.0), (4861.33, 0.55, 3.0), (5167.3, 0.5, 1.0), (5172.7, 0.5, 1.0),
    (5183.6, 0.55, 1.0), (5269.5, 0.4, 1.0), (5889.95, 0.7, 0.8), (5895.92, 0.65, 0.8),
    (6562.8, 0.6, 2.5), (8498.0, 0.4, 1.5), (8542.1, 0.55, 2.0), (8662.1, 0.5, 2.0),
]


def solar_photons(wave: np.ndarray, seed: int = 7) -> np.ndarray:
    """Relative solar photon spectrum with Fraunhofer lines and a forest of weak lines."""
    rng = np.random.default_rng(seed)
    cont = planck_lambda(wave, 5778.0) * wave  # photons ~ energy x lambda
    cont /= np.median(cont)
    centres, depths, widths = map(list, zip(*_SOLAR_LINES))
    nweak = int((wave[-1] - wave[0]) / 6)
    centres += list(rng.uniform(wave[0], wave[-1], nweak))
    blue = np.clip((6000 - np.array(centres[len(_SOLAR_LINES):])) / 2500, 0.1, 1.0)
    depths += list(rng.uniform(0.02, 0.25, nweak) * blue)
    widths += list(rng.uniform(0.3, 0.8, nweak))
    return cont * _absorption(wave, centres, depths, widths)


def sky_continuum(wave: np.ndarray) -> np.ndarray:
    """Dark-sky continuum surface brightness (erg/s/cm^2/Angstrom/arcsec^2), about 21.7 AB in V."""
    mag = 21.9 - 0.9 * np.clip((wave - 5500) / 4500, -0.4, 1.0)
    return ab_to_flambda(mag, wave)


def sky_line_flux(strength: np.ndarray) -> np.ndarray:
    """Integrated sky-line surface brightness (erg/s/cm^2/arcsec^2) for a list strength."""
    return 4.0e-17 * np.asarray(strength)


def ldls_photons(wave: np.ndarray) -> np.ndarray:
    """Relative photon spectrum of the internal laser-driven light source (smooth, blue)."""
    return (wave / 5000.0) ** -1.2 * (1 + 0.05 * np.sin(wave / 900.0))


#: Strong lines of a standard star with ``strong_lines``: centre (air A), central depth and
#: Lorentzian half width (A). Balmer H-alpha to H12, Ca II H and K, Mg b, Na D, the Ca
#: triplet and Paschen P9-P20. Written for the simulator; the pipeline keeps its own list.
STRONG_STELLAR_LINES = [
    (6562.8, 0.60, 14.0), (4861.3, 0.62, 13.0), (4340.5, 0.62, 12.0), (4101.7, 0.62, 11.0),
    (3970.1, 0.60, 10.0), (3889.1, 0.58, 8.0), (3835.4, 0.55, 6.5), (3797.9, 0.52, 5.5),
    (3770.6, 0.48, 4.5), (3750.2, 0.44, 4.0),
    (3933.7, 0.55, 1.6), (3968.5, 0.45, 1.6),
    (5167.3, 0.30, 0.9), (5172.7, 0.35, 0.9), (5183.6, 0.38, 0.9),
    (5890.0, 0.45, 0.8), (5895.9, 0.40, 0.8),
    (8498.0, 0.35, 1.4), (8542.1, 0.45, 1.8), (8662.1, 0.42, 1.7),
    (8598.4, 0.25, 4.0), (8665.0, 0.25, 4.0), (8750.5, 0.28, 4.5), (8862.8, 0.30, 5.0),
    (9014.9, 0.32, 5.5), (9229.0, 0.34, 6.0), (9545.9, 0.36, 7.0), (10049.4, 0.38, 8.0),
]


def _lorentzian_absorption(wave: np.ndarray, lines) -> np.ndarray:
    """Multiplicative spectrum of Lorentzian absorption lines (centre, depth, half width)."""
    out = np.ones_like(np.asarray(wave, float))
    for c, d, g in lines:
        out *= 1 - d / (1 + ((wave - c) / g) ** 2)
    return out


def standard_flambda(name: str, wave: np.ndarray, v_mag: float = 11.5,
                     strong_lines: bool = False) -> np.ndarray:
    """A hot-star spectrum (40,000 K with Balmer and Paschen absorption) for a standard.

    ``strong_lines`` replaces the mild default lines with the deep, broad ones of
    :data:`STRONG_STELLAR_LINES` (a white-dwarf or A-type standard).
    """
    f = planck_lambda(wave, 40000.0)
    if strong_lines:
        f = f * _lorentzian_absorption(wave, STRONG_STELLAR_LINES)
    else:
        balmer = [3835.4, 3889.1, 3970.1, 4101.7, 4340.5, 4861.3, 6562.8]
        paschen = [8665.0, 8750.5, 8862.8, 9014.9, 9229.0, 9545.9, 10049.4]
        f = f * _absorption(wave, balmer, [0.3] * 7, [9.0] * 7)
        f = f * _absorption(wave, paschen, [0.15] * 7, [6.0] * 7)
    # normalised analytically at 5500 A (no absorption line there), whatever range ``wave``
    # covers: every channel's spectrum is then the same star
    norm = ab_to_flambda(v_mag, 5500.0) / planck_lambda(np.array(5500.0), 40000.0)
    return f * norm


def science_flambda(wave: np.ndarray, r_mag: float = 17.0, z: float = 0.021) -> np.ndarray:
    """Point-source target: a power-law continuum with emission and absorption lines."""
    f = ab_to_flambda(r_mag, 6200.0) * (wave / 6200.0) ** -1.3
    rest_em = [(3727.4, 6e-16), (4861.3, 5e-16), (5006.8, 9e-16), (6562.8, 1.6e-15),
               (6583.5, 5e-16), (6716.4, 2e-16), (6730.8, 1.6e-16), (9068.6, 1.5e-16)]
    for lam, flux in rest_em:
        c, s = lam * (1 + z), 3.0
        f = f + flux / (np.sqrt(2 * np.pi) * s) * np.exp(-0.5 * ((wave - c) / s) ** 2)
    f = f * _absorption(wave, [5175.0 * (1 + z), 5892.9 * (1 + z)], [0.1, 0.08], [8.0, 5.0])
    return f


#: Emission lines of the extended target: rest wavelength (A), surface brightness at the centre
#: (erg/s/cm^2/arcsec^2).
EXTENDED_LINES = [(3727.4, 6e-16), (4861.3, 4e-16), (4958.9, 3e-16), (5006.8, 9e-16),
                  (6548.1, 1.5e-16), (6562.8, 1.4e-15), (6583.5, 4.5e-16),
                  (6716.4, 2e-16), (6730.8, 1.5e-16), (9068.6, 1e-16), (9530.6, 2.4e-16)]


def air_refractivity(wave: np.ndarray, temperature_c: float, pressure_mbar: float,
                     humidity: float) -> np.ndarray:
    """(n - 1) of moist air, Edlen (1966) dispersion scaled to ambient conditions.

    Parameters are the air temperature (Celsius), pressure (mbar) and relative humidity (%).
    """
    s2 = (1e4 / np.asarray(wave)) ** 2  # inverse micron squared
    n15 = 1e-8 * (8342.13 + 2406030.0 / (130.0 - s2) + 15997.0 / (38.9 - s2))
    p_torr = pressure_mbar * 0.750062
    n = n15 * p_torr * (1 + p_torr * (1.049 - 0.0157 * temperature_c) * 1e-6) / (
        720.883 * (1 + 0.003661 * temperature_c)
    )
    # water vapour: saturation pressure (Torr) from the Magnus formula
    e_sat = 6.1094 * np.exp(17.625 * temperature_c / (temperature_c + 243.04)) * 0.750062
    f_torr = humidity / 100.0 * e_sat
    n -= f_torr * (0.0624 - 0.000680 * s2) / (1 + 0.003661 * temperature_c) * 1e-6
    return n


def refraction_offsets(wave: np.ndarray, ref_wave: float, parangle_deg: float,
                       temperature_c: float, pressure_mbar: float, humidity: float,
                       elevation_deg: float = inst.HET_ELEVATION_DEG) -> tuple:
    """Differential refraction (arcsec) of ``wave`` relative to ``ref_wave`` on the IFU.

    The image moves towards the zenith with decreasing wavelength; on the IFU that direction
    is set by the parallactic angle. Returns (dx, dy) in IFU arcsec.
    """
    z = np.deg2rad(90.0 - elevation_deg)
    n = air_refractivity(np.asarray(wave, float), temperature_c, pressure_mbar, humidity)
    n0 = air_refractivity(np.asarray(ref_wave, float), temperature_c, pressure_mbar, humidity)
    r = 206264.806 * (n - n0) * np.tan(z)
    pa = np.deg2rad(parangle_deg)
    return r * np.sin(pa), r * np.cos(pa)


def tabulate_reference(flam_fn, lo: float, hi: float, step: float, binned: bool
                       ) -> tuple[np.ndarray, np.ndarray]:
    """A reference spectrum tabulated as real ones are: every ``step`` Angstrom from ``lo``,
    either the value at the point or the mean over the ``step``-wide bin around it (from a
    0.05 A sampling of ``flam_fn``)."""
    wave = np.arange(lo, hi, step)
    if not binned:
        return wave, flam_fn(wave)
    n = max(int(round(step / 0.05)), 1)
    sub = (np.arange(n) + 0.5) / n - 0.5
    fine = wave[:, None] + sub[None, :] * step
    return wave, flam_fn(fine.ravel()).reshape(fine.shape).mean(axis=1)


#: Telluric absorption bands: (first, last wavelength in air A, peak optical depth at
#: airmass 1 for the reference column, molecule). H2O depths are for 5 mm of water vapour.
TELLURIC_BANDS = [
    (6864.0, 6935.0, 0.9, "O2"), (7590.0, 7700.0, 2.5, "O2"), (6275.0, 6310.0, 0.15, "O2"),
    (5880.0, 6000.0, 0.04, "H2O"), (6470.0, 6600.0, 0.05, "H2O"), (6940.0, 7050.0, 0.08, "H2O"),
    (7160.0, 7350.0, 0.35, "H2O"), (8120.0, 8340.0, 0.3, "H2O"), (8930.0, 9250.0, 0.45, "H2O"),
    (9300.0, 9700.0, 0.9, "H2O"), (10800.0, 11000.0, 0.3, "H2O"),
]


def telluric_transmission(wave: np.ndarray, pwv_mm: float, o2_scale: float,
                          airmass: float) -> np.ndarray:
    """Telluric transmission exp(-airmass * tau) on ``wave`` (A), tau from a forest of narrow
    lines (sigma 0.3-0.8 A, ~1.2 A apart) under a smooth envelope in every band of
    :data:`TELLURIC_BANDS`; H2O scales with the water column ``pwv_mm``, O2 with
    ``o2_scale``. Both 0 give a transmission of 1."""
    wave = np.asarray(wave, float)
    tau = np.zeros_like(wave)
    rng = np.random.default_rng(20181108)  # the molecular line list: fixed, like physics
    for lo, hi, depth, mol in TELLURIC_BANDS:
        scale = o2_scale if mol == "O2" else pwv_mm / 5.0
        nline = int((hi - lo) / 1.2)
        centres = np.sort(rng.uniform(lo, hi, nline))
        sig = rng.uniform(0.3, 0.8, nline)
        strength = rng.uniform(0.3, 1.0, nline)
        if scale <= 0:
            continue
        sel = (wave > lo - 5) & (wave < hi + 5)
        if not sel.any():
            continue
        w = wave[sel]
        u = (w - lo) / (hi - lo)
        # a band head at the blue end for O2, a rounded envelope for H2O
        env = np.exp(-2.0 * u) if mol == "O2" else np.sin(np.pi * np.clip(u, 0, 1)) ** 0.7
        lines = np.zeros_like(w)
        for c, s_, a in zip(centres, sig, strength):
            near = np.abs(w - c) < 5 * s_
            lines[near] += a * np.exp(-0.5 * ((w[near] - c) / s_) ** 2)
        tau[sel] += depth * scale * env * lines * 2.0
    return np.exp(-airmass * tau)
