"""Shared fixtures: a tiny fake raw LRS2 archive written on the fly.

Helpers are exposed to tests through the ``fakeraw`` fixture (this module itself), so tests
never import ``conftest`` directly.
"""

from __future__ import annotations

import io
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

DATE = "20181108"
BAD_DATE = "20181109"
SLOTS = ("056", "066")
AMPS = ("LL", "LU", "RU", "RL")
SHAPE = (1032, 2128)
#: Detector properties written to the headers.
GAIN = {"LL": 0.80, "LU": 0.85, "RU": 0.90, "RL": 0.95}
RDNOISE = {"LL": 3.0, "LU": 3.2, "RU": 2.8, "RL": 3.1}
#: Flat signal level (ADU above the pedestal) of each amp and slot, so amps can be told apart.
LEVEL = {"LL": 100.0, "LU": 200.0, "RU": 300.0, "RL": 400.0}
SLOT_LEVEL = {"056": 0.0, "066": 1000.0}
#: A bright marker (raw row, raw column, ADU above the level) and a saturated raw pixel.
MARKER = (10, 20, 5000.0)
SATURATED = (500, 1000)
#: AMPNAME written to the headers; slot 066 exercises the column flip.
AMPNAME = {"056": {a: a for a in AMPS}, "066": {"LL": "LR", "LU": "UL", "RU": "RU", "RL": "RL"}}
#: Exposures of the good night: (obsid, exp, ftype, OBJECT, timestamp, QPROG).
EXPOSURES = [
    (1, 1, "zro", "bias", "20181108T011502.1", None),
    (12, 1, "sci", "HD_19445_056_E", "20181108T021543.7", "HET18-3-400"),
]
GUIDER_TIMES = ("20181108T021600.0", "20181108T021610.0", "20181108T021605.0")


def pedestal(nrows: int) -> np.ndarray:
    """Known per-row overscan pedestal (ADU): a slow wave plus a gradient."""
    rows = np.arange(nrows)
    return 1000.0 + 20.0 * np.sin(2 * np.pi * rows / 700.0) + 0.01 * rows


def overscan_cols(ncols: int) -> int:
    """64 overscan columns for 2128, 32 for 1064."""
    return 64 * ncols // 2128


def signal_adu(slot: str, amp: str, shape=SHAPE) -> np.ndarray:
    """Noise-free signal above the pedestal in raw coordinates (ADU), data columns only."""
    nrows, ncols = shape
    sig = np.full((nrows, ncols - overscan_cols(ncols)), LEVEL[amp] + SLOT_LEVEL[slot])
    row, col, value = MARKER
    sig[row, col] += value
    return sig


def truth_electrons(slot: str, amp: str, shape=SHAPE) -> np.ndarray:
    """Noise-free signal in electrons, raw (unoriented) coordinates."""
    return GAIN[amp] * signal_adu(slot, amp, shape)


def amp_fits(slot, amp, ftype="sci", obj="test", timestamp="20181108T021543.7", obsid=12,
             qprog=None, shape=SHAPE, drop=(), seed=0, data=None) -> bytes:
    """Bytes of one raw amp file (uint16, BZERO 32768) with the usual header cards."""
    if data is None:
        nrows, ncols = shape
        rng = np.random.default_rng(seed)
        adu = pedestal(nrows)[:, None] + rng.standard_normal(shape, dtype=np.float32) * (
            RDNOISE[amp] / GAIN[amp])
        adu[:, : ncols - overscan_cols(ncols)] += signal_adu(slot, amp, shape)
        adu = np.clip(np.round(adu), 0, 65535)
        if shape == SHAPE:
            adu[SATURATED] = 65535
        data = adu.astype(np.uint16)
    hdu = fits.PrimaryHDU(data)
    date = f"{timestamp[:4]}-{timestamp[4:6]}-{timestamp[6:8]}"
    cards = {
        "GAIN": GAIN[amp], "RDNOISE": RDNOISE[amp], "CCDPOS": amp[0], "CCDHALF": amp[1],
        "AMPNAME": AMPNAME[slot][amp], "OBJECT": obj, "EXPTIME": 0.0 if ftype == "zro" else 60.0,
        "IMAGETYP": ftype, "DATE-OBS": date,
        "UT": f"{timestamp[9:11]}:{timestamp[11:13]}:{timestamp[13:]}", "MJD": 58430.1,
        "SPECID": 503 if slot == "056" else 502, "IFUSLOT": int(slot),
        "IFUID": "7001" if slot == "056" else "7002", "OBSID": obsid,
    }
    if qprog:
        cards["QPROG"] = qprog
    for key, value in cards.items():
        if key not in drop:
            hdu.header[key] = value
    buf = io.BytesIO()
    hdu.writeto(buf)
    return buf.getvalue()


def member_name(obsid, exp, timestamp, slot, amp, ftype) -> str:
    return f"lrs2{obsid:07d}/exp{exp:02d}/lrs2/{timestamp}_{slot}{amp}_{ftype}.fits"


def write_night(baseraw: Path, date: str, members: dict[str, bytes], fmt: str = "tar") -> Path:
    """Write members under ``{baseraw}/{date}/lrs2`` as one tarball per observation
    (``fmt`` = tar, tar.gz, tar.bz2, ...) or as an unpacked tree (``fmt`` = dir)."""
    folder = Path(baseraw) / date / "lrs2"
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "dir":
        for name, content in members.items():
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        return folder
    by_obs: dict[str, dict[str, bytes]] = {}
    for name, content in members.items():
        by_obs.setdefault(name.split("/")[0], {})[name] = content
    for top, items in by_obs.items():
        write_tar(folder / f"{top}.{fmt}", items)
    return folder


def write_tar(path: Path, items: dict[str, bytes]) -> Path:
    """A tarball holding ``items`` (compression from the suffix, fast gzip) with dir entries."""
    mode = {"gz": "w:gz", "tgz": "w:gz", "bz2": "w:bz2", "xz": "w:xz"}.get(
        path.name.rsplit(".", 1)[-1], "w")
    kwargs = {"compresslevel": 1} if mode in ("w:gz", "w:bz2") else {}
    with tarfile.open(path, mode, **kwargs) as tar:
        dirs = sorted({n.rsplit("/", i)[0] for n in items for i in (1, 2, 3) if "/" in n})
        for name in dirs:
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, content in items.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return path


def good_members() -> dict[str, bytes]:
    """All amp files of :data:`EXPOSURES` (8 per exposure)."""
    out = {}
    for obsid, exp, ftype, obj, ts, qprog in EXPOSURES:
        for slot in SLOTS:
            for amp in AMPS:
                seed = zlib.crc32(f"{obsid}{exp}{slot}{amp}".encode())
                out[member_name(obsid, exp, ts, slot, amp, ftype)] = amp_fits(
                    slot, amp, ftype, obj, ts, obsid, qprog, seed=seed)
    return out


def tiny_fits(slot: str, amp: str, ftype: str, timestamp: str) -> bytes:
    """A 4x4 amp file: enough for indexing and header tests."""
    data = np.arange(16, dtype=np.uint16).reshape(4, 4)
    return amp_fits(slot, amp, ftype, "tiny", timestamp, data=data)


def write_tiny_exposure(baseraw: Path, date: str, obsid: int, ftype: str, slots=SLOTS) -> None:
    """One observation of 4x4 amp files in ``{baseraw}/{date}/lrs2/lrs2{obsid}.tar``."""
    ts = f"{date}T{obsid % 24:02d}0000.0"
    items = {member_name(obsid, 1, ts, s, a, ftype): tiny_fits(s, a, ftype, ts)
             for s in slots for a in AMPS}
    write_night(baseraw, date, items, "tar")


def copy_night(baseraw: Path, date: str, dest: Path, skip=(), edit=None) -> Path:
    """A new archive ``dest`` with the night's tarballs linked in, leaving observations
    ``skip`` out and rewriting those in ``edit``: ``edit[obsid](member_name, hdul)`` may
    change the amp file in place, or return False to leave the member out."""
    night = dest / date / "lrs2"
    night.mkdir(parents=True)
    for tar in sorted((baseraw / date / "lrs2").glob("*.tar")):
        obsid = int(tar.name[4:11])
        if obsid in skip:
            continue
        if not (edit and obsid in edit):
            (night / tar.name).symlink_to(tar)
            continue
        with tarfile.open(tar) as src, tarfile.open(night / tar.name, "w") as dst:
            for m in src.getmembers():
                data = src.extractfile(m).read() if m.isfile() else None
                if data is not None:
                    hdul = fits.open(io.BytesIO(data))
                    if edit[obsid](m.name, hdul) is False:
                        continue
                    buf = io.BytesIO()
                    hdul.writeto(buf)
                    data = buf.getvalue()
                    m.size = len(data)
                dst.addfile(m, io.BytesIO(data) if data is not None else None)
    return dest


@pytest.fixture(scope="session")
def fakeraw():
    """This module: constants and writers of the fake archive."""
    return sys.modules[__name__]


@pytest.fixture(scope="session")
def good_archives(tmp_path_factory) -> dict[str, Path]:
    """The same good night as .tar, .tar.gz and an unpacked tree: fmt -> baseraw."""
    members = good_members()
    out = {}
    for fmt in ("tar", "tar.gz", "dir"):
        base = tmp_path_factory.mktemp(f"raw_{fmt.replace('.', '_')}")
        write_night(base, DATE, members, fmt)
        out[fmt] = base
    guider = out["tar"] / DATE
    (guider / "gc1").mkdir()
    write_tar(guider / "gc1" / "gc1.tar", {
        f"{GUIDER_TIMES[0]}_gc1_sci.fits": tiny_fits("056", "LL", "sci", GUIDER_TIMES[0]),
        f"gc1/{GUIDER_TIMES[1]}_gc1_sci.fits": tiny_fits("056", "LL", "sci", GUIDER_TIMES[1]),
        "gc1/notes.txt": b"not a guider frame",
    })
    (guider / "gc2").mkdir()
    (guider / "gc2" / f"{GUIDER_TIMES[2]}_gc2_sci.fits").write_bytes(
        tiny_fits("056", "LL", "sci", GUIDER_TIMES[2]))
    return out


@pytest.fixture(scope="session")
def bad_archive(tmp_path_factory) -> Path:
    """A night full of problems (2x1-binned frames where a full one is not needed).

    obs 20: 056LU missing, 056LL without GAIN and RDNOISE, 1032x1064 binned frames;
    obs 21: 056LL of the wrong shape; obs 22: truncated tarball; obs 23: junk member names;
    obs 24: 056LL not a FITS file; obs 25: 056LL all zeros; obs 26: a .tar.gz of garbage.
    """
    base = tmp_path_factory.mktemp("raw_bad")
    binned = (1032, 1064)
    ts = "20181109T030000.0"
    members = {}
    for slot in SLOTS:
        for amp in AMPS:
            if (slot, amp) == ("056", "LU"):
                continue
            drop = ("GAIN", "RDNOISE") if (slot, amp) == ("056", "LL") else ()
            members[member_name(20, 1, ts, slot, amp, "sci")] = amp_fits(
                slot, amp, "sci", "obj", ts, 20, shape=binned, drop=drop,
                seed=zlib.crc32(f"20{slot}{amp}".encode()))
    members[member_name(21, 1, ts, "056", "LL", "sci")] = amp_fits(
        "056", "LL", data=(np.arange(1032 * 2000) % 5000).astype(np.uint16).reshape(1032, 2000))
    members[member_name(21, 1, ts, "056", "LU", "sci")] = amp_fits("056", "LU", shape=binned)
    members[member_name(22, 1, ts, "056", "LL", "sci")] = amp_fits("056", "LL", shape=binned)
    members[member_name(23, 1, ts, "056", "LL", "sci")] = amp_fits("056", "LL", shape=binned)
    members["lrs20000023/README.txt"] = b"hello"
    members["lrs20000023/exp01/lrs2/20181109T030000.0_056XX_sci.fits"] = b"bad amp code"
    members[member_name(24, 1, ts, "056", "LL", "sci")] = b"this is not a FITS file" * 200
    members[member_name(25, 1, ts, "056", "LL", "sci")] = amp_fits(
        "056", "LL", data=np.zeros(binned, dtype=np.uint16))
    folder = write_night(base, BAD_DATE, members, "tar")
    truncated = folder / "lrs20000022.tar"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    (folder / "lrs20000026.tar.gz").write_bytes(b"\x1f\x8b\x08" + bytes(range(200)))
    (folder / "notes.txt").write_text("an unrelated file")
    return base


# --------------------------------------------------------------------------- simulated night


class SimNight:
    """A small simulated night shared by the calibration and science tests."""

    def __init__(self, baseraw: Path, date: str):
        self.baseraw = baseraw
        self.date = date

    def truth(self, channel: str):
        from panacea.simulate.truth import load_channel

        return load_channel(self.baseraw, self.date, channel)

    def night_truth(self) -> dict:
        from panacea.simulate.truth import load_night

        return load_night(self.baseraw, self.date)


@pytest.fixture(scope="session")
def red_randomized_night(tmp_path_factory):
    """Red on randomized night 1 (ripples 0.15 px with periods 367 and 243 px; arcs with
    missing, unlisted and blended lines, an asymmetric line spread): one bias, the arcs and
    two 900 s sky exposures with their own flexure. Returns (night, truth, arc frames by
    lamp); shared by the wavelength-model and sky-shape tests."""
    from panacea import instrument
    from panacea.archive import Archive
    from panacea.ccd import read_channel
    from panacea.simulate import NightConfig, simulate_night
    from panacea.simulate.truth import load_channel

    base = tmp_path_factory.mktemp("red1")
    cfg = NightConfig(date="20181108", seed=1, channels=("red",), n_bias=1, n_twilight=0,
                      n_flat=0, standard="", n_science=2, extended=False, randomize=True)
    simulate_night(cfg, base, workers=1)
    truth = load_channel(base, cfg.date, "red")
    night = Archive(base).night(cfg.date)
    arcs: dict[str, list] = {}
    for exp in night.exposures(ftype="cmp", channel="red"):
        frame = read_channel(night, exp, "red")
        lamp = instrument.ARC_OBJECTS[str(frame.header["OBJECT"]).strip().lower()]
        arcs.setdefault(lamp, []).append(frame)
    return night, truth, arcs


@pytest.fixture(scope="session")
def sim_night(tmp_path_factory) -> SimNight:
    """All four channels; 3 biases, 2 twilights, 1 internal flat, Hg/Cd/FeAr arcs, the
    standard and one science exposure (no extended target). About 15 s on 2 cores."""
    from panacea.simulate import NightConfig, simulate_night

    base = tmp_path_factory.mktemp("simnight")
    cfg = NightConfig(date="20181108", seed=11, n_bias=3, n_twilight=2, n_flat=1,
                      n_science=1, extended=False)
    simulate_night(cfg, base)
    return SimNight(base, cfg.date)


@pytest.fixture(scope="session")
def reduced(sim_night, tmp_path_factory):
    """The simulated night reduced through the command line (all channels)."""
    from panacea.cli import main

    out = tmp_path_factory.mktemp("reduced")
    rc = main(["-d", sim_night.date, "--baseraw", str(sim_night.baseraw), "--output", str(out)])
    assert rc == 0
    return out
