"""The per-channel part of the night report: one channel's metrics and plots, and its
fragment ``NIGHTS/{date}/qa/metrics_{channel}.json``.

The night runner calls :func:`write_channel_qa` at the end of each channel task, in the
worker that reduced the channel (so the channels' plots are drawn in parallel, while the
other channels still reduce). :func:`panacea.qa.report.write_night_report` then reuses the
fragments whose inputs are unchanged and draws only what is night-level (the joined
spectra). A fragment records the size and modification time (ns) of every product it was
made from (bundle, response, ``multi_*`` and ``spectrum_*`` files of the channel), the
package version and a hash of the thresholds; any difference, or a plot missing, makes it
stale and the channel is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .. import __version__, instrument
from ..fluxcal import default_response, read_response
from . import plots
from .metrics import (
    _MULTI,
    ChannelQA,
    ExposureQA,
    Metric,
    channel_metrics,
    exposure_metrics,
    find_products,
    load_thresholds,
    night_dir,
)

log = logging.getLogger(__name__)

#: Bumped when the fragment's layout or the plots it lists change.
FRAGMENT_VERSION = 1


def fragment_path(output_root: str | Path, date: str, channel: str) -> Path:
    """``{output}/NIGHTS/{date}/qa/metrics_{channel}.json``."""
    return night_dir(output_root, date) / "qa" / f"metrics_{channel}.json"


def channel_products(output_root: str | Path, date: str, channel: str
                     ) -> tuple[Path | None, list[Path]]:
    """The calibration bundle (None when absent) and the ``multi_*`` products of one
    channel of a night."""
    bundles, multis = find_products(output_root, date)
    mine = [p for p in multis if (m := _MULTI.search(p.name)) and m.group(4) == channel]
    return bundles.get(channel), mine


def _key() -> str:
    """What a fragment depends on besides the products: version and thresholds."""
    text = json.dumps(load_thresholds(), sort_keys=True, default=str)
    return f"{FRAGMENT_VERSION} {__version__} " + hashlib.sha1(text.encode()).hexdigest()[:12]


def _stamps(bundle: Path | None, multis: list[Path]) -> dict[str, list[int]]:
    """Size and mtime (ns) of every product a channel's QA reads, by path."""
    paths = list(multis) + [p.with_name(p.name.replace("multi_", "spectrum_", 1))
                            for p in multis]
    if bundle is not None:
        paths.append(bundle)
        paths.append(bundle.with_name(bundle.name.replace("cal_", "response_", 1)))
    out = {}
    for p in paths:
        try:
            st = p.stat()
        except OSError:
            continue
        out[str(p)] = [st.st_size, st.st_mtime_ns]
    return out


def _standard_spectrum(exposures: list[tuple[ExposureQA, dict]]) -> np.ndarray | None:
    for qa, arrays in exposures:
        if arrays["spec"] is not None and instrument.match_standard(qa.object) is not None:
            return arrays["spec"]
    return None


def _channel_plots(qa: ChannelQA, arrays: dict, date: str, folder: Path,
                   standard: np.ndarray | None) -> list[Path]:
    ch = qa.channel
    out = [
        plots.plot_trace_overlay(arrays["flat_cut"], arrays["trace"], arrays["dead"],
                                 folder / f"trace_{ch}.png",
                                 f"{date} {ch}: traces on the master flat (first amp)"),
        plots.plot_wave_residuals(arrays["column"], arrays["resid"], arrays["lines"],
                                  folder / f"wave_{ch}.png",
                                  f"{date} {ch}: arc-line residuals"),
        plots.plot_ftf_map(arrays["level"], arrays["dead"], folder / f"ftf_{ch}.png",
                           f"{date} {ch}: fiber-to-fiber"),
    ]
    grid = instrument.get_channel(ch).grid
    curves = {}
    if qa.response is not None:
        try:
            curves["this night"] = read_response(qa.response, grid)
        except (OSError, ValueError) as err:
            log.warning("%s: unreadable response (%s)", qa.response, err)
    bundled = default_response(ch, grid)
    if bundled is not None:
        curves["bundled default"] = bundled
    if curves:
        out.append(plots.plot_response(grid, curves, standard, folder / f"response_{ch}.png",
                                       f"{date} {ch}: response"))
    return out


def _exposure_plots(qa: ExposureQA, arrays: dict, date: str, folder: Path) -> list[Path]:
    tag = f"{date} obs {qa.obsid} exp{qa.exp:02d} {qa.channel} {qa.object}"
    out = [
        plots.plot_sky_residuals(arrays["grid"], arrays["sub"], arrays["sky"], arrays["err"],
                                 arrays["use"], arrays["chi"], arrays["lines"],
                                 folder / f"sky_{qa.key}.png", f"{tag}: sky residual"),
        plots.plot_collapsed(arrays["collapsed"], arrays["header"],
                             folder / f"ifu_{qa.key}.png",
                             f"obs {qa.obsid} exp{qa.exp:02d} {qa.channel}:"),
    ]
    if arrays["spec"] is not None and "SOURCEX" in arrays["header"]:
        unit = str(arrays["header"].get("BUNIT", ""))
        out.append(plots.plot_spectrum(arrays["spec"], folder / f"spec_{qa.key}.png", unit,
                                       f"{tag}: extracted spectrum"))
    return out


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def _write_fragment(doc: dict, path: Path) -> None:
    """Atomically; NaN kept as NaN (Python's json reads it back)."""
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text(json.dumps(doc, indent=1, default=_json_default))
    tmp.replace(path)


def _load_fragment(path: Path, key: str, stamps: dict, folder: Path) -> dict | None:
    """The fragment at ``path`` when it matches ``key`` and ``stamps`` and its plots all
    exist; else None."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("key") != key or doc.get("inputs") != stamps:
        return None
    names = list(doc.get("channel_figs", []))
    names += [n for e in doc.get("exposures", []) for n in e.get("figs", [])]
    if not all((folder / n).exists() for n in names):
        return None
    return doc


def write_channel_qa(output_root: str | Path, date: str, channel: str,
                     reuse: bool = True) -> dict:
    """Metrics and plots of one channel of a night, and its fragment.

    Parameters
    ----------
    output_root : path
        The product tree (``--output``).
    date : str
        Night, ``YYYYMMDD``.
    channel : str
        ``uv``, ``orange``, ``red`` or ``farred``.
    reuse : bool
        Keep an up-to-date fragment (and its plots) as it is.

    Returns
    -------
    dict
        The fragment: ``channel`` (the :class:`ChannelQA` as a dict, or None without a
        bundle), ``channel_figs`` (PNG names in ``qa/``), ``exposures`` (``qa`` and ``figs``
        per exposure), ``inputs`` and ``key``; ``reused`` tells whether it was kept.
    """
    t0, c0 = time.perf_counter(), time.process_time()
    folder = night_dir(output_root, date) / "qa"
    folder.mkdir(parents=True, exist_ok=True)
    path = fragment_path(output_root, date, channel)
    bundle, multis = channel_products(output_root, date, channel)
    key = _key()
    stamps = _stamps(bundle, multis)
    if reuse and (doc := _load_fragment(path, key, stamps, folder)) is not None:
        doc["reused"] = True
        return doc
    exposures: list[tuple[ExposureQA, dict]] = []
    for p in multis:
        try:
            exposures.append(exposure_metrics(p))
        except (OSError, KeyError, ValueError) as err:
            log.warning("%s: left out of the report (%s)", p, err)
    doc = {"key": key, "date": date, "inputs": stamps, "channel": None, "channel_figs": [],
           "exposures": []}
    if bundle is not None:
        try:
            qa, arrays = channel_metrics(bundle, channel)
        except (OSError, KeyError, ValueError) as err:
            log.warning("%s: left out of the report (%s)", bundle, err)
        else:
            figs = _channel_plots(qa, arrays, date, folder, _standard_spectrum(exposures))
            doc["channel"] = asdict(qa)
            doc["channel_figs"] = [f.name for f in figs]
    for qa, arrays in exposures:
        figs = _exposure_plots(qa, arrays, date, folder)
        doc["exposures"].append({"qa": asdict(qa), "figs": [f.name for f in figs]})
    _write_fragment(doc, path)
    doc["reused"] = False
    nfig = len(doc["channel_figs"]) + sum(len(e["figs"]) for e in doc["exposures"])
    log.info("night %s %s: QA of the channel, %d exposures, %d plots in %.1f s (CPU %.1f s)",
             date, channel, len(doc["exposures"]), nfig, time.perf_counter() - t0,
             time.process_time() - c0)
    return doc


def channel_qa_from(doc: dict) -> ChannelQA | None:
    """The :class:`ChannelQA` of a fragment (None when it has none)."""
    c = doc.get("channel")
    if c is None:
        return None
    return ChannelQA(**{**c, "metrics": [Metric(**m) for m in c["metrics"]]})


def exposures_from(doc: dict) -> list[ExposureQA]:
    """The :class:`ExposureQA` of every exposure of a fragment."""
    return [ExposureQA(**{**e["qa"], "metrics": [Metric(**m) for m in e["qa"]["metrics"]]})
            for e in doc.get("exposures", [])]
