"""The night report: metrics, plots and static HTML pages built from a night's products.

:func:`write_night_report` writes, under ``{output}/NIGHTS/{date}/``: ``metrics.json``,
``qa/*.png``, ``report.html`` (calibrations per channel and every exposure) and one page
``obs_{obsid7}.html`` per observation; then ``{output}/NIGHTS/index.html`` over all nights.
The per-channel metrics and plots come from :mod:`panacea.qa.channel_report` (drawn by the
channel tasks, reused here when up to date); only the joined spectra are drawn here.
The pages are plain HTML with an inline style sheet: no scripts, web fonts or remote files,
so they open offline from a laptop or a web server alike.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import logging
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from astropy.io import fits

from .. import __version__
from . import plots
from .channel_report import channel_qa_from, exposures_from, write_channel_qa
from .metrics import (
    _MULTI,
    ChannelQA,
    ExposureQA,
    Metric,
    find_products,
    night_dir,
    night_json,
    worst,
    write_json,
)

log = logging.getLogger(__name__)

_STYLE = """
body{font-family:sans-serif;margin:1.2em;max-width:1200px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;margin-top:1.6em}
h3{font-size:1em}
table{border-collapse:collapse;margin:.4em 0 1em 0;font-size:.85em}
td,th{border:1px solid #bbb;padding:2px 8px;text-align:left}
th{background:#eee}
td.pass{background:#b9e4b4}td.warn{background:#ffd966}td.fail{background:#f4a3a3}
td.info{background:#f3f3f3}
span.pass,span.warn,span.fail,span.info{padding:1px 8px;border-radius:3px}
span.pass{background:#b9e4b4}span.warn{background:#ffd966}span.fail{background:#f4a3a3}
span.info{background:#e6e6e6}
img{max-width:100%;border:1px solid #ddd;margin:4px 0}
.figs{display:flex;flex-wrap:wrap;gap:8px}.figs a{flex:1 1 480px}
.small{color:#666;font-size:.8em}
"""


def _page(title: str, body: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
            f"<body>{body}</body></html>\n")


def _badge(status: str) -> str:
    return f'<span class="{status}">{status}</span>'


def _value(v) -> str:
    if isinstance(v, float):
        if not np.isfinite(v):
            return "n/a"
        return f"{v:.4g}"
    return html.escape(str(v))


def metric_table(metrics: list[Metric]) -> str:
    """An HTML table of metrics, each row coloured by its status."""
    rows = "".join(
        f'<tr class="metric"><td>{html.escape(m.name)}</td><td>{_value(m.value)}</td>'
        f"<td>{html.escape(m.unit)}</td><td class=\"{m.status}\">{m.status}</td>"
        f'<td class="small">{html.escape(m.rule)}</td></tr>' for m in metrics)
    return ('<table class="metrics"><tr><th>metric</th><th>value</th><th>unit</th>'
            f"<th>status</th><th>threshold</th></tr>{rows}</table>")


def _figs(paths: list[Path], base: Path) -> str:
    items = "".join(f'<a href="{p.relative_to(base).as_posix()}"><img src="'
                    f'{p.relative_to(base).as_posix()}" alt="{html.escape(p.stem)}"></a>'
                    for p in paths if p is not None)
    return f'<div class="figs">{items}</div>'


def _rel(path: str | Path | None, base: Path) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).resolve().relative_to(base.resolve().parent.parent).as_posix()
    except ValueError:
        return Path(path).as_posix()


def _link(path: str | Path | None, base: Path) -> str:
    """Relative link from a night folder ``NIGHTS/{date}`` to a product."""
    if path is None:
        return ""
    rel = _rel(path, base)
    return f'<a href="../../{rel}">{html.escape(Path(path).name)}</a>'


# --------------------------------------------------------------------------- plots


def _joined_plot(path: Path, folder: Path, title: str) -> Path | None:
    try:
        with fits.open(path) as hdul:
            t = hdul["SPECTRUM"].data
            unit = hdul["SPECTRUM"].columns["flux"].unit or ""
            joined = {"wave": np.asarray(t["wavelength"]), "flux": np.asarray(t["flux"]),
                      "error": np.asarray(t["error"]), "channel": np.asarray(t["channel"])}
    except (OSError, KeyError, ValueError) as err:
        log.warning("%s: unreadable joined spectrum (%s)", path, err)
        return None
    return plots.plot_joined(joined, folder / f"{path.stem}.png", title, unit)


# --------------------------------------------------------------------------- pages


def _observation_page(obsid: int, items: list[tuple[ExposureQA, list[Path]]],
                      joined: tuple[Path, Path | None] | None, date: str, base: Path) -> str:
    obj = items[0][0].object
    status = worst(m.status for qa, _ in items for m in qa.metrics)
    body = [f"<h1>{date} observation {obsid}: {html.escape(obj)} {_badge(status)}</h1>",
            '<p><a href="report.html">night report</a> · <a href="../index.html">all nights'
            "</a></p>"]
    if joined is not None:
        body.append(f"<h2>Joined spectrum</h2><p>{_link(joined[0], base)}</p>")
        body.append(_figs([joined[1]], base))
    for qa, figs in items:
        body.append(f"<h2 id=\"{qa.key}\">exp{qa.exp:02d} {qa.channel} "
                    f"{_badge(worst(m.status for m in qa.metrics))}</h2>")
        body.append(f"<p>{_link(qa.multi, base)} {_link(qa.spectrum, base)}</p>")
        body.append(metric_table(qa.metrics))
        body.append(_figs(figs, base))
    return _page(f"{date} obs {obsid}", "\n".join(body))


def _night_page(date: str, channels: list[tuple[ChannelQA, list[Path]]],
                exposures: list[tuple[ExposureQA, list[Path]]], status: str,
                base: Path, seconds: float) -> str:
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    extra = [f'<a href="{name}">{name}</a>' for name in
             ("metrics.json", "summary.json", f"panacea_{date}.log") if (base / name).exists()]
    body = [f"<h1>LRS2 night {date} {_badge(status)}</h1>",
            f'<p class="small">panacea {__version__}, built {now} in {seconds:.1f} s from '
            f'the products on disk · {" · ".join(extra)} · '
            '<a href="../index.html">all nights</a></p>']
    body.append("<h2>Exposures</h2><table class=\"summary\"><tr><th>observation</th>"
                "<th>exp</th><th>channel</th><th>object</th><th>status</th><th>warn</th>"
                "<th>fail</th></tr>")
    for qa, _ in exposures:
        st = [m.status for m in qa.metrics]
        bad = ", ".join(m.name for m in qa.metrics if m.status in ("warn", "fail"))
        body.append(f'<tr><td><a href="obs_{qa.obsid:07d}.html#{qa.key}">{qa.obsid}</a></td>'
                    f"<td>{qa.exp:02d}</td><td>{qa.channel}</td>"
                    f"<td>{html.escape(qa.object)}</td><td class=\"{worst(st)}\">{worst(st)}"
                    f"</td><td>{st.count('warn')}</td><td>{st.count('fail')}</td></tr>"
                    + (f'<tr><td colspan="7" class="small">off: {html.escape(bad)}</td></tr>'
                       if bad else ""))
    body.append("</table>")
    if not exposures:
        body.append("<p>No science products found for this night.</p>")
    body.append("<h2>Calibrations</h2>")
    if not channels:
        body.append("<p>No calibration bundle found for this night.</p>")
    for qa, figs in channels:
        body.append(f"<h3>{qa.channel} {_badge(worst(m.status for m in qa.metrics))}</h3>"
                    f"<p>{_link(qa.bundle, base)} {_link(qa.response, base)}</p>")
        body.append(metric_table(qa.metrics))
        body.append(_figs(figs, base))
    return _page(f"LRS2 night {date}", "\n".join(body))


def write_index(output_root: str | Path) -> Path:
    """``{output}/NIGHTS/index.html``: every night with a report, newest first, with its
    status from ``metrics.json``."""
    nights = Path(output_root) / "NIGHTS"
    rows = []
    for folder in sorted(nights.glob("[0-9]" * 8), reverse=True):
        if not (folder / "report.html").exists():
            continue
        status, n = "info", 0
        try:
            doc = json.loads((folder / "metrics.json").read_text())
            status, n = doc.get("status", "info"), len(doc.get("exposures", []))
        except (OSError, ValueError):
            pass
        rows.append(f'<tr><td><a href="{folder.name}/report.html">{folder.name}</a></td>'
                    f'<td class="{status}">{status}</td><td>{n}</td></tr>')
    body = ("<h1>LRS2 nights</h1><table class=\"nights\"><tr><th>night</th><th>status</th>"
            f"<th>exposure-channels</th></tr>{''.join(rows)}</table>")
    path = nights / "index.html"
    nights.mkdir(parents=True, exist_ok=True)
    _write_text(path, _page("LRS2 nights", body))
    return path


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _channel_order(bundles: dict, multis: list[Path]) -> list[str]:
    names = set(bundles)
    names.update(m.group(4) for p in multis if (m := _MULTI.search(p.name)))
    order = {n: i for i, n in enumerate(("uv", "orange", "red", "farred"))}
    return sorted(names, key=lambda n: (order.get(n, 9), n))


def write_night_report(output_root: str | Path, date: str, reuse: bool = True) -> Path:
    """Metrics, plots and HTML pages of one night from the products under ``output_root``.

    The per-channel part (metrics and plots of the calibrations and exposures) comes from
    the fragments ``qa/metrics_{channel}.json`` that the channel tasks wrote, when they are
    up to date (:mod:`panacea.qa.channel_report`); missing or stale ones are recomputed
    here. Only the joined spectra, ``metrics.json`` and the pages are always redrawn.

    Parameters
    ----------
    output_root : path
        The product tree (``--output``).
    date : str
        Night, ``YYYYMMDD``.
    reuse : bool
        Reuse up-to-date channel fragments (False recomputes every channel).

    Returns
    -------
    Path
        ``{output_root}/NIGHTS/{date}/report.html``.
    """
    t0 = time.perf_counter()
    base = night_dir(output_root, date)
    figdir = base / "qa"
    figdir.mkdir(parents=True, exist_ok=True)
    bundles, multis = find_products(output_root, date)
    channels: list[tuple[ChannelQA, list[Path]]] = []
    done: list[tuple[ExposureQA, list[Path]]] = []
    reused = []
    for name in _channel_order(bundles, multis):
        doc = write_channel_qa(output_root, date, name, reuse=reuse)
        if doc["reused"]:
            reused.append(name)
        qa = channel_qa_from(doc)
        if qa is not None:
            channels.append((qa, [figdir / n for n in doc["channel_figs"]]))
        done += [(e, [figdir / n for n in item["figs"]])
                 for e, item in zip(exposures_from(doc), doc["exposures"])]
    order = {n: i for i, n in enumerate(("uv", "orange", "red", "farred"))}
    done.sort(key=lambda e: (e[0].obsid, e[0].exp, order.get(e[0].channel, 9)))
    doc = night_json(date, [c for c, _ in channels], [e for e, _ in done])
    write_json(doc, base / "metrics.json")
    by_obs: dict[int, list] = defaultdict(list)
    for qa, figs in done:
        by_obs[qa.obsid].append((qa, figs))
    for obsid, items in by_obs.items():
        jpath = Path(items[0][0].multi).parent / f"joined_{date}_{obsid:07d}.fits"
        joined = None
        if jpath.exists():
            joined = (jpath, _joined_plot(jpath, figdir, f"{date} obs {obsid} "
                                          f"{items[0][0].object}: joined channels"))
        _write_text(base / f"obs_{obsid:07d}.html",
                    _observation_page(obsid, items, joined, date, base))
    report = base / "report.html"
    _write_text(report, _night_page(date, channels, done, doc["status"], base,
                                    time.perf_counter() - t0))
    write_index(output_root)
    log.info("night %s: QA report %s (%s; %d channels, %d exposure-channels, %.1f s; "
             "channel fragments reused: %s)", date, report, doc["status"], len(channels),
             len(done), time.perf_counter() - t0, ",".join(reused) or "none")
    return report
