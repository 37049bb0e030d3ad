"""Test helper: a true F_lambda seen through the simulator's line spread, binned on the grid."""

from __future__ import annotations

import numpy as np

from panacea import instrument as inst


def binned_through_lsf(ch: inst.Channel, wf: np.ndarray, f: np.ndarray) -> np.ndarray:
    """``f`` (on the fine, even grid ``wf``) through a Gaussian line spread of 4.3 px FWHM
    and a one-pixel box (px = the channel's local dispersion), averaged over the channel
    grid's bins."""
    step_f = wf[1] - wf[0]
    disp = np.interp(wf, [ch.wave_lo, ch.wave_hi], [ch.disp_lo, ch.disp_hi])
    sig = np.sqrt((inst.LSF_FWHM_PIX / 2.3548 * disp) ** 2 + disp**2 / 12)
    half = int(6 * sig.max() / step_f)
    pad = np.pad(f, half, mode="edge")
    offsets = np.arange(-half, half + 1)
    conv = np.empty_like(f)
    for i0 in range(0, wf.size, 4000):
        rows = np.arange(i0, min(i0 + 4000, wf.size))
        kern = np.exp(-0.5 * (offsets[None] * step_f / sig[rows, None]) ** 2)
        kern /= kern.sum(axis=1, keepdims=True)
        conv[rows] = (pad[rows[:, None] + half + offsets[None]] * kern).sum(axis=1)
    grid = ch.grid
    step = grid[1] - grid[0]
    cum = np.r_[0.0, np.cumsum(conv) * step_f]
    return np.diff(np.interp(np.r_[grid - step / 2, grid[-1] + step / 2],
                             np.r_[wf - step_f / 2, wf[-1] + step_f / 2], cum)) / step
