"""Quality-assessment plots (PNG). Needs matplotlib (the ``plot`` extra)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_frame(image: np.ndarray, path: str | Path, title: str = "",
               zoom: tuple[slice, slice] | None = None) -> Path:
    """The stitched channel frame (and optionally a zoomed region) with a robust stretch."""
    plt = _pyplot()
    ncols = 2 if zoom else 1
    fig, axes = plt.subplots(1, ncols, figsize=(7 * ncols, 6.4), squeeze=False)
    lo, hi = np.nanpercentile(image[::4, ::4], [2, 99.7])
    ax = axes[0, 0]
    ax.imshow(image, origin="lower", vmin=lo, vmax=hi, cmap="gray", interpolation="nearest")
    ax.set_xlabel("column (wavelength increases to the right)")
    ax.set_ylabel("stitched row (fiber k = 0..279 upward)")
    ax.set_title(title)
    if zoom:
        rows, cols = zoom
        ax.add_patch(plt.Rectangle((cols.start, rows.start), cols.stop - cols.start,
                                   rows.stop - rows.start, fill=False, ec="tab:orange"))
        z = axes[0, 1]
        z.imshow(image[zoom], origin="lower", vmin=lo, vmax=hi, cmap="gray",
                 interpolation="nearest",
                 extent=(cols.start - 0.5, cols.stop - 0.5, rows.start - 0.5, rows.stop - 0.5),
                 aspect="auto")
        z.set_title("zoom")
        z.set_xlabel("column")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)


def plot_residual_maps(maps: dict[str, np.ndarray], path: str | Path, unit: str,
                       title: str = "") -> Path:
    """Fiber x column maps of residuals against truth, one panel per entry."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(maps), figsize=(4.2 * len(maps), 3.8), squeeze=False)
    for ax, (name, m) in zip(axes[0], maps.items()):
        v = np.nanpercentile(np.abs(m), 99.5) or 1.0
        im = ax.imshow(m, origin="lower", aspect="auto", cmap="RdBu_r", vmin=-v, vmax=v,
                       interpolation="nearest")
        ax.set_title(f"{name}: rms {np.sqrt(np.nanmean(m**2)):.4f} {unit}", fontsize=9)
        ax.set_xlabel("column")
        ax.set_ylabel("fiber k")
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)


def plot_multi_summary(arrays: dict, grid: np.ndarray, path: str | Path, title: str = ""
                       ) -> Path:
    """IFU image of the sky-subtracted light and the spectra of the brightest fiber."""
    plt = _pyplot()
    sub = arrays["skysub_spectra"]
    err = arrays["error_spectra"]
    xy = arrays["fiber_positions"][:, :2]
    cols = slice(sub.shape[1] // 5, 4 * sub.shape[1] // 5)
    level = np.nanmedian(np.where(err[:, cols] > 0, sub[:, cols], np.nan), axis=1)
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [1, 1.6]})
    sc = a.scatter(xy[:, 0], xy[:, 1], c=level, s=95, marker="h", cmap="viridis")
    a.set_aspect("equal")
    a.set_xlabel("IFU x (arcsec)")
    a.set_ylabel("IFU y (arcsec)")
    a.set_title("sky-subtracted median per fiber")
    fig.colorbar(sc, ax=a, shrink=0.8)
    k = int(np.nanargmax(level))
    b.plot(grid, arrays["observed_spectra"][k], lw=0.6, label=f"fiber {k}: object + sky")
    b.plot(grid, arrays["sky_spectra"][k], lw=0.6, label="sky model")
    b.plot(grid, sub[k], lw=0.6, label="sky-subtracted")
    b.set_xlabel("wavelength (Angstrom)")
    b.legend(fontsize=8)
    b.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)


def plot_joined(joined: dict, path: str | Path, title: str = "", unit: str = "",
                truth: tuple[np.ndarray, np.ndarray] | None = None) -> Path:
    """The joined spectrum of an observation, coloured by channel, with its error (and a
    reference spectrum when given, e.g. the simulator's truth)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(12, 4.2))
    wave, flux, err, chan = joined["wave"], joined["flux"], joined["error"], joined["channel"]
    for k, name in enumerate(("uv", "orange", "red", "farred")):
        sel = (chan == k) & (err > 0)
        if sel.any():
            ax.plot(wave[sel], flux[sel], lw=0.5, label=name)
    ok = err > 0
    ax.plot(wave[ok], err[ok], lw=0.5, color="0.5", label="error")
    if truth is not None:
        ax.plot(*truth, lw=0.8, color="k", ls="--", label="truth")
    good = flux[ok]
    if good.size:
        lo, hi = np.nanpercentile(good, [0.5, 99.5])
        ax.set_ylim(min(0.0, lo), 1.3 * hi)
    ax.set_xlabel("wavelength (Angstrom, air)")
    ax.set_ylabel(unit)
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=6)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)
