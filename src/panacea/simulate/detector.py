"""From expected electrons on the stitched channel frame to raw amplifier files.

Adds Poisson noise, cosmic rays, the per-amp bias pedestal with its 2-D structure and row
drift, read noise, hot columns and saturation, then de-orients each amp into raw readout
order with its overscan strip, exactly as the archive stores it (uint16, BZERO 32768).
"""

from __future__ import annotations

import io

import numpy as np
from astropy.io import fits

from .. import instrument as inst
from .optics import ChannelOptics, channel_seed


def bias_structure(optics: ChannelOptics, amp_index: int) -> np.ndarray:
    """Fixed 2-D bias structure of one amp in raw orientation (ADU), data columns only."""
    key = ("bias", amp_index)
    if key not in optics.cache:
        optics.cache[key] = _bias_structure(optics, amp_index)
    return optics.cache[key]


def _bias_structure(optics: ChannelOptics, amp_index: int) -> np.ndarray:
    rng = np.random.default_rng(channel_seed(f"bias-{optics.channel.name}-{amp_index}"))
    ny, nx = optics.nrow_amp, optics.ncol
    cols = np.arange(nx)
    rows = np.arange(ny)
    # amplifier glow/settling near the first columns read, a gentle ramp, a fixed ripple
    col_term = 6.0 * np.exp(-cols / 25.0) + 1.5 * cols / nx
    row_term = 1.0 * np.sin(2 * np.pi * rows / 410.0 + rng.uniform(0, 6.3))
    pattern = 0.4 * np.sin(2 * np.pi * (cols[None, :] / 97.0 + rows[:, None] / 61.0))
    struct = optics.pedestal[amp_index] + col_term[None, :] + row_term[:, None] + pattern
    for amp, col in optics.bad_columns:
        if amp == amp_index:
            struct[:, col] += 40.0
    return struct


def cosmic_rays(rng: np.random.Generator, shape: tuple, exptime: float) -> np.ndarray:
    """Cosmic-ray electrons on a frame: short straight tracks, ~1.5 events/cm^2/min.

    The 15-micron pixels of a 2064 x 2064 channel cover 9.6 cm^2.
    """
    ny, nx = shape
    area_cm2 = ny * nx * (15e-4) ** 2
    n = rng.poisson(1.5 * area_cm2 * max(exptime, 0.0) / 60.0)
    out = np.zeros(shape, np.float32)
    for _ in range(n):
        length = rng.exponential(3.0) + 1
        angle = rng.uniform(0, np.pi)
        y0, x0 = rng.uniform(0, ny), rng.uniform(0, nx)
        npts = int(np.ceil(length * 2)) + 1
        t = np.linspace(0, length, npts)
        yy = np.clip((y0 + t * np.sin(angle)).astype(int), 0, ny - 1)
        xx = np.clip((x0 + t * np.cos(angle)).astype(int), 0, nx - 1)
        energy = rng.lognormal(np.log(1500.0), 0.6)
        out[yy, xx] = np.maximum(out[yy, xx], energy * rng.uniform(0.6, 1.0, npts))
    return out


def amp_raw(
    optics: ChannelOptics,
    amp_index: int,
    electrons: np.ndarray,
    rng: np.random.Generator,
    overscan_cols: int = inst.AMP_OVERSCAN_COLS,
    ampname: str | None = None,
) -> np.ndarray:
    """Raw uint16 amp frame (rows x data+overscan columns) from noisy electrons of that amp.

    ``electrons`` is the amp's part of the oriented stitched frame (already with Poisson noise
    and cosmic rays). ``ampname`` is the header AMPNAME (default: the amp code); ``LR`` and
    ``UL`` read the columns in reverse order.
    """
    amp = optics.channel.amps[amp_index]
    gain = optics.gain[amp_index]
    rn_adu = optics.rdnoise[amp_index] / gain
    data = inst.deorient(electrons, amp, ampname or amp) / gain
    drift = rng.normal(0, 0.8) + np.cumsum(rng.normal(0, 0.03, data.shape[0]))
    raw = np.empty((data.shape[0], data.shape[1] + overscan_cols), np.float32)
    raw[:, : data.shape[1]] = data + bias_structure(optics, amp_index)
    raw[:, data.shape[1] :] = optics.pedestal[amp_index]
    raw += drift[:, None].astype(np.float32)
    raw += rng.standard_normal(raw.shape, dtype=np.float32) * np.float32(rn_adu)
    np.clip(np.round(raw, out=raw), 0, inst.SATURATION_ADU, out=raw)
    return raw.astype(np.uint16)


def expose(
    optics: ChannelOptics,
    expected: np.ndarray,
    rng: np.random.Generator,
    exptime: float,
    with_cosmics: bool = True,
    ampnames: tuple[str, str] | None = None,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Noisy raw frames of both amps from expected electrons on the stitched frame.

    Returns
    -------
    raws : list of two uint16 arrays
        Raw frames in the channel's amp order.
    cosmic : ndarray of bool
        Pixels of the stitched frame hit by a cosmic ray (truth).
    """
    if expected.any():
        counts = rng.poisson(np.clip(expected, 0, None)).astype(np.float32)
    else:
        counts = np.zeros(expected.shape, np.float32)
    cr = cosmic_rays(rng, counts.shape, exptime) if with_cosmics else np.zeros_like(counts)
    counts += cr
    ny = optics.nrow_amp
    names = ampnames or optics.channel.amps
    raws = [amp_raw(optics, i, counts[i * ny : (i + 1) * ny], rng, ampname=names[i])
            for i in range(2)]
    return raws, cr > 0


def fits_bytes(data: np.ndarray, header: fits.Header) -> bytes:
    """A raw FITS file (primary HDU, uint16 stored with BZERO 32768) as bytes."""
    hdu = fits.PrimaryHDU(data=data, header=header)
    buf = io.BytesIO()
    hdu.writeto(buf)
    return buf.getvalue()
