"""Nuisances a randomized night draws from its seed: what the pipeline must not assume.

A default night (``NightConfig.randomize = False``) keeps the fixed, documented choices
that the single-night benchmark tables are measured on. A randomized night draws, per seed
and within the documented ranges below, the instrument and sky properties that real LRS2
data vary; the truth written with the night records every draw.

The simulator computes its truth with its own code: nothing here imports a pipeline stage.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from zlib import crc32

import numpy as np


@dataclass(frozen=True)
class Nuisances:
    """Drawn properties of one simulated night (see :func:`draw` for the ranges)."""

    randomized: bool = False

    # ---- wavelength solution, line spread, detector conventions --------------------
    #: non-polynomial ripple of every fiber's solution: amplitude (px, 0.05-0.2) and period
    #: (px, 150-600); a second, weaker ripple (amplitude 0.3-0.6 of the first, period
    #: 150-600 px) beats with it
    ripple_amp: float = 0.0
    ripple_period: float = 1400.0
    ripple2_frac: float = 0.0
    ripple2_period: float = 400.0
    #: low-order change of the night's solution: Legendre coefficients P1..P3 of a column
    #: offset (px, each within +-2) common to all fibers
    lowo_coeffs: tuple = (0.0, 0.0, 0.0)
    #: line-spread FWHM scale (0.9-1.1) and asymmetry: the fraction (0-0.15) of each line's
    #: light in a second Gaussian 0.35 FWHM to the red or blue (sign drawn), 0.8 times as wide
    lsf_scale: float = 1.0
    lsf_asym: float = 0.0
    #: arcs: listed lines missing (0-2 per channel and lamp, never the brightest), unlisted
    #: lines (5-20 per lamp, up to 3 % of the brightest) and blends (1-3 per lamp: a line
    #: 1-2.5 px from a listed one with 5-30 % of its strength)
    arc_missing: int = 0
    arc_unlisted: int = 5
    arc_blends: int = 0
    #: spectral flexure of on-sky exposures against the arcs: per-exposure shift (px, within
    #: +-1) and stretch (px at the channel ends, within +-0.15), drawn by :func:`flexure`
    flexure: bool = False
    #: AMPNAME convention: False writes the amp code, True writes ``LR``/``UL`` for the amps
    #: LL/LU (whose raw columns are then reversed), as some real frames do
    ampname_flip: bool = False
    #: scattered light: a smooth halo (Gaussian, sigma 60-150 px) holding this fraction
    #: (0.2-1.5 %) of the frame's light
    scatter_frac: float = 0.0
    scatter_sigma: float = 100.0

    # ---- point-spread function, sources, standards, atmosphere -----------------------
    #: PSF family of the night's on-sky exposures: "moffat" (beta 3.5 on a default night)
    #: or "gauss" (a Moffat of infinite beta)
    psf_model: str = "moffat"
    #: Moffat wing index at 5000 A (2.5-4.5 when drawn; ignored for "gauss")
    psf_beta: float = 3.5
    #: change of beta per unit of (lambda / 5000 A - 1): a wing index varying with wavelength
    psf_beta_slope: float = 0.0
    #: range of the per-exposure seeing (FWHM at 5000 A, arcsec)
    seeing_range: tuple[float, float] = (1.2, 1.8)
    #: largest ellipticity 1 - b/a of a PSF core, and whether its axis turns (False: along y)
    max_ellipticity: float = 0.08
    free_angle: bool = False
    #: sources drawn anywhere on the IFU down to this distance (arcsec) inside its edge
    #: (0 = the default positions near the centre)
    edge_margin: float = 0.0
    #: the standard carries strong stellar lines (Balmer to H12, Ca H&K, Mg b, Na D,
    #: Paschen, Ca triplet) instead of the default mild Balmer/Paschen set
    stellar_lines: bool = False
    #: tabulation step (A) of the reference file and whether its values are bin means
    #: (False: point samples)
    reference_step: float = 2.0
    reference_binned: bool = False
    #: precipitable water vapour (mm) of the night's telluric absorption (0: no telluric)
    pwv_mm: float = 0.0
    #: O2 band strength relative to the standard atmosphere (0: no telluric)
    o2_scale: float = 0.0
    #: width (A) of the logistic dichroic edges at both ends of every channel (0: none) and
    #: where their half points lie, in A inside the channel's ends
    edge_width: float = 0.0
    edge_inset: float = 0.0

    def as_dict(self) -> dict:
        """Plain dictionary for the truth files."""
        return asdict(self)


def draw(seed: int, date: str, randomize: bool) -> Nuisances:
    """The night's nuisances: the fixed defaults, or draws from ``seed`` and ``date``."""
    if not randomize:
        return Nuisances()
    rng = np.random.default_rng([seed, int(date), 4242])
    fields: dict = {"randomized": True}

    # ---- wavelength solution, line spread, detector conventions --------------------
    fields["ripple_amp"] = float(rng.uniform(0.05, 0.2))
    fields["ripple_period"] = float(rng.uniform(150.0, 600.0))
    fields["ripple2_frac"] = float(rng.uniform(0.3, 0.6))
    fields["ripple2_period"] = float(rng.uniform(150.0, 600.0))
    fields["lowo_coeffs"] = tuple(float(c) for c in rng.uniform(-2.0, 2.0, 3))
    fields["lsf_scale"] = float(rng.uniform(0.9, 1.1))
    fields["lsf_asym"] = float(rng.uniform(0.0, 0.15) * rng.choice([-1.0, 1.0]))
    fields["arc_missing"] = int(rng.integers(0, 3))
    fields["arc_unlisted"] = int(rng.integers(5, 21))
    fields["arc_blends"] = int(rng.integers(1, 4))
    fields["flexure"] = True
    fields["ampname_flip"] = bool(rng.uniform() < 0.5)
    fields["scatter_frac"] = float(rng.uniform(0.002, 0.015))
    fields["scatter_sigma"] = float(rng.uniform(60.0, 150.0))

    # ---- point-spread function, sources, standards, atmosphere -----------------------
    # a separate stream, so that the wavelength draws above may change without moving these
    prng = np.random.default_rng([seed, int(date), 4343])
    gauss = bool(prng.uniform() < 0.3)
    fields["psf_model"] = "gauss" if gauss else "moffat"
    fields["psf_beta"] = float(prng.uniform(2.5, 4.5))
    fields["psf_beta_slope"] = float(prng.uniform(-0.6, 0.6))
    lo = float(prng.uniform(0.8, 2.0))
    fields["seeing_range"] = (lo, float(min(lo + prng.uniform(0.2, 0.8), 2.5)))
    fields["max_ellipticity"] = float(prng.uniform(0.0, 0.15))
    fields["free_angle"] = True
    fields["edge_margin"] = float(prng.choice([0.59, 0.9, 1.18]))
    fields["stellar_lines"] = True
    fields["reference_step"] = float(prng.choice([1.0, 2.0, 5.0, 10.0]))
    fields["reference_binned"] = bool(prng.uniform() < 0.5)
    fields["pwv_mm"] = float(prng.uniform(1.0, 8.0))
    fields["o2_scale"] = float(prng.uniform(0.9, 1.1))
    fields["edge_width"] = float(prng.uniform(6.0, 20.0))
    fields["edge_inset"] = float(prng.uniform(5.0, 25.0))

    del rng
    return Nuisances(**fields)


#: Largest spectral flexure shift (px) and stretch (px at the channel ends) of an exposure.
MAX_FLEXURE_SHIFT = 1.0
MAX_FLEXURE_STRETCH = 0.15


def flexure(nuis: Nuisances, seed: int, date: str, obsid: int, exp: int,
            channel: str) -> tuple[float, float]:
    """Spectral flexure of one on-sky exposure and channel against the night's arcs.

    Returns
    -------
    shift : float
        Column offset (px) of the exposure's lines from where the arcs put them, uniform in
        +-:data:`MAX_FLEXURE_SHIFT`; 0 when ``nuis.flexure`` is off.
    stretch : float
        Additional offset (px) at the red end, minus the same at the blue end (linear in
        the column), uniform in +-:data:`MAX_FLEXURE_STRETCH`.
    """
    if not nuis.flexure:
        return 0.0, 0.0
    rng = np.random.default_rng([seed, int(date), obsid, exp, crc32(channel.encode()), 77])
    return (float(rng.uniform(-MAX_FLEXURE_SHIFT, MAX_FLEXURE_SHIFT)),
            float(rng.uniform(-MAX_FLEXURE_STRETCH, MAX_FLEXURE_STRETCH)))
