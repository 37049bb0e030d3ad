"""Night metrics from the products on disk, judged against the bundled thresholds.

Everything here reads what a night left in the product tree: the calibration bundles
``CALS/cal_{date}_{channel}.fits``, the responses ``CALS/response_{date}_{channel}.fits``,
and the ``multi_*`` products of every exposure and channel (their header cards and arrays).
Nothing is recomputed by a pipeline stage, so a report can be rebuilt at any time.

Metrics are :class:`Metric` rows: a name, a value with its unit, and a status ``pass``,
``warn``, ``fail`` or ``info`` from the thresholds in ``panacea/data/qa.yaml``
(docs/qa.md says why each value was chosen).
"""

from __future__ import annotations

import csv
import json
import logging
import re
import warnings
from dataclasses import asdict, dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np
from scipy.ndimage import median_filter
import yaml
from astropy.io import fits
from astropy.stats import mad_std

from .. import instrument, medians

log = logging.getLogger(__name__)

#: Status order, worst last.
STATUSES = ("info", "pass", "warn", "fail")
#: Header cards that other stages may add; shown as information when present.
EXTRA_CARDS = ("WSHIFTE", "WSHIFTN", "WSHIFTM", "PSFMODEL", "PSFBETA", "PSFOUT", "TRANSSRC",
               "AREASRC", "DARTRACK", "MILLUM", "ELLIP", "SRCSIG", "ROWOFFS", "NSKYFIB",
               "SATFLAG", "FTFCORR", "SRCEXT")
#: Half-width of a sky-line window and the clearance of continuum bins (grid bins).
LINE_HALF_WIDTH = 4
CONTINUUM_CLEARANCE = 10
#: Half-width (px) of the window searched for an arc line's peak.
ARC_SEARCH = 5
_MULTI = re.compile(r"multi_(\d{8})_(\d{7})_exp(\d{2})_(\w+)\.fits$")


@dataclass
class Metric:
    """One judged number (or label) of a channel or an exposure."""

    name: str
    value: float | str | None
    unit: str = ""
    status: str = "info"
    rule: str = ""  # the threshold that applied, in words


@dataclass
class ExposureQA:
    """Metrics of one exposure and channel, and where its product lives."""

    obsid: int
    exp: int
    channel: str
    object: str
    multi: str  # path of the multi_* file
    spectrum: str | None
    metrics: list[Metric] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.obsid:07d}_exp{self.exp:02d}_{self.channel}"


@dataclass
class ChannelQA:
    """Metrics of one channel's calibration bundle."""

    channel: str
    bundle: str
    response: str | None
    metrics: list[Metric] = field(default_factory=list)


def worst(statuses) -> str:
    """The worst status of ``statuses`` (``info`` when empty)."""
    return max(statuses, key=STATUSES.index, default="info")


@cache
def load_thresholds() -> dict[str, dict]:
    """Thresholds of every metric from ``panacea/data/qa.yaml`` (the ``qa`` mapping)."""
    text = resources.files("panacea.data").joinpath("qa.yaml").read_text()
    return yaml.safe_load(text)["qa"]


def judge(name: str, value, unit: str = "", thresholds: dict | None = None) -> Metric:
    """A :class:`Metric` with the status the thresholds give ``value``.

    Per-amplifier names such as ``read_noise[RU]`` use the entry of ``read_noise``.
    Non-finite or missing values are ``info``.
    """
    table = load_thresholds() if thresholds is None else thresholds
    rule = table.get(name.split("[")[0])
    unit = unit or (rule or {}).get("unit", "")
    if rule is None or value is None:
        return Metric(name, value, unit)
    if "warn_if" in rule:
        bad = any(str(value).lower().startswith(w.lower()) for w in rule["warn_if"])
        return Metric(name, value, unit, "warn" if bad else "pass",
                      "warn when " + " or ".join(rule["warn_if"]))
    if not np.isfinite(value):
        return Metric(name, float(value), unit, "info", "not measured")
    x = float(value)
    shown = x
    if rule.get("abs"):
        x = abs(x)
    if "abs_from" in rule:
        x = abs(x - rule["abs_from"])
    status, words = "pass", []
    prefix = ("|x|" if rule.get("abs") else
              f"|x-{rule['abs_from']}|" if "abs_from" in rule else "x")
    for level in ("warn", "fail"):
        hi, lo = rule.get(f"{level}_above"), rule.get(f"{level}_below")
        if hi is not None:
            words.append(f"{level} {prefix}>{hi:g}")
            status = level if x > hi else status
        if lo is not None:
            words.append(f"{level} {prefix}<{lo:g}")
            status = level if x < lo else status
    return Metric(name, round(shown, 6), unit, status, ", ".join(words))


def nanmedian(a: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    """``np.nanmedian`` that returns NaN for all-NaN slices (dead fibers) without a
    warning (along an axis of a 2-D array by :func:`panacea.medians.nanmedian`, which gives
    the same numbers without numpy's per-row path)."""
    if axis is not None and np.ndim(a) == 2:
        return medians.nanmedian(a, axis=axis)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(a, axis=axis)


def fiber_median(values: np.ndarray, good: np.ndarray, step: int = 4) -> np.ndarray:
    """Median of each fiber's good bins, from every ``step``-th bin (robust levels need no
    more, and the medians are a third of the report's metric time otherwise)."""
    return nanmedian(np.where(good, values, np.nan)[:, ::step], axis=1)


# --------------------------------------------------------------------------- calibration


def arc_residuals(wave: np.ndarray, arcspec: np.ndarray, lines: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Measured minus modelled position of arc lines in every fiber.

    Parameters
    ----------
    wave : ndarray (nfiber, ncol)
        Wavelength solution (Angstrom) of each fiber at each column.
    arcspec : ndarray (nfiber, ncol)
        Extracted master arc (electrons).
    lines : ndarray (nline,)
        Air wavelengths (Angstrom) of the lines the solution used.

    Returns
    -------
    column : ndarray (nline, nfiber)
        Model column (px) of each line in each fiber (NaN outside the detector).
    residual : ndarray (nline, nfiber)
        Centroid of the arc peak converted to wavelength minus the line's wavelength
        (Angstrom); NaN where the peak is absent or weak.
    """
    nfib, ncol = wave.shape
    cols = np.arange(ncol, dtype=float)
    column = np.full((lines.size, nfib), np.nan)
    resid = np.full((lines.size, nfib), np.nan)
    window = np.arange(2 * ARC_SEARCH + 1)
    for f in range(nfib):
        w = wave[f]
        if not (np.all(np.isfinite(w)) and w[-1] > w[0]):
            continue
        c0 = np.interp(lines, w, cols, left=np.nan, right=np.nan)
        column[:, f] = c0
        with np.errstate(invalid="ignore"):
            near = np.isfinite(c0) & (c0 >= ARC_SEARCH + 1) & (c0 <= ncol - 2 - ARC_SEARCH)
        which = np.flatnonzero(near)  # the lines, all at once (windows of 2 SEARCH + 1 px)
        lo = np.round(c0[which]).astype(int) - ARC_SEARCH
        spec = np.asarray(arcspec[f], float)
        seg = spec[lo[:, None] + window]
        peak = lo + np.argmax(seg, axis=1)
        # Gaussian peak from the logarithms of the three highest pixels: no sub-pixel
        # phase bias for a Gaussian line spread, unlike a windowed centroid
        a = spec[peak[:, None] + np.arange(-1, 2)] - seg.min(axis=1)[:, None]
        ok = np.all(a > 0, axis=1) & (a[:, 1] > np.maximum(a[:, 0], a[:, 2]))
        la = np.log(a[ok])
        centroid = peak[ok] + 0.5 * (la[:, 0] - la[:, 2]) / (la[:, 0] - 2 * la[:, 1]
                                                             + la[:, 2])
        resid[which[ok], f] = np.interp(centroid, cols, w) - lines[which[ok]]
    # weak peaks (a line hardly above its neighbourhood) give centroids of noise
    with np.errstate(invalid="ignore"):
        for i in range(lines.size):
            bad = np.abs(resid[i] - nanmedian(resid[i])) > 5 * (mad_std(
                resid[i], ignore_nan=True) + 1e-3)
            resid[i, bad] = np.nan
    return column, resid


def channel_metrics(path: str | Path, channel: str) -> tuple[ChannelQA, dict]:
    """Metrics of a calibration bundle, and the arrays the channel plots need.

    Parameters
    ----------
    path : path
        ``cal_{date}_{channel}.fits``.
    channel : str
        Channel name.
    """
    ch = instrument.get_channel(channel)
    with fits.open(path, memmap=True) as hdul:
        prim = hdul[0].header
        get = {h.name.lower(): h for h in hdul}
        rdnoise = np.asarray(get["rdnoise"].data, float)
        dead = np.asarray(get["dead"].data, bool)
        flat = np.asarray(get["flat"].data, float)
        wave = np.asarray(get["wavelength"].data, float)
        trace = np.asarray(get["trace"].data, float)
        arcspec = np.asarray(get["arcspec"].data, float)
        wavefit = np.asarray(get["wavefit"].data, float).reshape(-1, 4)
        bias = np.asarray(get["masterbias"].data, np.float32)
        mflat = get["masterflat"]
        half = bias.shape[0] // 2
        amp_rows = int(prim.get("PAN AMPROWS", half))
        # only the tiles of the rows shown are decompressed (a sixth of the frame)
        flat_cut = np.asarray(mflat.section[: min(amp_rows, mflat.shape[0]) // 3, :],
                              np.float32)
        meta = {k.replace("PAN ", "", 1): v for k, v in prim.items() if k.startswith("PAN ")}
    m = []
    for amp, rn in zip(ch.amps, rdnoise):
        m.append(judge(f"read_noise[{amp}]", float(rn)))
    levels = [float(nanmedian(bias[i * amp_rows:(i + 1) * amp_rows, ::4]))
              for i in range(2)]
    for amp, lvl in zip(ch.amps, levels):
        m.append(judge(f"bias_level[{amp}]", lvl))
    m.append(judge("bias_step", levels[1] - levels[0]))
    m.append(judge("trace_rms", float(meta.get("TRACERMS", np.nan))))
    m.append(judge("dead_fibers", int(dead.sum())))
    lamps = [lp for lp in str(meta.get("LAMPS", "")).split(",") if lp]
    missing = sorted(set(ch.lamps) - set(lamps))
    m.append(judge("arc_lamps_missing", len(missing)))
    m.append(Metric("arc_lamps", ",".join(lamps) + (f" (missing {','.join(missing)})"
                                                    if missing else "")))
    used = wavefit[:, 2] > 0
    m.append(Metric("arc_lines_used", int(used.sum()), "lines"))
    m.append(judge("arc_line_fraction", float(used.mean()) if used.size else 0.0))
    m.append(judge("wave_rms", float(meta.get("WAVERMS", np.nan))))
    column, resid = arc_residuals(wave, arcspec, wavefit[used, 0])
    live = ~dead
    ok = np.isfinite(resid[:, live])
    rms = float(np.sqrt(np.mean(resid[:, live][ok] ** 2))) if ok.any() else np.nan
    m.append(judge("wave_resid_rms", rms))
    mid = slice(flat.shape[1] // 5, 4 * flat.shape[1] // 5)
    level = nanmedian(flat[:, mid], axis=1)
    good = live & np.isfinite(level)
    m.append(judge("ftf_scatter", float(mad_std(level[good])) if good.any() else np.nan))
    m.append(judge("ftf_low_fibers", int((good & (level < 0.5)).sum())))
    response = Path(path).parent / f"response_{Path(path).stem[4:]}.fits"
    qa = ChannelQA(channel, str(path), str(response) if response.exists() else None, m)
    arrays = {"trace": trace, "dead": dead, "flat_cut": flat_cut, "level": level,
              "column": column, "resid": resid, "lines": wavefit[used, 0]}
    return qa, arrays


# --------------------------------------------------------------------------- exposures


def sky_windows(grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks of grid bins on sky lines and in the clean continuum."""
    idx = np.searchsorted(grid, [s.wavelength for s in instrument.sky_lines()
                                 if grid[0] < s.wavelength < grid[-1]])
    dist = np.full(grid.size, np.inf)
    for i in idx:
        dist = np.minimum(dist, np.abs(np.arange(grid.size) - i))
    return dist <= LINE_HALF_WIDTH, dist > CONTINUUM_CLEARANCE


def sky_fibers(sub: np.ndarray, err: np.ndarray, header, reach: float = 4.0) -> np.ndarray:
    """Fibers that hold only sky: most bins good, farther than ``reach`` FWHM (at least
    ``reach`` - 1 arcsec) from the source, no object excess."""
    good = err > 0
    return _quiet_fibers(_chi(sub, err, good), good) & _far_fibers(header, reach)


def _chi(sub: np.ndarray, err: np.ndarray, good: np.ndarray) -> np.ndarray:
    """Residual over error of every bin (NaN where the error is not positive)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(good, sub / np.where(good, err, 1.0), np.nan)


def _quiet_fibers(chi: np.ndarray, good: np.ndarray) -> np.ndarray:
    """Fibers with most bins good and a median chi within 1 (no object excess)."""
    excess = fiber_median(chi, good)
    return (good.mean(axis=1) > 0.5) & (np.abs(np.nan_to_num(excess, nan=99.0)) < 1.0)


def _far_fibers(header, reach: float) -> np.ndarray:
    """Fibers farther than ``reach`` FWHM (at least ``reach`` - 1 arcsec) from the source
    of ``header`` (every fiber when it has none)."""
    far = np.ones(instrument.NFIBERS, bool)
    if "SOURCEX" in header:
        xy = instrument.fiber_positions()
        dist = max(reach * float(header.get("SEEING", 1.5)), reach - 1.0)
        far = np.hypot(xy[:, 0] - header["SOURCEX"], xy[:, 1] - header["SOURCEY"]) > dist
    return far


def line_residual(sub: np.ndarray, sky: np.ndarray, good: np.ndarray, use: np.ndarray,
                  lines: np.ndarray, cont: np.ndarray, err: np.ndarray | None = None
                  ) -> tuple[float, float]:
    """Sky-line flux left after subtraction, as a fraction of the sky-line flux.

    The continuum under the lines (a running median over the continuum bins of the summed
    sky fibers, interpolated across each line) is taken off both the residual and the sky
    first, so that a star's wings, whose level changes along the channel, or a continuum
    offset do not count as line residual. Returns the fraction and its 1-sigma noise (from
    ``err``); NaN without sky fibers or sky lines.
    """
    if not (use.any() and lines.any() and cont.any()):
        return np.nan, np.nan
    s = _minus_local_continuum(np.nansum(np.where(good, sub, 0.0)[use], axis=0), cont)[lines]
    k = _minus_local_continuum(np.nansum(np.where(good, sky, 0.0)[use], axis=0), cont)[lines]
    total = np.nansum(k)
    if not total > 0:
        return np.nan, np.nan
    noise = np.nan if err is None else float(
        np.sqrt(np.sum(np.where(good, err, 0.0)[use][:, lines] ** 2)) / total)
    return float(np.nansum(s) / total), noise


def _minus_local_continuum(spectrum: np.ndarray, cont: np.ndarray, window: int = 51
                           ) -> np.ndarray:
    """``spectrum`` less its local continuum: a ``window``-bin running median over the
    continuum bins, interpolated across the bins between them."""
    idx = np.flatnonzero(cont)
    level = median_filter(spectrum[idx], size=min(window, idx.size), mode="nearest")
    return spectrum - np.interp(np.arange(spectrum.size), idx, level)


def exposure_metrics(path: str | Path) -> tuple[ExposureQA, dict]:
    """Metrics of one ``multi_*`` product, and the arrays its plots need."""
    path = Path(path)
    m = _MULTI.search(path.name)
    if m is None:
        raise ValueError(f"{path}: not a multi_{{date}}_{{obsid}}_exp{{NN}}_{{channel}}.fits "
                         "name")
    obsid, exp, channel = int(m.group(2)), int(m.group(3)), m.group(4)
    ch = instrument.get_channel(channel)
    grid = ch.grid
    with fits.open(path, memmap=True) as hdul:
        h = hdul[0].header.copy()
        obs = np.asarray(hdul[0].data, float)
        sky = np.asarray(hdul["sky_spectra"].data, float)
        err = np.asarray(hdul["error_spectra"].data, float)
        spec = hdul["extracted_spectrum"].data
        spec = None if spec is None else np.asarray(spec, float)
    # the frame's size from the cosmic-ray mask's header, read as a table's (ZNAXISn): a
    # compressed image's header is rebuilt for each HDU passed on the way (~7 ms)
    with fits.open(path, memmap=True, disable_image_compression=True) as hdul:
        cos = hdul["cosmics"].header
        npix = int(cos.get("ZNAXIS1", cos.get("NAXIS1", 0))) * int(
            cos.get("ZNAXIS2", cos.get("NAXIS2", 0)))
    sub = obs - sky
    good = err > 0
    spectrum = path.with_name(path.name.replace("multi_", "spectrum_", 1))
    qa = ExposureQA(obsid, exp, channel, str(h.get("OBJECT", "")), str(path),
                    str(spectrum) if spectrum.exists() else None)
    out = qa.metrics
    # sky subtraction: chi of sky fibers in the continuum and on sky lines
    chi = _chi(sub, err, good)
    quiet = _quiet_fibers(chi, good)
    use = quiet & _far_fibers(h, 4.0)
    lines, cont = sky_windows(grid)
    chi = chi[use]
    # amplifier balance: the sky is flat over the IFU, so the sky fibers of both amps agree
    level = fiber_median(obs, good)
    half = obs.shape[0] // 2
    # the sky fibers; when a broad PSF leaves fewer than 10 on an amplifier, those beyond
    # 2.5 FWHM (a median level needs fibers on both amplifiers more than pristine sky)
    pick = np.ones_like(use)
    for candidate in (use, quiet & _far_fibers(h, 2.5)):
        if min(candidate[:half].sum(), candidate[half:].sum()) >= 10:
            pick = candidate
            break
    a, b = nanmedian(level[:half][pick[:half]]), nanmedian(level[half:][pick[half:]])
    ratio = float(b / a) if np.isfinite(a) and a != 0 else np.nan
    out.append(judge(f"amp_ratio[{ch.amps[1]}/{ch.amps[0]}]", ratio))
    out.append(judge("sky_chi2", float(h.get("SKYCHI2", np.nan))))
    cchi = chi[:, cont]
    lchi = chi[:, lines]
    out.append(judge("sky_chi_continuum", float(mad_std(cchi, ignore_nan=True))
                     if np.isfinite(cchi).any() else np.nan))
    out.append(judge("sky_chi_lines", float(mad_std(lchi, ignore_nan=True))
                     if np.isfinite(lchi).any() else np.nan))
    frac, noise = line_residual(sub, sky, good, use, lines, cont, err)
    row = judge("sky_resid_lines", frac)
    if row.status in ("warn", "fail") and abs(frac) < 3 * noise:  # faint lines: noise
        row.status, row.rule = "pass", row.rule + f"; within 3 sigma ({noise:.3f}) of 0"
    out.append(row)
    out.append(Metric("sky_fibers_qa", int(use.sum()), "fibers"))
    out.append(judge("cosmic_fraction", h["NCOSMIC"] / npix if "NCOSMIC" in h and npix
                     else np.nan))
    out.append(judge("saturated_fraction", float(h.get("SATFRAC", np.nan))))
    out.append(judge("trace_shift", float(h.get("EXPSHIFT", np.nan))))
    if "WSHIFT" in h:
        out.append(judge("wave_shift", float(h["WSHIFT"])))
    if spec is not None and "SOURCEX" in h:
        ok = spec[3] > 0
        snr = float(np.median(spec[1][ok] / spec[3][ok])) if ok.any() else np.nan
        out.append(judge("source_snr", snr))
        out.append(Metric("source_x", float(h["SOURCEX"]), "arcsec"))
        out.append(Metric("source_y", float(h["SOURCEY"]), "arcsec"))
        out.append(judge("seeing", float(h.get("SEEING", np.nan))))
    else:
        out.append(Metric("source", "none detected"))
    out.append(judge("transparency", float(h.get("THROUGHP", np.nan))))
    out.append(judge("response_used", str(h.get("RESPSRC", "none"))))
    for key in EXTRA_CARDS:
        if key in h:
            value = h[key]
            out.append(Metric(key.lower(), value if isinstance(value, str | bool | int)
                              else round(float(value), 4), ""))
    collapsed = fiber_median(sub, good)  # sky-subtracted light
    arrays = {"grid": grid, "sub": sub, "err": err, "sky": sky, "chi": chi, "use": use,
              "lines": lines, "cont": cont, "spec": spec, "level": level,
              "collapsed": collapsed, "header": h}
    return qa, arrays


# --------------------------------------------------------------------------- the night


def night_dir(output_root: str | Path, date: str) -> Path:
    """``{output}/NIGHTS/{date}``."""
    return Path(output_root) / "NIGHTS" / date


def find_products(output_root: str | Path, date: str) -> tuple[dict[str, Path], list[Path]]:
    """Calibration bundles (channel -> path) and ``multi_*`` products of a night."""
    root = Path(output_root)
    bundles = {}
    for name in ("uv", "orange", "red", "farred"):
        p = root / "CALS" / f"cal_{date}_{name}.fits"
        if p.exists():
            bundles[name] = p
    multis = sorted(p for p in root.glob(f"*/multi_{date}_*.fits")
                    if p.parent.name not in ("CALS", "NIGHTS"))
    return bundles, multis


def night_json(date: str, channels: list[ChannelQA], exposures: list[ExposureQA]) -> dict:
    """The ``metrics.json`` document of a night."""
    every = [x.status for c in channels for x in c.metrics]
    every += [x.status for e in exposures for x in e.metrics]
    return {"date": date, "status": worst(every),
            "channels": [asdict(c) for c in channels],
            "exposures": [asdict(e) for e in exposures]}


def write_json(doc: dict, path: str | Path) -> Path:
    """Write ``doc`` as JSON (NaN as null)."""
    def clean(x):
        if isinstance(x, float) and not np.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        if isinstance(x, np.generic):
            return clean(x.item())
        return x

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(clean(doc), indent=1))
    tmp.replace(path)
    return path


def metrics_table(output_root: str | Path, csv_path: str | Path | None = None
                  ) -> list[dict]:
    """One row per night, scope and metric from every ``NIGHTS/*/metrics.json`` of a
    product tree, for trend plots; written as CSV when ``csv_path`` is given.

    Columns: date, channel, obsid, exp, object, metric, value, unit, status.
    """
    rows = []
    for path in sorted(Path(output_root).glob("NIGHTS/*/metrics.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            log.warning("%s: unreadable (%s); left out of the metrics table", path, err)
            continue
        for c in doc.get("channels", []):
            for x in c["metrics"]:
                rows.append({"date": doc["date"], "channel": c["channel"], "obsid": "",
                             "exp": "", "object": "", "metric": x["name"],
                             "value": x["value"], "unit": x["unit"], "status": x["status"]})
        for e in doc.get("exposures", []):
            for x in e["metrics"]:
                rows.append({"date": doc["date"], "channel": e["channel"],
                             "obsid": e["obsid"], "exp": e["exp"], "object": e["object"],
                             "metric": x["name"], "value": x["value"], "unit": x["unit"],
                             "status": x["status"]})
    if csv_path is not None:
        with open(csv_path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["date", "channel", "obsid", "exp",
                                                    "object", "metric", "value", "unit",
                                                    "status"])
            writer.writeheader()
            writer.writerows(rows)
    return rows
