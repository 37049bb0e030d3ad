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

    del rng
    return Nuisances(**fields)
