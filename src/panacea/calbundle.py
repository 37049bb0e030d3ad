"""The calibration bundle ``cal_{date}_{channel}.fits``: declared layout, writing and reading.

The first fourteen extensions keep the names, order and meaning LRS2 users know; Panacea's
own additions follow them. Every extension is named and carries BUNIT; the primary header
holds the layout version, the inputs (raw exposures used) and a fingerprint of them, so a
rerun can tell whether the bundle is still valid.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.utils.exceptions import AstropyUserWarning

from . import __version__
from .products import Extension, Layout, ProductError, read_product, write_product

#: Version 2: large extensions tile compressed (``Extension.compression``).
LAYOUT_VERSION = 2
#: Bytes hashed at each end of a raw file by :func:`file_digest`.
HASH_BLOCK = 1 << 16


#: Extensions of the calibration bundle, in file order (index = HDU number).
CAL_EXTENSIONS: tuple[Extension, ...] = (
    Extension("wavelength", "wavelength of each fiber at each column", "Angstrom", "float64",
              "280 x ncol", "float"),
    Extension("trace", "stitched-frame row of each fiber at each column", "pixel", "float64",
              "280 x ncol", "float"),
    Extension("flat", "fiber-to-fiber throughput of each fiber at each column", "", "float32",
              "280 x ncol", "unity"),
    Extension("bigw", "wavelength of every pixel of the stitched frame", "Angstrom",
              "float32", "nrow x ncol", "wavelength"),
    Extension("masterbias", "master bias after overscan subtraction", "electron", "float32",
              "nrow x ncol", "master"),
    Extension("xypos", "IFU x, y of each fiber", "arcsec", "float32", "280 x 2"),
    Extension("dead", "1 for a dead fiber", "", "uint8", "280"),
    Extension("arcspec", "extracted master arc (all lamps) per fiber", "electron", "float32",
              "280 x ncol", "master"),
    Extension("twispec", "extracted master twilight per fiber", "electron", "float32",
              "280 x ncol", "master"),
    Extension("flatspec", "extracted master internal flat per fiber", "electron", "float32",
              "280 x ncol", "master"),
    Extension("bigf", "fiber-to-fiber throughput of every pixel", "", "float32",
              "nrow x ncol", "unity"),
    Extension("masterarc", "master arc frame (all lamps)", "electron", "float32",
              "nrow x ncol", "master"),
    Extension("masterflat", "master twilight (or internal flat) frame", "electron", "float32",
              "nrow x ncol", "master"),
    Extension("response", "wavelength and response on the channel grid", "erg / electron",
              "float64", "2 x 2064"),
    # ---- Panacea additions
    Extension("pixelflat", "pixel-to-pixel flat", "", "float32", "nrow x ncol", "unity"),
    Extension("profile", "empirical cross-dispersion profile model", "", "float32",
              "model-defined", "float"),
    Extension("rdnoise", "read noise measured per amplifier", "electron", "float64", "namp"),
    Extension("wavefit", "arc lines used: wavelength, lamp code, fibers used, rms", "",
              "float64", "nline x 4"),
)
#: Extensions the science reduction reads (:class:`panacea.science.ChannelCalibration`):
#: the frame-sized masters, ``bigw`` and ``bigf`` are left compressed on disk.
SCIENCE_EXTENSIONS = ("wavelength", "trace", "flat", "masterbias", "dead", "pixelflat",
                      "profile", "rdnoise")
CAL_LAYOUT = Layout("calibration bundle", LAYOUT_VERSION, "CALVERS", CAL_EXTENSIONS)
CAL_NAMES = CAL_LAYOUT.names


class BundleError(ProductError):
    """A calibration bundle that is missing, unreadable or of another layout."""


@dataclass
class CalibrationBundle:
    """Arrays of a calibration bundle keyed by extension name, plus header metadata."""

    date: str
    channel: str
    arrays: dict[str, np.ndarray]
    inputs: list[str] = field(default_factory=list)  # raw exposures used
    meta: dict = field(default_factory=dict)  # header cards (short keys)
    #: fingerprint of the inputs' content, the options and the pipeline version (see
    #: :func:`content_fingerprint`); empty: from the input names and options only
    fprint: str = ""

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    @property
    def fingerprint(self) -> str:
        return self.fprint or inputs_fingerprint(self.inputs, self.meta.get("OPTIONS", ""))


def inputs_fingerprint(inputs: list[str], options: str = "") -> str:
    """SHA-1 of the sorted input list and the options that shape the calibration."""
    h = hashlib.sha1()
    for item in sorted(inputs):
        h.update(item.encode())
    h.update(options.encode())
    return h.hexdigest()[:16]


def file_digest(path: str | Path, block: int = HASH_BLOCK) -> str:
    """Cheap content digest of one raw file: size, modification time (ns) and a BLAKE2 hash
    of its first and last ``block`` bytes.

    Any rewrite of the file changes its mtime; a replaced or truncated file changes its
    size or its ends. Returns ``missing`` for a file that cannot be read.
    """
    path = Path(path)
    try:
        stat = path.stat()
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as fh:
            h.update(fh.read(block))
            if stat.st_size > block:
                fh.seek(max(block, stat.st_size - block))
                h.update(fh.read(block))
    except OSError:
        return "missing"
    return f"{stat.st_size}:{stat.st_mtime_ns}:{h.hexdigest()}"


def content_fingerprint(inputs: list[str], sources: list[str | Path], options: str = "",
                        version: str = __version__) -> str:
    """Fingerprint of a calibration's inputs by content, its options and the pipeline.

    Parameters
    ----------
    inputs : list of str
        Names of the raw exposures used.
    sources : list of path
        The tarballs or loose files holding them (each digested by :func:`file_digest`).
    options : str
        Description of the options that shape the calibration.
    version : str
        Pipeline version; a new version never reuses an older bundle.
    """
    h = hashlib.sha1()
    for item in sorted(inputs):
        h.update(item.encode() + b"\0")
    for source in sorted(sources, key=lambda p: Path(p).parts[-3:]):
        where = "/".join(Path(source).parts[-3:])  # night/lrs2/file: the archive may move
        h.update(f"{where}={file_digest(source)}\0".encode())
    h.update(f"options={options}\0version={version}".encode())
    return h.hexdigest()[:16]


def bundle_path(root: str | Path, date: str, channel: str) -> Path:
    """``{root}/CALS/cal_{date}_{channel}.fits``."""
    return Path(root) / "CALS" / f"cal_{date}_{channel}.fits"


def write_bundle(bundle: CalibrationBundle, path: str | Path) -> Path:
    """Write the bundle atomically in the declared layout (missing arrays are empty HDUs)."""
    header = fits.Header()
    header["CALDATE"] = (bundle.date, "night of the calibration")
    header["CHANNEL"] = (bundle.channel, "LRS2 channel")
    header["CALFP"] = (bundle.fingerprint, "fingerprint of inputs and options")
    header["NINPUTS"] = (len(bundle.inputs), "raw exposures used")
    for i, item in enumerate(bundle.inputs):
        header[f"HIERARCH PAN INPUT {i}"] = item[:60]
    for key, value in bundle.meta.items():
        header[f"HIERARCH PAN {key}"] = value
    return write_product(CAL_LAYOUT, bundle.arrays, path, header)


def verify_bundle(path: str | Path) -> None:
    """Check every HDU's CHECKSUM and DATASUM and that the file holds all its data.

    Raises
    ------
    BundleError
        Naming the file and the first HDU that is truncated, unreadable, lacks checksums or
        fails them.
    """
    path = Path(path)
    try:
        with fits.open(path, memmap=False, lazy_load_hdus=False,
                       disable_image_compression=True) as hdul:  # sums of the stored bytes
            for i, hdu in enumerate(hdul):
                name = hdu.name or str(i)
                if "CHECKSUM" not in hdu.header or "DATASUM" not in hdu.header:
                    raise _bad(path, f"HDU {i} ({name}) has no checksum cards")
                if hdu.verify_datasum() != 1:
                    raise _bad(path, f"HDU {i} ({name}) fails its data checksum (bytes changed "
                               "or truncated)")
                if hdu.verify_checksum() != 1:
                    raise _bad(path, f"HDU {i} ({name}) fails its checksum (header or data "
                               "bytes changed)")
    except BundleError:
        raise
    except (OSError, ValueError, TypeError, IndexError, EOFError) as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise _bad(path, f"damaged or truncated calibration bundle ({type(err).__name__}: "
                   f"{first})") from err


def _bad(path: Path, problem: str) -> BundleError:
    return BundleError(f"{path}: {problem}", file=path)


def read_bundle(path: str | Path, verify: bool = True,
                names: tuple[str, ...] | None = None) -> CalibrationBundle:
    """Read a bundle, checking its checksums (``verify``), layout version and extension
    names.

    ``names`` limits the arrays read (decompressed) to those extensions, e.g.
    :data:`SCIENCE_EXTENSIONS` (default: all); the checks cover the whole file either way.

    Raises
    ------
    BundleError
        When the file is missing, truncated, fails its checksums or has another layout.
    """
    if verify:
        verify_bundle(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AstropyUserWarning)
            # the sums are checked above (verify), not again on opening
            arrays, prim = read_product(CAL_LAYOUT, path, names=names, checksum=False)
        inputs = [prim[f"HIERARCH PAN INPUT {i}"] for i in range(prim.get("NINPUTS", 0))]
        meta = {k.replace("PAN ", "", 1): v for k, v in prim.items()
                if k.startswith("PAN ") and not k.startswith("PAN INPUT")}
        return CalibrationBundle(str(prim["CALDATE"]), str(prim["CHANNEL"]), arrays, inputs,
                                 meta, str(prim.get("CALFP", "")))
    except ProductError as err:
        raise BundleError(str(err), file=path) from err
    except (OSError, ValueError, TypeError, KeyError, IndexError) as err:
        raise _bad(Path(path), f"unreadable calibration bundle ({type(err).__name__}: "
                   f"{err})") from err
