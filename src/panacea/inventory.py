"""A night's inventory: observations, exposures, frame types and objects, as a text table."""

from __future__ import annotations

from . import instrument
from .archive import NightIndex


def _channels(exposure) -> str:
    present = [c.name for c in instrument.channels().values() if exposure.has_channel(c)]
    return ",".join(present) if present else "-"


def format_inventory(night: NightIndex) -> str:
    """Text table of a night: one line per observation, then totals and problems."""
    lines = [
        f"night {night.date} in {night.path}",
        f"{'obs':>8} {'exps':>4} {'type':<14} {'object':<18} {'exptime':>8} "
        f"{'program':<12} {'start (UT)':<10} channels",
    ]
    counts: dict[str, int] = {}
    for obsid, exposures in night.observations().items():
        first = exposures[0]
        ftype = first.ftype
        counts[ftype] = counts.get(ftype, 0) + len(exposures)
        exptime = first.exptime
        lines.append(
            f"{obsid:>8} {len(exposures):>4} {instrument.FRAME_TYPES.get(ftype, ftype):<14} "
            f"{first.object[:18]:<18} {'-' if exptime is None else f'{exptime:.1f}':>8} "
            f"{(first.program or '-'):<12} {first.time.strftime('%H:%M:%S'):<10} "
            f"{_channels(first)}"
        )
    total = ", ".join(f"{n} {instrument.FRAME_TYPES.get(t, t)}" for t, n in sorted(counts.items()))
    lines.append(f"{sum(counts.values())} exposures: {total}")
    guiders = night.guider_files()
    lines.append(f"{len(guiders)} guider frames")
    for problem in night.problems:
        lines.append(f"problem: {problem}")
    return "\n".join(lines)
