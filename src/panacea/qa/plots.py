"""Quality-assessment plots (PNG). Needs matplotlib (the ``plot`` extra)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np

from .metrics import nanmedian


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
    fig, ax = plt.subplots(figsize=(12, 4.2), gridspec_kw=_MARGINS_WIDE)
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
    return _save(fig, path)


# --------------------------------------------------------------------------- night report
# Small figures (dpi 72) drawn from the arrays panacea.qa.metrics reads: each costs
# ~0.05-0.1 s, so the whole report stays a few per cent of the night's reduction.

_DPI = 72
#: Fixed margins (fractions of the figure): tight_layout costs ~0.2 s a figure.
_MARGINS = {"left": 0.09, "right": 0.97, "bottom": 0.15, "top": 0.85}
_MARGINS2 = {**_MARGINS, "left": 0.07, "wspace": 0.22}
_MARGINS_WIDE = {"left": 0.06, "right": 0.99, "bottom": 0.12, "top": 0.92}
_AMP_COLORS = ("tab:blue", "tab:orange")


def _no_ticks():
    from matplotlib.ticker import NullLocator

    return NullLocator()


def _log_y(ax) -> None:
    """A log y axis with plain-text decade labels ("1e-04"): the default mathtext labels
    cost ~0.07 s a figure to parse, the minor ticks ~0.1 s to lay out."""
    from matplotlib.ticker import LogFormatter

    ax.set_yscale("log")
    ax.yaxis.set_minor_locator(_no_ticks())
    ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=True))


def _title(ax, text: str, **kw) -> None:
    """The title of ``ax`` at a fixed height above it: matplotlib otherwise measures every
    artist of the axes at each drawing to lift the title over top-side tick labels, which
    these axes do not have (~8 ms a figure)."""
    ax.set_title(text, y=1.0, **kw)


def _save(fig, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` atomically (a ``.{name}.part`` file renamed) and close it."""
    fig.set_dpi(_DPI)
    fig.canvas.draw()
    path = _write_png(fig.canvas, path)
    _pyplot().close(fig)
    return path


def _write_png(canvas, path: str | Path) -> Path:
    """The drawn ``canvas`` as an RGB PNG (the figures are opaque: an alpha channel would
    only cost ~4 ms more a figure to compress), written to a ``.{name}.part`` file and
    renamed to ``path``."""
    from PIL import Image

    path = Path(path)
    tmp = path.with_name(f".{path.name}.part")
    rgba = np.asarray(canvas.buffer_rgba())
    Image.fromarray(np.ascontiguousarray(rgba[..., :3])).save(
        tmp, format="png", compress_level=1, dpi=(_DPI, _DPI))
    tmp.replace(path)
    return path


#: Figures kept in this process for the plots drawn once per exposure, by kind.
_FIGURES: dict[str, dict] = {}


def _reused(kind: str, build) -> dict:
    """The figure of ``kind`` and its artists (a dict made by ``build()`` the first time in
    this process), to be filled with an exposure's data and written by :func:`_save_blit`.

    ``build`` makes the figure at the PNG's resolution and lists under ``"changing"``, in
    drawing order, the artists an exposure changes (its lines, image, title, and the y axis
    of a panel whose y range follows the data). Axes, ticks and fixed texts are then drawn
    once per process and channel instead of once per plot: their text layout and glyphs are
    most of the cost of a figure (~45 of ~55 ms).
    """
    parts = _FIGURES.get(kind)
    if parts is None:
        parts = _FIGURES[kind] = build()
        for artist in parts["changing"]:
            artist.set_animated(True)  # left out of the figure's own drawing
    return parts


def _save_blit(f: dict, path: str | Path) -> Path:
    """Write the kept figure ``f`` to ``path`` as :func:`_save` would, drawing only its
    changing artists over the rest of the figure, which is drawn again only when an axis
    range it shows has changed (a new channel's wavelengths); a first drawing takes the same
    path, so the PNG does not depend on what the figure showed before."""
    fig = f["fig"]
    canvas = fig.canvas
    changing = f["changing"]
    key = tuple((ax.get_xlim(), None if ax.yaxis in changing else ax.get_ylim())
                for ax in fig.axes)
    if f.get("key") != key:
        canvas.draw()  # everything but the changing artists
        f["background"], f["key"] = canvas.copy_from_bbox(fig.bbox), key
    else:
        canvas.restore_region(f["background"])
    renderer = canvas.get_renderer()
    for artist in changing:
        if artist.get_visible():
            artist.draw(renderer)
    return _write_png(canvas, path)


def warm_up() -> None:
    """Make the kept figures and draw each once, loading fonts and making tick artists.

    Called by the night runner before its process pool forks, so that each worker starts
    its first QA task with what every later one finds (~0.3 s of CPU a worker)."""
    _ifu_pixels()
    for kind, build in (("sky", _sky_figure), ("collapsed", _collapsed_figure),
                        ("spectrum", _spectrum_figure), ("wave", _wave_figure)):
        _reused(kind, build)["fig"].canvas.draw()


def _rescale(ax) -> None:
    """Limits of ``ax`` from its artists' data again, as for a new figure."""
    ax.set_autoscale_on(True)
    ax.relim(visible_only=True)  # a hidden artist holds an earlier exposure's data
    ax.autoscale_view()


@cache
def _ifu_pixels(step: float = 0.05) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """Fiber index (-1 outside) of every pixel of a ``step``-arcsec raster of the IFU: the
    nearest lenslet within 0.55 pitch, so each fiber is a small tile. Drawing the IFU as
    an image costs a tenth of 280 scatter markers."""
    from .. import instrument

    xy = instrument.fiber_positions()
    x = np.arange(xy[:, 0].min() - 0.4, xy[:, 0].max() + 0.4, step)
    y = np.arange(xy[:, 1].min() - 0.4, xy[:, 1].max() + 0.4, step)
    gx, gy = np.meshgrid(x, y)
    # nearest lenslet, one lenslet at a time (the first of equally near ones, as argmin):
    # the distances to all at once would take ~250 MB
    best = np.full(gx.shape, np.inf)
    index = np.zeros(gx.shape, int)
    for k, (fx, fy) in enumerate(xy):
        d2 = (gx - fx) ** 2 + (gy - fy) ** 2
        nearer = d2 < best
        best[nearer] = d2[nearer]
        index[nearer] = k
    index[best > (0.45 * instrument.LENSLET_PITCH) ** 2] = -1
    extent = (x[0] - step / 2, x[-1] + step / 2, y[0] - step / 2, y[-1] + step / 2)
    return index, extent


def _ifu_image(ax, values: np.ndarray, cmap: str = "viridis", vmin=None, vmax=None):
    """The 280 fiber ``values`` drawn as tiles at their IFU positions."""
    index, extent = _ifu_pixels()
    img = np.where(index >= 0, np.asarray(values, float)[index], np.nan)
    im = ax.imshow(img, origin="lower", extent=extent, cmap=cmap, vmin=vmin, vmax=vmax,
                   interpolation="nearest")
    ax.set_xlabel("IFU x (arcsec)")
    ax.set_ylabel("IFU y (arcsec)")
    return im


def plot_trace_overlay(flat_cut: np.ndarray, trace: np.ndarray, dead: np.ndarray,
                       path: str | Path, title: str = "") -> Path:
    """A corner of the master flat (the first fibers of the first amplifier, the middle
    columns) at full resolution, with the traces drawn on it (dead fibers dashed red).

    Parameters
    ----------
    flat_cut : ndarray (nrow, ncol)
        Rows 0..nrow-1 of the master flat (electrons).
    trace : ndarray (280, ncol)
        Row of each fiber at each column (px).
    dead : ndarray of bool (280,)
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 3.6), gridspec_kw=_MARGINS)
    ncol = flat_cut.shape[1]
    c0, c1 = ncol // 2 - 150, ncol // 2 + 150
    first = np.nanmin(trace[:, c0:c1]) if np.isfinite(trace[:, c0:c1]).any() else 0.0
    r0 = max(int(first) - 10, 0)
    r1 = min(r0 + 120, flat_cut.shape[0])
    img = flat_cut[r0:r1, c0:c1]
    lo, hi = np.nanpercentile(img, [1, 99.5])
    ax.imshow(img, origin="lower", aspect="auto", cmap="gray", vmin=lo, vmax=hi,
              extent=(c0 - 0.5, c1 - 0.5, r0 - 0.5, r1 - 0.5), interpolation="nearest")
    cols = np.arange(c0, c1, 4)
    for k in range(trace.shape[0]):
        t = trace[k, cols]
        if np.nanmin(t) > r1 + 10:
            break
        ax.plot(cols, t, lw=0.7, color="tab:red" if dead[k] else "tab:cyan",
                ls="--" if dead[k] else "-")
    ax.set_xlim(c0 - 0.5, c1 - 0.5)
    ax.set_ylim(r0 - 0.5, r1 - 0.5)
    ax.set_xlabel("column")
    ax.set_ylabel("row")
    _title(ax, title, fontsize=9)
    return _save(fig, path)


def plot_wave_residuals(column: np.ndarray, resid: np.ndarray, lines: np.ndarray,
                        path: str | Path, title: str = "") -> Path:
    """Arc-line residuals (Angstrom) against column and against fiber.

    Parameters
    ----------
    column, resid : ndarray (nline, nfiber)
        From :func:`panacea.qa.metrics.arc_residuals`.
    lines : ndarray (nline,)
        Line wavelengths (Angstrom).
    """
    f = _reused("wave", _wave_figure)
    a, b, pool = f["a"], f["b"], f["points"]
    fib = np.arange(resid.shape[1])
    colours = _pyplot().get_cmap("viridis")(np.linspace(0, 1, max(len(lines), 1)))
    while len(pool) < len(lines):  # markers as lines, one colour per arc line (a scatter
        # with a colour per point costs ten times as much to draw)
        pool.append([ax.plot([], [], ".", ms=1.5, alpha=0.6)[0] for ax in (a, b)])
    for i, pair in enumerate(pool):
        for line in pair:
            line.set_visible(i < len(lines))
        if i < len(lines):
            pair[0].set_data(column[i], resid[i])
            pair[1].set_data(fib, resid[i])
            for line in pair:
                line.set_color(colours[i])
    per_line = nanmedian(resid, axis=1)
    f["per line"].set_data(nanmedian(column, axis=1), per_line)
    f["per fiber"].set_data(fib, nanmedian(resid, axis=0))
    _title(a, f"{int(np.isfinite(per_line).sum())} lines (colours), median per line",
           fontsize=9)
    _rescale(a)
    _rescale(b)
    ok = np.isfinite(resid)
    if ok.any():
        v = max(np.nanpercentile(np.abs(resid[ok]), 99), 0.05)
        a.set_ylim(-1.5 * v, 1.5 * v)
    f["fig"].suptitle(title, fontsize=10)
    return _save_kept(f, path)


def _wave_figure() -> dict:
    """The figure of :func:`plot_wave_residuals` without a channel's data (its point
    markers are made as a channel needs them)."""
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4), sharey=True, dpi=_DPI,
                               gridspec_kw=_MARGINS2)
    # above the points of every arc line, however many a channel adds later
    f = {"fig": fig, "a": a, "b": b, "points": [], "changing": []}
    f["per line"], = a.plot([], [], "k.", ms=5, zorder=2.1)
    a.axhline(0, color="0.5", lw=0.5, zorder=2.1)
    a.set_xlabel("column")
    a.set_ylabel("centroid - line (Angstrom)")
    f["per fiber"], = b.plot([], [], "k-", lw=0.8, zorder=2.1)
    b.axhline(0, color="0.5", lw=0.5, zorder=2.1)
    b.set_xlabel("fiber k")
    _title(b, "line: median per fiber", fontsize=9)
    return f


def _save_kept(f: dict, path: str | Path) -> Path:
    """Draw the whole kept figure ``f`` (its axes change from channel to channel) and write
    it to ``path``; the figure, its axes and their tick artists are made once per process."""
    f["fig"].canvas.draw()
    return _write_png(f["fig"].canvas, path)


def plot_ftf_map(level: np.ndarray, dead: np.ndarray, path: str | Path, title: str = ""
                 ) -> Path:
    """Fiber-to-fiber throughput (median over the middle columns) on the IFU; dead fibers
    crossed."""
    from .. import instrument

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.6), gridspec_kw=_MARGINS)
    vals = np.where(dead, np.nan, level)
    sc = _ifu_image(ax, vals, "viridis", *np.nanpercentile(vals, [1, 99]))
    xy = instrument.fiber_positions()
    if dead.any():
        ax.plot(xy[dead, 0], xy[dead, 1], "rx", ms=6)
    fig.colorbar(sc, ax=ax, shrink=0.85, label="relative throughput")
    _title(ax, title, fontsize=9)
    return _save(fig, path)


def plot_sky_residuals(grid: np.ndarray, sub: np.ndarray, sky: np.ndarray, err: np.ndarray,
                       use: np.ndarray, chi: np.ndarray, lines: np.ndarray,
                       path: str | Path, title: str = "") -> Path:
    """Mean sky-subtracted spectrum of the sky fibers with its expected noise, the scaled
    sky for reference, and the histogram of chi = residual / error against N(0, 1)."""
    f = _reused("sky", _sky_figure)
    a = f["a"]
    e = err[use]
    good = e > 0
    n = np.maximum(good.sum(axis=0), 1)
    mean = np.where(good, sub[use], 0.0).sum(axis=0) / n
    noise = np.sqrt((np.where(good, e, 0.0) ** 2).sum(axis=0)) / n
    skym = np.where(good, sky[use], 0.0).sum(axis=0) / n
    f["noise"].set_data(grid, noise)
    f["-noise"].set_data(grid, -noise)
    f["mean"].set_data(grid, mean)
    scale = np.nanmax(np.abs(mean)) / max(np.nanmax(skym), 1e-30)
    f["sky"].set_data(grid, skym * scale)
    f["sky"].set_label(f"sky x {scale:.2g}")
    _rescale(a)
    _title(a, f"{title}\nmean of the sky fibers (black), expected 1 sigma (grey), sky x "
                f"{scale:.2g} (blue)", fontsize=8)
    # every third bin of all (plenty for a histogram at a third of the cost), every line bin
    for sample, step in ((chi[:, ::3], f["all bins"]), (chi[:, lines], f["sky lines"])):
        c = sample[np.isfinite(sample)]
        c = c[np.abs(c) < 6]
        step.set_visible(bool(c.size))
        if c.size:
            step.set_data(np.histogram(c, bins=_CHI_BINS, density=True)[0])
    return _save_blit(f, path)


#: Bins of the chi histograms of :func:`plot_sky_residuals`.
_CHI_BINS = np.linspace(-6, 6, 61)


def _sky_figure() -> dict:
    """The figure of :func:`plot_sky_residuals` without an exposure's data."""
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4), dpi=_DPI,
                               gridspec_kw={"width_ratios": [2.6, 1], **_MARGINS2})
    f = {"fig": fig, "a": a, "b": b}
    f["noise"], = a.plot([], [], color="0.6", lw=0.6, label="+-1 sigma expected")
    f["-noise"], = a.plot([], [], color="0.6", lw=0.6)
    f["mean"], = a.plot([], [], lw=0.5, color="k", label="mean residual of sky fibers")
    f["sky"], = a.plot([], [], lw=0.4, color="tab:blue", alpha=0.6)
    a.set_xlabel("wavelength (Angstrom)")
    zero = np.zeros(_CHI_BINS.size - 1)
    for colour, label in (("k", "all bins"), ("tab:red", "sky lines")):
        f[label] = b.stairs(zero, _CHI_BINS, color=colour, label=label)
    x = np.linspace(-6, 6, 200)
    gauss, = b.plot(x, np.exp(-x**2 / 2) / np.sqrt(2 * np.pi), color="tab:green", lw=0.8,
                    label="N(0,1)")
    _log_y(b)
    b.set_ylim(1e-4, 1)
    b.set_xlabel("chi")
    _title(b, "chi: all (black), sky lines (red), N(0,1) (green)", fontsize=7)
    # the curve over the histograms, as in a figure drawn at once
    f["changing"] = [f["noise"], f["-noise"], f["mean"], f["sky"], a.yaxis, a.title,
                     f["all bins"], f["sky lines"], gauss]
    return f


def plot_collapsed(level: np.ndarray, header, path: str | Path, title: str = "") -> Path:
    """Collapsed IFU image (median of each fiber's sky-subtracted spectrum) with the
    detected source and a circle of the PSF FWHM."""
    f = _reused("collapsed", _collapsed_figure)
    ax = f["ax"]
    lo, hi = np.nanpercentile(level, [2, 99.5])
    index, _ = _ifu_pixels()
    f["image"].set_data(np.where(index >= 0, np.asarray(level, float)[index], np.nan))
    f["image"].set_clim(lo, hi)
    found = "SOURCEX" in header
    f["source"].set_visible(found)
    f["fwhm"].set_visible(found)
    if found:
        x, y = header["SOURCEX"], header["SOURCEY"]
        fwhm = float(header.get("SEEING", 0.0))
        f["source"].set_data([x], [y])
        f["fwhm"].set_center((x, y))
        f["fwhm"].set_radius(fwhm / 2)
        title += f"  source ({x:.2f}, {y:.2f})\", FWHM {fwhm:.2f}\""
    else:
        title += "  no source"
    _rescale(ax)
    _title(ax, f"{title}\nsky-subtracted median per fiber, black {lo:.2g} .. white "
                 f"{hi:.2g}", fontsize=8)
    return _save_blit(f, path)


def _collapsed_figure() -> dict:
    """The figure of :func:`plot_collapsed` without an exposure's data."""
    from .. import instrument

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.6), dpi=_DPI, gridspec_kw=_MARGINS)
    image = _ifu_image(ax, np.zeros(instrument.NFIBERS), "magma", 0.0, 1.0)
    f = {"fig": fig, "ax": ax, "image": image}
    f["source"], = ax.plot([], [], "c+", ms=12, mew=1.5)
    f["fwhm"] = ax.add_patch(plt.Circle((0.0, 0.0), 0.5, fill=False, ec="c", lw=1.2))
    f["changing"] = [image, f["source"], f["fwhm"], ax.title]
    return f


def plot_spectrum(spec: np.ndarray, path: str | Path, unit: str = "", title: str = ""
                  ) -> Path:
    """Extracted spectrum (rows of ``spectrum_*``: wavelength, F, sky, error, sky error,
    response) with its error and sky."""
    f = _reused("spectrum", _spectrum_figure)
    ax = f["ax"]
    ok = spec[3] > 0
    w = spec[0]
    for row, line in ((1, f["source"]), (2, f["sky"]), (3, f["error"])):
        line.set_data(w[ok], spec[row][ok])
    _rescale(ax)
    if ok.any():
        lo, hi = np.nanpercentile(spec[1][ok], [0.5, 99.5])
        ax.set_ylim(min(0.0, lo), 1.3 * hi)
    f["legend"].set_loc(_legend_corner(ax, w[ok], spec[1:4, ok]))
    ax.set_ylabel(unit, fontsize=8)
    _title(ax, title, fontsize=9)
    return _save_blit(f, path)


def _legend_corner(ax, x: np.ndarray, ys: np.ndarray) -> str:
    """"upper right", or "upper left" when fewer of the curves' points are drawn in the top
    fifth of the axes there: matplotlib's "best" placement, for the two corners a legend of
    a spectrum fits in, at a fraction of its cost (~8 ms a figure)."""
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    high = (ys >= y1 - 0.2 * (y1 - y0)) & (ys <= y1)  # drawn there (not clipped above)
    left = np.count_nonzero(high & (x <= x0 + 0.4 * (x1 - x0)))
    right = np.count_nonzero(high & (x >= x1 - 0.4 * (x1 - x0)))
    return "upper left" if left < right else "upper right"


def _spectrum_figure() -> dict:
    """The figure of :func:`plot_spectrum` without an exposure's data."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 3.2), dpi=_DPI, gridspec_kw=_MARGINS)
    f = {"fig": fig, "ax": ax}
    f["source"], = ax.plot([], [], lw=0.5, color="k", label="source")
    f["sky"], = ax.plot([], [], lw=0.4, color="tab:blue", alpha=0.7,
                        label="sky (same aperture)")
    f["error"], = ax.plot([], [], lw=0.5, color="tab:red", label="error")
    ax.set_xlabel("wavelength (Angstrom, air)")
    f["legend"] = ax.legend(fontsize=7, ncol=3, loc="upper right")  # see _legend_corner
    # the legend over the lines, as in a figure drawn at once
    f["changing"] = [f["source"], f["sky"], f["error"], ax.yaxis, ax.title, f["legend"]]
    return f


def plot_response(grid: np.ndarray, curves: dict[str, np.ndarray],
                  standard: np.ndarray | None, path: str | Path, title: str = "") -> Path:
    """Response curves (erg/e-) of a channel (the night's and the bundled default) and the
    calibrated spectrum of the standard star it came from."""
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.2), gridspec_kw=_MARGINS2)
    for label, r in curves.items():
        a.plot(grid, r, lw=0.8, label=label)
    _log_y(a)
    a.set_xlabel("wavelength (Angstrom)")
    a.set_ylabel("response (erg / e-)")
    a.legend(fontsize=7)
    _title(a, title, fontsize=9)
    if standard is not None:
        ok = standard[3] > 0
        b.plot(standard[0][ok], standard[1][ok], lw=0.6, color="k", label="standard")
        b.plot(standard[0][ok], standard[3][ok], lw=0.5, color="tab:red", label="error")
        b.legend(fontsize=7)
        _title(b, "the standard star, calibrated with it", fontsize=9)
    else:
        b.text(0.5, 0.5, "no standard star spectrum", ha="center", transform=b.transAxes)
    b.set_xlabel("wavelength (Angstrom)")
    return _save(fig, path)
