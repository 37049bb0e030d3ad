"""Nuisances a randomized night draws from its seed: what the pipeline must not assume.

A default night (``NightConfig.randomize = False``) keeps the fixed, documented choices
that the single-night benchmark tables are measured on. A randomized night draws, per seed
and within the documented ranges below, the instrument and sky properties that real LRS2
data vary; the truth written with the night records every draw.

The simulator computes its truth with its own code: nothing here imports a pipeline stage.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Nuisances:
    """Drawn properties of one simulated night (see :func:`draw` for the ranges)."""

    randomized: bool = False

    # ---- wavelength solution, line spread, detector conventions --------------------

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
