"""Index of the raw LRS2 archive: tarballs and unpacked trees, exposures, calibration lookup.

Layout of a raw archive rooted at ``baseraw``::

    {baseraw}/{YYYYMMDD}/lrs2/lrs2{NNNNNNN}.tar          (or .tar.gz .tgz .tar.bz2 .tar.xz)
        lrs2{NNNNNNN}/exp{NN}/lrs2/{YYYYMMDD}T{hhmmss.s}_{slot}{amp}_{type}.fits
    {baseraw}/{YYYYMMDD}/lrs2/lrs2{NNNNNNN}/exp{NN}/lrs2/*.fits   (the same, unpacked)
    {baseraw}/{YYYYMMDD}/gc1/gc1.tar, gc2/gc2.tar        (guider frames, or unpacked folders)

A :class:`NightIndex` lists one night once (each tarball is opened once and its member list
kept), groups the amplifier files into :class:`Exposure` objects and reads member bytes on
demand through a small cache of open tarballs. An :class:`Archive` caches nights and finds
calibrations in the nearest night within a bounded window that never crosses the
CCD-controller change (:data:`panacea.instrument.CONTROLLER_CHANGE`).
"""

from __future__ import annotations

import datetime as dt
import logging
import lzma
import re
import tarfile
import warnings
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from astropy.io import fits
from astropy.utils.exceptions import AstropyUserWarning

from panacea import instrument
from panacea.errors import ArchiveError, CalibrationNotFound, NoDataError
from panacea.io_utils import card_text, header_number, header_value

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)

#: File-name endings of (possibly compressed) tarballs.
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
#: Guider cameras whose frames are kept per night.
GUIDER_CAMERAS = ("gc1", "gc2")
#: Frame type (file-name code) of each calibration kind.
CALIBRATION_FTYPES = {"bias": "zro", "twi": "twi", "flt": "flt", "arc": "cmp"}
#: Default half-width (nights) of the calibration search window of each kind.
DEFAULT_WINDOWS = {"bias": 1, "twi": 7, "flt": 7, "arc": 7}
#: Open tarballs kept per night index.
MAX_OPEN_TARBALLS = 8

_TIMESTAMP = r"(?P<timestamp>\d{8}T\d{6}(?:\.\d+)?)"
_MEMBER_RE = re.compile(
    r"(?:^|/)lrs2(?P<obsid>\d{7})/exp(?P<exp>\d{2,})/lrs2/"
    + _TIMESTAMP
    + r"_(?P<ifuslot>\d{3})(?P<amp>[LR][LU])_(?P<ftype>[a-z]{3})\.fits$"
)
_GUIDER_RE = re.compile(
    r"(?:^|/)" + _TIMESTAMP + r"_(?P<camera>gc[12])_(?P<ftype>[a-z]{3})\.fits$"
)
_OBS_DIR_RE = re.compile(r"^lrs2\d{7}$")
_ANY = re.compile("")
_TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)


# --------------------------------------------------------------------------- dates


def normalize_date(date: str | dt.date) -> str:
    """Return a night as ``YYYYMMDD``; raise ValueError for anything else."""
    if isinstance(date, dt.date):
        return date.strftime("%Y%m%d")
    text = str(date).strip()
    try:
        if len(text) != 8:
            raise ValueError
        dt.datetime.strptime(text, "%Y%m%d")
    except ValueError:
        raise ValueError(f"invalid night {date!r}: expected YYYYMMDD") from None
    return text


def _as_date(date: str | dt.date) -> dt.date:
    return dt.datetime.strptime(normalize_date(date), "%Y%m%d").date()


def parse_timestamp(timestamp: str) -> dt.datetime:
    """Parse a raw-file timestamp ``YYYYMMDDThhmmss.s`` into an aware UTC datetime."""
    base, _, frac = timestamp.partition(".")
    time = dt.datetime.strptime(base, "%Y%m%dT%H%M%S").replace(tzinfo=dt.timezone.utc)
    return time + dt.timedelta(seconds=float("0." + frac)) if frac else time


def calibration_nights(date: str | dt.date, window: int) -> list[str]:
    """Nights to search for a calibration, nearest first: 0, -1, +1, -2, +2, ... ``±window``.

    Nights on the other side of the CCD-controller change from ``date`` are left out.
    """
    if int(window) != window or window < 0:
        raise ValueError(f"calibration window must be a non-negative integer, got {window!r}")
    start = _as_date(date)
    era = start >= instrument.CONTROLLER_CHANGE
    out = []
    for offset in sorted(range(-int(window), int(window) + 1), key=lambda k: (abs(k), k)):
        night = start + dt.timedelta(days=offset)
        if (night >= instrument.CONTROLLER_CHANGE) == era:
            out.append(night.strftime("%Y%m%d"))
    return out


# --------------------------------------------------------------------------- files


class _Located:
    """Mixin: where a raw file lives (a loose file, or a member of a tarball)."""

    source: Path
    member: str | None

    @property
    def location(self) -> str:
        """``tarball:member`` for tar members, the file path for loose files."""
        return f"{self.source}:{self.member}" if self.member else str(self.source)


@dataclass(frozen=True)
class RawFile(_Located):
    """One raw amplifier file of an LRS2 exposure.

    Attributes
    ----------
    source : Path
        Tarball holding the file, or the file itself when unpacked.
    member : str or None
        Member name inside the tarball; None for loose files.
    date : str
        Night (archive folder), YYYYMMDD.
    obsid, exp : int
        Observation and exposure numbers.
    timestamp : str
        Start time as written in the file name (``YYYYMMDDThhmmss.s``, UTC).
    time : datetime
        ``timestamp`` parsed (UTC, timezone-aware).
    ifuslot : str
        IFU slot, e.g. ``056``.
    amp : str
        Amplifier code, e.g. ``LL``.
    ftype : str
        Frame type code (``sci``, ``zro``, ``twi``, ``flt``, ``cmp``, ``drk``, ``eng``).
    """

    source: Path
    member: str | None
    date: str
    obsid: int
    exp: int
    timestamp: str
    time: dt.datetime
    ifuslot: str
    amp: str
    ftype: str

    @classmethod
    def from_name(
        cls, name: str, source: str | Path, date: str, member: str | None = None
    ) -> RawFile | None:
        """Parse ``.../lrs2NNNNNNN/expNN/lrs2/{timestamp}_{slot}{amp}_{type}.fits``.

        Returns None when ``name`` is not an LRS2 amplifier file name.
        """
        m = _MEMBER_RE.search(name)
        if m is None:
            return None
        try:
            time = parse_timestamp(m["timestamp"])
        except ValueError:
            return None
        return cls(
            source=Path(source),
            member=member,
            date=date,
            obsid=int(m["obsid"]),
            exp=int(m["exp"]),
            timestamp=m["timestamp"],
            time=time,
            ifuslot=m["ifuslot"],
            amp=m["amp"],
            ftype=m["ftype"],
        )

    @property
    def channel(self) -> instrument.Channel | None:
        """The channel this amplifier belongs to (None for an unknown IFU slot)."""
        try:
            return instrument.channel_for(self.ifuslot, self.amp)
        except ValueError:
            return None


@dataclass(frozen=True)
class GuiderFile(_Located):
    """One guider-camera frame (``{timestamp}_{gc1|gc2}_{type}.fits``) of a night."""

    source: Path
    member: str | None
    date: str
    camera: str
    timestamp: str
    time: dt.datetime
    ftype: str

    @classmethod
    def from_name(
        cls, name: str, source: str | Path, date: str, member: str | None = None
    ) -> GuiderFile | None:
        """Parse a guider file name; None when it is not one."""
        m = _GUIDER_RE.search(name)
        if m is None:
            return None
        try:
            time = parse_timestamp(m["timestamp"])
        except ValueError:
            return None
        return cls(Path(source), member, date, m["camera"], m["timestamp"], time, m["ftype"])


def _tarball_stem(name: str) -> str | None:
    """``lrs20000012`` for ``lrs20000012.tar.gz``; None if ``name`` is not a tarball name."""
    for suffix in TAR_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _channel(channel: str | instrument.Channel) -> instrument.Channel:
    return channel if isinstance(channel, instrument.Channel) else instrument.get_channel(channel)


# --------------------------------------------------------------------------- exposures


class Exposure:
    """One exposure (observation ``obsid``, exposure ``exp``) of a night: up to 8 amp files.

    Attributes
    ----------
    date : str
        Night, YYYYMMDD.
    obsid, exp : int
        Observation and exposure numbers.
    files : dict
        :class:`RawFile` keyed by ``(ifuslot, amp)``, sorted.
    """

    def __init__(self, date: str, obsid: int, exp: int, files: dict, index: NightIndex):
        self.date = date
        self.obsid = obsid
        self.exp = exp
        self.files: dict[tuple[str, str], RawFile] = dict(sorted(files.items()))
        self._index = index
        self._headers: dict[RawFile, fits.Header] = {}

    def __repr__(self) -> str:
        return f"<Exposure {self.name} {self.ftype} {len(self.files)} files>"

    @property
    def name(self) -> str:
        """Short description, e.g. ``20181108 lrs20000012 exp01``."""
        return f"{self.date} lrs2{self.obsid:07d} exp{self.exp:02d}"

    @property
    def ftype(self) -> str:
        """Frame type code of the exposure (from the file names)."""
        return next(iter(self.files.values())).ftype

    @property
    def time(self) -> dt.datetime:
        """Start time (UTC) from the file names."""
        return min(f.time for f in self.files.values())

    def has_channel(self, channel: str | instrument.Channel) -> bool:
        """True when both amplifiers of ``channel`` are present."""
        return len(self.amps_of(channel)) == len(_channel(channel).amps)

    def amps_of(self, channel: str | instrument.Channel) -> tuple[str, ...]:
        """The amplifiers of ``channel`` with a file in this exposure."""
        ch = _channel(channel)
        return tuple(amp for amp in ch.amps if (ch.ifuslot, amp) in self.files)

    def file(self, ifuslot: str | None = None, amp: str | None = None) -> RawFile:
        """The first file matching ``ifuslot`` and/or ``amp`` (any when both are None)."""
        for (slot, code), rawfile in self.files.items():
            if ifuslot in (None, slot) and amp in (None, code):
                return rawfile
        raise ArchiveError(f"{self.name}: no file for IFU slot {ifuslot} amplifier {amp}")

    def header(self, ifuslot: str | None = None, amp: str | None = None) -> fits.Header:
        """Primary header of one amp file, read once and cached.

        Without ``ifuslot`` and ``amp`` it is the first amp file whose header can be read
        (the exposure-wide cards OBJECT, EXPTIME, QPROG are the same in every amp file), so
        one damaged member does not hide the exposure's description.

        Raises
        ------
        ArchiveError
            When the header (or, without a choice of amp, every header) is unreadable.
        """
        if ifuslot is not None or amp is not None:
            return self._read_header(self.file(ifuslot, amp))
        first_error = None
        for rawfile in self.files.values():
            try:
                return self._read_header(rawfile)
            except ArchiveError as err:
                first_error = first_error or err
        raise first_error if first_error else ArchiveError(f"{self.name}: no files")

    def _read_header(self, rawfile: RawFile) -> fits.Header:
        if rawfile not in self._headers:
            self._headers[rawfile] = self._index.read_header(rawfile)
        return self._headers[rawfile]

    @property
    def object(self) -> str:
        """Header OBJECT (stripped; empty when absent or unparsable)."""
        try:
            value = header_value(self.header(), "OBJECT")
        except ArchiveError:
            return ""  # the frame reader names the damaged file when the exposure is read
        return "" if value is None else str(value).strip()

    @property
    def exptime(self) -> float | None:
        """Header EXPTIME in seconds; None when absent, unparsable, not a finite number or
        negative (see :meth:`exptime_problem`)."""
        try:
            value = header_number(self.header(), "EXPTIME")
        except ArchiveError:
            return None
        return None if value is None or value < 0 else value

    def exptime_problem(self) -> str | None:
        """Why EXPTIME is unusable for a science frame (None when it is a positive number):
        ``EXPTIME 'NaN' is not a positive number in {file}``."""
        value = self.exptime
        if value is not None and value > 0:
            return None
        try:
            shown = card_text(self.header(), "EXPTIME")
        except ArchiveError as err:
            return f"EXPTIME unknown: {err}"
        return f"EXPTIME {shown} is not a positive number of seconds in {self.file().location}"

    @property
    def program(self) -> str | None:
        """Header QPROG (program id), or None for exposures without a program."""
        try:
            value = header_value(self.header(), "QPROG")
        except ArchiveError:
            return None
        value = "" if value is None else str(value).strip()
        return value or None


# --------------------------------------------------------------------------- night index


class NightIndex:
    """Index of one night of raw LRS2 data.

    Built once at construction: every tarball under ``{baseraw}/{date}/lrs2`` is opened once
    and its member list kept, unpacked trees are walked. Tarballs that cannot be read are
    logged and recorded in :attr:`problems`; the rest of the night is still indexed.
    Guider tarballs are listed on the first call of :meth:`guider_files`.

    Parameters
    ----------
    baseraw : path
        Root of the raw archive.
    date : str or date
        Night (folder name), YYYYMMDD.
    max_open : int
        Number of open tarball handles kept for reading members.

    Raises
    ------
    NoDataError
        When the night has no ``lrs2`` folder or no readable LRS2 file.
    """

    def __init__(self, baseraw: str | Path, date: str | dt.date, max_open: int = MAX_OPEN_TARBALLS):
        self.baseraw = Path(baseraw)
        self.date = normalize_date(date)
        self.path = self.baseraw / self.date / "lrs2"
        self.problems: list[ArchiveError] = []
        self._max_open = max(1, int(max_open))
        self._open: OrderedDict[Path, tarfile.TarFile] = OrderedDict()
        self._tarinfo: dict[tuple[Path, str], tarfile.TarInfo] = {}
        self._guiders: list[GuiderFile] | None = None
        if not self.path.is_dir():
            raise NoDataError(f"no LRS2 data for night {self.date}: {self.path} is not a folder")
        self.files: list[RawFile] = self._dedupe(self._scan_folder(self.path))
        if not self.files:
            self.close()
            extra = f" ({len(self.problems)} unreadable tarballs)" if self.problems else ""
            raise NoDataError(f"no LRS2 raw files found under {self.path}{extra}")
        self._exposures = self._group(self.files)
        log.debug("indexed %s: %d files, %d exposures", self.path, len(self.files),
                  len(self._exposures))

    def __repr__(self) -> str:
        return f"<NightIndex {self.path} {len(self._exposures)} exposures>"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the cached tarball handles (the index stays usable and reopens on demand)."""
        while self._open:
            self._open.popitem()[1].close()

    # ------------------------------------------------------------------ queries

    def exposures(
        self, ftype: str | None = None, channel: str | instrument.Channel | None = None
    ) -> list[Exposure]:
        """Exposures sorted by (obsid, exp), optionally of one frame type and channel.

        ``channel`` keeps exposures holding at least one amplifier of that channel, so an
        incomplete exposure shows up (and fails loudly when read) instead of vanishing.
        """
        if ftype is not None and ftype not in instrument.FRAME_TYPES:
            raise ValueError(f"unknown frame type {ftype!r}; expected one of "
                             f"{', '.join(instrument.FRAME_TYPES)}")
        out = [e for e in self._exposures if ftype is None or e.ftype == ftype]
        if channel is not None:
            ch = _channel(channel)
            out = [e for e in out if any((ch.ifuslot, a) in e.files for a in ch.amps)]
        return out

    def observations(self) -> dict[int, list[Exposure]]:
        """Exposures grouped by observation number, both sorted."""
        out: dict[int, list[Exposure]] = {}
        for exposure in self._exposures:
            out.setdefault(exposure.obsid, []).append(exposure)
        return out

    def guider_files(self, camera: str | None = None) -> list[GuiderFile]:
        """Guider frames of the night sorted by time (both cameras unless ``camera``)."""
        if self._guiders is None:
            found = []
            for cam in GUIDER_CAMERAS:
                folder = self.baseraw / self.date / cam
                if folder.is_dir():
                    found += self._scan_folder(folder, GuiderFile.from_name, _ANY)
            self._guiders = sorted(found, key=lambda g: (g.time, g.camera))
        return [g for g in self._guiders if camera in (None, g.camera)]

    # ------------------------------------------------------------------ reading

    def read_bytes(self, rawfile: RawFile | GuiderFile) -> bytes:
        """Whole content of one raw file.

        Raises
        ------
        ArchiveError
            When the file or tar member cannot be read.
        """
        with self._open_file(rawfile) as fh:
            try:
                return fh.read()
            except _TAR_ERRORS as exc:
                raise ArchiveError(f"{rawfile.location}: cannot read ({exc})",
                                   file=rawfile.location) from exc

    def read_header(self, rawfile: RawFile | GuiderFile) -> fits.Header:
        """Primary FITS header of one raw file, reading only the header blocks."""
        with self._open_file(rawfile) as fh:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", AstropyUserWarning)  # reported below
                    return fits.Header.fromfile(fh)
            except (*_TAR_ERRORS, ValueError) as exc:
                why = f"{type(exc).__name__}: {exc}" if str(exc) else "no FITS header found"
                raise ArchiveError(f"{rawfile.location}: cannot read FITS header ({why})",
                                   file=rawfile.location) from exc

    def _open_file(self, rawfile: RawFile | GuiderFile) -> IO[bytes]:
        if rawfile.member is None:
            try:
                return open(rawfile.source, "rb")
            except OSError as exc:
                raise ArchiveError(f"{rawfile.location}: cannot open ({exc})") from exc
        info = self._tarinfo.get((rawfile.source, rawfile.member))
        if info is None:
            raise ArchiveError(f"{rawfile.location}: not a member indexed by {self!r}")
        try:
            return self._tarball(rawfile.source).extractfile(info)
        except _TAR_ERRORS as exc:
            raise ArchiveError(f"{rawfile.location}: cannot extract ({exc})") from exc

    def _tarball(self, path: Path) -> tarfile.TarFile:
        """Open tarball handle from the cache (least recently used ones are closed)."""
        tar = self._open.pop(path, None)
        if tar is None:
            try:
                tar = tarfile.open(path)  # noqa: SIM115 - kept open in the handle cache
            except _TAR_ERRORS as exc:
                raise ArchiveError(f"{path}: cannot open tarball ({exc})") from exc
        self._keep(path, tar)
        return tar

    def _keep(self, path: Path, tar: tarfile.TarFile) -> None:
        self._open[path] = tar
        while len(self._open) > self._max_open:
            self._open.popitem(last=False)[1].close()

    # ------------------------------------------------------------------ indexing

    def _scan_folder(self, folder: Path, parse=RawFile.from_name, walk=_OBS_DIR_RE) -> list:
        """Index the tarballs, loose FITS files and folders (names matching ``walk``)."""
        found = []
        for entry in sorted(folder.iterdir()):
            if entry.is_file() and _tarball_stem(entry.name) is not None:
                found += self._scan_tarball(entry, parse)
            elif (entry.is_dir() and walk.match(entry.name)) or entry.name.endswith(".fits"):
                found += self._scan_tree(entry, folder, parse)
            else:
                log.debug("%s: skipping %s (not an observation tarball or folder)", folder,
                          entry.name)
        return found

    def _scan_tarball(self, path: Path, parse) -> list:
        """List one tarball (opening it exactly once) and keep its handle for reading.

        A tarball damaged part-way is indexed up to the damage: every member whose header
        and data lie before it is kept, the damage is logged and recorded in
        :attr:`problems`. Members whose data run past the end of the file are left out.
        """
        if path.stat().st_size == 0:
            return self._problem(f"{path}: empty file (0 bytes), not a tarball; skipped",
                                 path)
        try:
            tar = tarfile.open(path)  # noqa: SIM115 - kept open in the handle cache
        except _TAR_ERRORS as exc:
            return self._problem(f"{path}: not a readable tarball ({_first_line(exc)}); "
                                 "skipped", path)
        members, damage = _members_until_damage(tar)
        if damage is not None:
            kept = f"{len(members)} members before the damage indexed" if members else \
                "no member readable"
            self._problem(f"{path}: corrupt or truncated tarball ({damage}); {kept}", path)
        if not members:
            tar.close()
            return []
        self._keep(path, tar)
        size = path.stat().st_size if path.name.endswith(".tar") else None  # uncompressed
        found = []
        for info in members:
            if not info.isfile():
                continue
            if size is not None and info.offset_data + info.size > size:
                self._problem(f"{path}:{info.name}: member truncated ({size - info.offset_data}"
                              f" of {info.size} bytes in the file); skipped",
                              f"{path}:{info.name}")
                continue
            item = parse(info.name, path, self.date, info.name)
            if item is None:
                log.debug("%s: skipping member %s (name not recognised)", path, info.name)
                continue
            self._tarinfo[(path, info.name)] = info
            found.append(item)
        return found

    def _problem(self, message: str, file: str | Path) -> list:
        """Log and record an archive problem; returns an empty list for the caller."""
        problem = ArchiveError(message, file=file)
        log.error("%s", problem)
        self.problems.append(problem)
        return []

    def _scan_tree(self, root: Path, base: Path, parse) -> list:
        """Index the FITS files of an unpacked tree (names relative to ``base``)."""
        paths = [root] if root.is_file() else sorted(root.rglob("*.fits"))
        found = []
        for path in paths:
            item = parse(path.relative_to(base).as_posix(), path, self.date, None)
            if item is None:
                log.debug("skipping %s (name not recognised)", path)
            else:
                found.append(item)
        return found

    @staticmethod
    def _dedupe(files: list[RawFile]) -> list[RawFile]:
        """Keep the first copy of each (obsid, exp, ifuslot, amp), warning about the rest."""
        seen: dict[tuple, RawFile] = {}
        for rawfile in files:
            key = (rawfile.obsid, rawfile.exp, rawfile.ifuslot, rawfile.amp)
            if key in seen:
                log.warning("duplicate raw file %s ignored; using %s", rawfile.location,
                            seen[key].location)
            else:
                seen[key] = rawfile
        return sorted(seen.values(), key=lambda f: (f.obsid, f.exp, f.ifuslot, f.amp))

    def _group(self, files: list[RawFile]) -> list[Exposure]:
        groups: dict[tuple[int, int], dict] = {}
        for rawfile in files:
            groups.setdefault((rawfile.obsid, rawfile.exp), {})[
                (rawfile.ifuslot, rawfile.amp)] = rawfile
        out = []
        for (obsid, exp), members in sorted(groups.items()):
            exposure = Exposure(self.date, obsid, exp, members, self)
            if len({f.ftype for f in members.values()}) > 1:
                log.warning("%s: amp files disagree on the frame type; using %r",
                            exposure.name, exposure.ftype)
            out.append(exposure)
        return out


def _first_line(exc: BaseException) -> str:
    """A one-line description of a tarfile error (its multi-line 'tried every method' text
    becomes 'neither tar nor gzip, bzip2 or xz')."""
    text = str(exc)
    if "could not be opened successfully" in text:
        return "neither a tar file nor a gzip, bzip2 or xz compressed one"
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _members_until_damage(tar: tarfile.TarFile) -> tuple[list[tarfile.TarInfo], str | None]:
    """Members of an open tarball read one by one up to the first damage (None: none)."""
    members = []
    while True:
        try:
            info = tar.next()
        except _TAR_ERRORS as exc:
            return members, _first_line(exc)
        if info is None:
            return members, None
        members.append(info)


# --------------------------------------------------------------------------- archive


@dataclass
class CalibrationMatch:
    """Calibration exposures found for a night.

    Attributes
    ----------
    kind : str
        ``bias``, ``twi``, ``flt`` or ``arc``.
    date : str
        Night the calibration was asked for.
    night : str
        Night the exposures come from (the nearest one that had any).
    exposures : list of Exposure
        The matching exposures of ``night``.
    searched : list of str
        Nights looked at, in search order, ending with ``night``.
    """

    kind: str
    date: str
    night: str
    exposures: list[Exposure]
    searched: list[str]

    @property
    def offset(self) -> int:
        """Nights between the requested night and the one used (negative: earlier)."""
        return (_as_date(self.night) - _as_date(self.date)).days


class Archive:
    """A raw archive rooted at ``baseraw``: cached nights and calibration lookup.

    Parameters
    ----------
    baseraw : path
        Root folder holding ``{YYYYMMDD}/lrs2/...``.
    windows : dict, optional
        Calibration search half-widths in nights, overriding :data:`DEFAULT_WINDOWS`.
    """

    def __init__(self, baseraw: str | Path, windows: dict[str, int] | None = None):
        self.baseraw = Path(baseraw)
        self.windows = {**DEFAULT_WINDOWS, **(windows or {})}
        unknown = set(self.windows) - set(CALIBRATION_FTYPES)
        if unknown:
            raise ValueError(f"unknown calibration kinds in windows: {sorted(unknown)}")
        self._nights: dict[str, NightIndex | NoDataError] = {}

    def __repr__(self) -> str:
        return f"<Archive {self.baseraw}>"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the open tarballs of every cached night."""
        for night in self._nights.values():
            if isinstance(night, NightIndex):
                night.close()

    def night(self, date: str | dt.date) -> NightIndex:
        """Index of one night, built on first use and cached (a missing night too).

        Raises
        ------
        NoDataError
            When the night has no LRS2 data.
        """
        date = normalize_date(date)
        if date not in self._nights:
            try:
                self._nights[date] = NightIndex(self.baseraw, date)
            except NoDataError as exc:
                self._nights[date] = exc
        night = self._nights[date]
        if isinstance(night, NoDataError):
            raise NoDataError(str(night))
        return night

    def find_calibration(
        self,
        date: str | dt.date,
        kind: str,
        window: int | None = None,
        channel: str | instrument.Channel | None = None,
    ) -> CalibrationMatch:
        """Calibration exposures of ``kind`` from the nearest night that has any.

        Nights are searched in the order 0, -1, +1, -2, +2, ... up to ``±window`` and
        never across the CCD-controller change; missing nights are skipped.

        Parameters
        ----------
        date : str or date
            Night being reduced, YYYYMMDD.
        kind : str
            ``bias`` (frame type zro), ``twi``, ``flt`` or ``arc`` (frame type cmp).
        window : int, optional
            Half-width in nights; default ``self.windows[kind]``.
        channel : str or Channel, optional
            Only exposures holding this channel.

        Raises
        ------
        CalibrationNotFound
            When no night in the window holds such exposures.
        """
        if kind not in CALIBRATION_FTYPES:
            raise ValueError(f"unknown calibration kind {kind!r}; expected one of "
                             f"{', '.join(CALIBRATION_FTYPES)}")
        date = normalize_date(date)
        window = self.windows[kind] if window is None else window
        ftype = CALIBRATION_FTYPES[kind]
        searched: list[str] = []
        for night in calibration_nights(date, window):
            searched.append(night)
            try:
                index = self.night(night)
            except NoDataError as exc:
                log.debug("calibration search: %s", exc)
                continue
            found = index.exposures(ftype=ftype, channel=channel)
            if found:
                log.info("%s for %s: %d exposures from night %s", kind, date, len(found), night)
                return CalibrationMatch(kind, date, night, found, searched)
            index.close()
        raise CalibrationNotFound(self._not_found_message(date, kind, window, channel, searched),
                                  kind, searched, str(self.baseraw))

    def _not_found_message(self, date, kind, window, channel, searched) -> str:
        ftype = CALIBRATION_FTYPES[kind]
        what = kind if ftype == kind else f"{kind} ({ftype})"
        what += f" exposures of channel {_channel(channel).name}" if channel else " exposures"
        text = (f"no {what} within ±{window} nights of {date} under {self.baseraw}; "
                f"nights searched: {', '.join(searched)}")
        if len(searched) < 2 * window + 1:
            text += f" (calibrations are never mixed across {instrument.CONTROLLER_CHANGE})"
        if not self.baseraw.is_dir():
            text += f"; {self.baseraw} does not exist"
        return text
