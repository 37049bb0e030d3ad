"""The LRS2 instrument model: channels, amplifiers, orientation, IFU geometry and line lists.

Every table lives in ``panacea/data`` and is read through :mod:`importlib.resources`.
Conventions used throughout the package:

* An *amp frame* is one amplifier after overscan removal and orientation: rows are the
  spatial (cross-dispersion) axis, columns the dispersion axis with wavelength increasing
  to the right.
* A *channel frame* stitches the channel's two amps: first amp in rows ``0..ny-1``, second
  amp in rows ``ny..2ny-1`` (2064 x 2064 unbinned).
* Fibers in a channel frame are numbered ``k = 0..279`` by increasing row; fiber ``k`` is
  IFU fiber ID ``280 - k``.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
from dataclasses import dataclass
from functools import cache
from importlib import resources

import numpy as np

NFIBERS = 280
FIBERS_PER_AMP = 140
NAMPS = 2
#: Unbinned amplifier geometry: rows, data columns, overscan columns.
AMP_ROWS = 1032
AMP_DATA_COLS = 2064
AMP_OVERSCAN_COLS = 64
#: Number of points in a channel's common rectified wavelength grid.
GRID_POINTS = 2064
#: Default illuminated mirror area of HET (cm^2) when no guider information exists.
DEFAULT_AREA_CM2 = 5.14e5
#: Detector defaults, used only when a header value is missing or not positive.
DEFAULT_GAIN = 0.85
DEFAULT_RDNOISE = 3.0
#: Saturation of the 16-bit converter (ADU).
SATURATION_ADU = 65535
#: Date of the CCD-controller change: calibrations are never mixed across it.
CONTROLLER_CHANGE = _dt.date(2024, 7, 22)
#: HET's fixed elevation (degrees).
HET_ELEVATION_DEG = 55.0
#: IFU lenslet pitch (arcsec).
LENSLET_PITCH = 0.59
#: Approximate line-spread FWHM in pixels (all channels).
LSF_FWHM_PIX = 4.3

#: Frame types used in raw file names.
FRAME_TYPES = {
    "zro": "bias",
    "twi": "twilight flat",
    "flt": "internal flat",
    "cmp": "arc",
    "sci": "science",
    "drk": "dark",
    "eng": "engineering",
}
#: OBJECT values (lower case) that mark arc frames, and the lamp each one means.
ARC_OBJECTS = {
    "hg_b": "hg",
    "hg_r": "hg",
    "hg": "hg",
    "cd-a_b": "cd",
    "cd_b": "cd",
    "cd": "cd",
    "fear_r": "fear",
    "fear": "fear",
}


def _read_table(name: str) -> list[dict[str, str]]:
    """Read a bundled CSV table, skipping ``#`` comment lines."""
    text = resources.files("panacea.data").joinpath(name).read_text()
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    return list(csv.DictReader(io.StringIO("\n".join(lines))))


@dataclass(frozen=True)
class Channel:
    """One LRS2 channel: a CCD read by two amplifiers.

    Attributes
    ----------
    name : str
        ``uv``, ``orange``, ``red`` or ``farred``.
    arm : str
        ``LRS2-B`` or ``LRS2-R``.
    ifuslot : str
        Three-digit IFU slot used in raw file names (``056`` or ``066``).
    specid, ifuid : int
        Spectrograph and IFU identifiers.
    amps : tuple of str
        Amplifier codes in stitched order (first amp holds fibers k = 0..139).
    wave_lo, wave_hi : float
        Limits of the common rectified grid (air, Angstrom).
    resolution : float
        Resolving power.
    disp_lo, disp_hi : float
        Approximate dispersion (Angstrom per unbinned pixel) at the blue and red ends.
    lamps : tuple of str
        Arc lamps that illuminate this channel (``hg``, ``cd``, ``fear``).
    """

    name: str
    arm: str
    ifuslot: str
    specid: int
    ifuid: int
    amps: tuple[str, str]
    wave_lo: float
    wave_hi: float
    resolution: float
    disp_lo: float
    disp_hi: float
    lamps: tuple[str, ...]

    @property
    def grid(self) -> np.ndarray:
        """Common rectified wavelength grid (air, Angstrom), 2064 linear points."""
        return np.linspace(self.wave_lo, self.wave_hi, GRID_POINTS)

    @property
    def side(self) -> str:
        """``L`` or ``R``: which half of the CCD (CCDPOS) holds this channel."""
        return self.amps[0][0]

    def amp_index(self, amp: str) -> int:
        """0 for the channel's first (lower stitched) amp, 1 for the second."""
        return self.amps.index(amp)


@cache
def channels() -> dict[str, Channel]:
    """All channels keyed by name, in the order uv, orange, red, farred."""
    out = {}
    for row in _read_table("channels.csv"):
        out[row["name"]] = Channel(
            name=row["name"],
            arm=row["arm"],
            ifuslot=row["ifuslot"],
            specid=int(row["specid"]),
            ifuid=int(row["ifuid"]),
            amps=(row["amp1"], row["amp2"]),
            wave_lo=float(row["wave_lo"]),
            wave_hi=float(row["wave_hi"]),
            resolution=float(row["resolution"]),
            disp_lo=float(row["disp_lo"]),
            disp_hi=float(row["disp_hi"]),
            lamps=tuple(row["lamps"].lower().split()),
        )
    return out


def get_channel(name: str) -> Channel:
    """Look up a channel by name, with a clear error for unknown names."""
    chans = channels()
    try:
        return chans[name.lower()]
    except KeyError:
        raise ValueError(f"unknown channel {name!r}; expected one of {', '.join(chans)}") from None


def channel_for(ifuslot: str, amp: str) -> Channel:
    """The channel read by amplifier ``amp`` (e.g. ``LU``) of IFU slot ``ifuslot`` (``056``)."""
    for ch in channels().values():
        if ch.ifuslot == ifuslot and amp in ch.amps:
            return ch
    raise ValueError(f"no LRS2 channel for IFU slot {ifuslot!r} amplifier {amp!r}")


def parse_channels(text: str) -> list[Channel]:
    """Parse a comma-separated channel list such as ``"uv,orange"``."""
    return [get_channel(t.strip()) for t in text.split(",") if t.strip()]


# --------------------------------------------------------------------------- orientation


def needs_rotation(amp: str) -> bool:
    """Amps LU and RL are rotated by 180 degrees to the common orientation."""
    return amp in ("LU", "RL")


def needs_column_flip(ampname: str | None) -> bool:
    """Amps whose header AMPNAME is ``LR`` or ``UL`` have their columns reversed."""
    return (ampname or "").strip().upper() in ("LR", "UL")


def orient(image: np.ndarray, amp: str, ampname: str | None = None) -> np.ndarray:
    """Orient a trimmed amp image: wavelength increasing to the right, fibers by row.

    Parameters
    ----------
    image : ndarray, shape (..., ny, nx)
        Overscan-trimmed image (leading axes, if any, are carried along).
    amp : str
        Amplifier code, CCDPOS + CCDHALF (``LL``, ``LU``, ``RU``, ``RL``).
    ampname : str, optional
        Header AMPNAME.
    """
    out = image
    if needs_rotation(amp):
        out = out[..., ::-1, ::-1]
    if needs_column_flip(ampname):
        out = out[..., :, ::-1]
    return out


def deorient(image: np.ndarray, amp: str, ampname: str | None = None) -> np.ndarray:
    """Inverse of :func:`orient` (both operations are involutions that commute)."""
    return orient(image, amp, ampname)


def stitch(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Stack the channel's first amp above (lower rows) its second amp."""
    if first.shape != second.shape:
        raise ValueError(f"amp shapes differ: {first.shape} vs {second.shape}")
    return np.concatenate([first, second], axis=-2)


# --------------------------------------------------------------------------- IFU geometry


@cache
def lenslet_positions() -> np.ndarray:
    """IFU lenslet positions (arcsec), shape (280, 2), row ``i`` is fiber ID ``i + 1``."""
    rows = _read_table("ifu_lenslets.csv")
    pos = np.array([[float(r["x"]), float(r["y"])] for r in rows])
    ids = np.array([int(r["fiber_id"]) for r in rows])
    if not np.array_equal(ids, np.arange(1, NFIBERS + 1)):
        raise RuntimeError("ifu_lenslets.csv must list fiber IDs 1..280 in order")
    pos.flags.writeable = False
    return pos


def fiber_id(k: int | np.ndarray) -> int | np.ndarray:
    """IFU fiber ID of stitched fiber index ``k`` (0..279)."""
    return NFIBERS - np.asarray(k) if isinstance(k, np.ndarray) else NFIBERS - k


def fiber_index(fid: int | np.ndarray) -> int | np.ndarray:
    """Stitched fiber index of IFU fiber ID ``fid`` (1..280)."""
    return fiber_id(fid)


def fiber_positions() -> np.ndarray:
    """IFU (x, y) in arcsec of every stitched fiber k = 0..279, shape (280, 2)."""
    return lenslet_positions()[NFIBERS - 1 - np.arange(NFIBERS)]


# --------------------------------------------------------------------------- line lists


@dataclass(frozen=True)
class ArcLine:
    """One arc-lamp line (air wavelength in Angstrom)."""

    wavelength: float
    column: float
    strength: float
    element: str
    lamp: str
    source: str


@cache
def arc_lines(channel: str) -> tuple[ArcLine, ...]:
    """Arc lines of a channel sorted by wavelength (sheet lines and laboratory lines)."""
    get_channel(channel)
    out = [
        ArcLine(
            wavelength=float(r["wavelength"]),
            column=float(r["column"]),
            strength=float(r["strength"]),
            element=r["element"],
            lamp=r["lamp"],
            source=r["source"],
        )
        for r in _read_table("arc_lines.csv")
        if r["channel"] == channel
    ]
    return tuple(sorted(out, key=lambda a: a.wavelength))


@dataclass(frozen=True)
class SkyLine:
    """One night-sky emission line (air wavelength in Angstrom, rough relative strength)."""

    wavelength: float
    species: str
    strength: float


@cache
def sky_lines() -> tuple[SkyLine, ...]:
    """Night-sky emission lines, sorted by wavelength."""
    rows = _read_table("sky_lines.csv")
    out = [SkyLine(float(r["wavelength"]), r["species"], float(r["strength"])) for r in rows]
    return tuple(sorted(out, key=lambda s: s.wavelength))


@cache
def standard_names() -> tuple[str, ...]:
    """Names of HET spectrophotometric standards."""
    text = resources.files("panacea.data").joinpath("standards.txt").read_text()
    return tuple(ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#"))


def match_standard(obj: str) -> str | None:
    """Return the standard-star name that an OBJECT string refers to, or None.

    Matching ignores case and the separators ``_``, ``-``, ``+`` and spaces, so
    ``HD_19445_056_E`` and ``hd19445`` both match ``HD_19445``.
    """

    def norm(s: str) -> str:
        return "".join(c for c in s.upper() if c.isalnum())

    target = norm(obj)
    best = None
    for name in standard_names():
        n = norm(name)
        if n and target.startswith(n) and (best is None or len(n) > len(norm(best))):
            best = name
    return best


# --------------------------------------------------------------------------- telescope


def _circle_overlap(r1: float, r2: float, d: np.ndarray) -> np.ndarray:
    """Area of intersection of circles of radii r1, r2 whose centres are d apart."""
    d = np.atleast_1d(np.abs(np.asarray(d, float)))
    out = np.empty_like(d)
    inside = d <= abs(r1 - r2)
    apart = d >= r1 + r2
    out[inside] = np.pi * min(r1, r2) ** 2
    out[apart] = 0.0
    m = ~(inside | apart)
    dm = d[m]
    a1 = r1**2 * np.arccos((dm**2 + r1**2 - r2**2) / (2 * dm * r1))
    a2 = r2**2 * np.arccos((dm**2 + r2**2 - r1**2) / (2 * dm * r2))
    a3 = 0.5 * np.sqrt((-dm + r1 + r2) * (dm + r1 - r2) * (dm - r1 + r2) * (dm + r1 + r2))
    out[m] = a1 + a2 - a3
    return out


#: Geometry of the illumination model (metres): the 10 m pupil that the tracker moves over
#: the 11 m primary; the central obstruction moves with the pupil.
PUPIL_RADIUS_M = 5.0
PRIMARY_RADIUS_M = 5.5


def illuminated_area(x_m: np.ndarray | float, y_m: np.ndarray | float) -> np.ndarray:
    """Illuminated mirror area (cm^2) for tracker offsets (metres) from the mirror centre.

    A simple geometric model: the area of the pupil that falls on the primary, scaled so that
    a centred pupil gives :data:`DEFAULT_AREA_CM2`.
    """
    d = np.hypot(x_m, y_m)
    frac = _circle_overlap(PUPIL_RADIUS_M, PRIMARY_RADIUS_M, d) / (np.pi * PUPIL_RADIUS_M**2)
    return DEFAULT_AREA_CM2 * frac
