"""Read back the simulator's truth (see the README the simulator writes beside it)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits


@dataclass
class ChannelTruth:
    """True calibration of one channel on one night (arrays in the stitched frame)."""

    wavelength: np.ndarray  # (280, ncol) air Angstrom
    trace: np.ndarray  # (280, ncol) rows
    sigma: np.ndarray  # (280, ncol) profile core sigma (px)
    lsf_fwhm: np.ndarray  # (280, ncol) px
    throughput: np.ndarray  # (280, ncol) fiber-to-fiber at each fiber's pixels
    dead: np.ndarray  # (280,) bool
    bias_adu: np.ndarray  # (2, nrow_amp, ncol) bias structure minus pedestal, raw orientation
    pixel_flat: np.ndarray  # (2*nrow_amp, ncol)
    response: np.ndarray  # (2, 2064): wavelength, erg per electron
    gain: np.ndarray  # (2,)
    rdnoise: np.ndarray  # (2,)

    @property
    def dispersion(self) -> np.ndarray:
        """Angstrom per pixel of every fiber at every column."""
        return np.gradient(self.wavelength, axis=1)


def truth_dir(baseraw: str | Path, date: str) -> Path:
    """Folder of a simulated night's truth."""
    return Path(baseraw) / "truth" / date


def load_channel(baseraw: str | Path, date: str, channel: str) -> ChannelTruth:
    """Load ``channel_<channel>.fits`` of a simulated night."""
    path = truth_dir(baseraw, date) / f"channel_{channel}.fits"
    with fits.open(path) as hdul:
        h = hdul[0].header
        return ChannelTruth(
            wavelength=hdul["WAVELENGTH"].data.astype(float),
            trace=hdul["TRACE"].data.astype(float),
            sigma=hdul["SIGMA"].data.astype(float),
            lsf_fwhm=hdul["LSF_FWHM"].data.astype(float),
            throughput=hdul["THROUGHPUT"].data.astype(float),
            dead=hdul["DEAD"].data.astype(bool),
            bias_adu=hdul["BIAS"].data.astype(float) / 100.0,
            pixel_flat=1 + hdul["PIXELFLAT"].data.astype(float) * 1e-4,
            response=hdul["RESPONSE"].data.astype(float),
            gain=np.array([h["GAIN1"], h["GAIN2"]]),
            rdnoise=np.array([h["RDNOISE1"], h["RDNOISE2"]]),
        )


def load_night(baseraw: str | Path, date: str) -> dict:
    """The night's ``night.json``: configuration, exposures with conditions, guider records."""
    return json.loads((truth_dir(baseraw, date) / "night.json").read_text())


def load_exposure(baseraw: str | Path, date: str, obsid: int, exp: int, channel: str) -> dict:
    """Per-exposure truth arrays (``SKY``, ``SOURCE``, ``COSMIC``) by lower-case name."""
    path = truth_dir(baseraw, date) / f"exp_{obsid:07d}_{exp:02d}_{channel}.fits"
    with fits.open(path) as hdul:
        return {h.name.lower(): np.asarray(h.data) for h in hdul[1:]}
