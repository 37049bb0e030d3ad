"""Product data model: declared FITS layouts, where products go, writing and checked reading.

Every product is a list of named extensions in a fixed order (downstream tools such as
LRS2Multi open them by *position*), each with a unit and a dtype. A layout carries a version
that is written into the primary header and checked when the file is read back.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits

from .errors import PanaceaError
from .fluxcal import FLUX_UNIT
from .io_utils import write_fits_atomic
from .provenance import stamp


#: Cards of a raw header that describe its own data layout and must not be copied.
_STRUCTURAL = {"SIMPLE", "BITPIX", "EXTEND", "BZERO", "BSCALE", "BLANK", "BUNIT", "CHECKSUM",
               "DATASUM", "PCOUNT", "GCOUNT", "XTENSION", "EXTNAME", "COMMENT", "HISTORY", ""}


class ProductError(PanaceaError):
    """A product that is missing, unreadable or of another layout."""


@dataclass(frozen=True)
class Extension:
    """One declared extension: name, meaning, unit, dtype, shape rule."""

    name: str
    description: str
    unit: str
    dtype: str
    shape: str  # human-readable shape, e.g. "280 x ncol"
    #: FITS tile compression: None; "lossless" (RICE_1, integer images);
    #: "wavelength" (RICE_1 at a step below float32 precision: exact); "noise" (RICE_1 with
    #: floats quantised in steps of NOISE_STEP electrons, invisible next to the noise)
    compression: str | None = None


@dataclass(frozen=True)
class Layout:
    """An ordered, versioned list of extensions, with the header card holding its version."""

    kind: str
    version: int
    version_card: str
    extensions: tuple[Extension, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.extensions)


#: The per-fiber science product ``multi_{date}_{obsid7}_exp{NN}_{channel}.fits``.
MULTI_LAYOUT = Layout("multi", 1, "MULTIVER", (
    Extension("observed_spectra", "flux-calibrated object+sky per fiber on the grid",
              FLUX_UNIT, "float32", "280 x 2064"),
    Extension("sky_spectra", "sky model per fiber on the grid", FLUX_UNIT,
              "float32", "280 x 2064"),
    Extension("skysub_spectra", "sky-subtracted spectra per fiber on the grid",
              FLUX_UNIT, "float32", "280 x 2064"),
    Extension("error_spectra", "1-sigma error per fiber; 0 marks a bad pixel",
              FLUX_UNIT, "float32", "280 x 2064"),
    Extension("collapsed_image", "sky-subtracted image over the collapse window",
              FLUX_UNIT, "float32", "ny x nx"),
    Extension("fiber_positions", "IFU x, IFU y, focal x, focal y, RA, Dec", "arcsec / deg",
              "float64", "280 x 6"),
    Extension("extracted_spectrum", "wavelength, F_lambda, sky, error, sky error, response",
              "mixed", "float64", "6 x 2064"),
    Extension("adr", "wavelength, x offset, y offset of the refraction track",
              "Angstrom / arcsec", "float64", "n x 3"),
    Extension("bigw", "wavelength of every CCD pixel", "Angstrom", "float32", "nrow x ncol",
              "wavelength"),
    Extension("image", "bias-subtracted 2-D frame", "electron", "float32", "nrow x ncol",
              "noise"),
    Extension("flattened_image", "bias-subtracted frame divided by the pixel flat",
              "electron", "float32", "nrow x ncol", "noise"),
    Extension("trace", "stitched-frame row of each fiber at each column", "pixel", "float32",
              "280 x ncol"),
    Extension("cosmics", "1 where a cosmic ray was found", "", "uint8", "nrow x ncol",
              "lossless"),
    Extension("unrectified_spectra", "extracted spectra on native pixels", "electron",
              "float32", "280 x ncol"),
))


#: Quantisation step (electrons) of frame images stored with "noise" compression: 1/12 of
#: a 3 e- read noise, an added error of 0.07 e- RMS.
NOISE_STEP = 0.25
#: Quantisation step (Angstrom) of wavelength images: below half the float32 spacing of any
#: LRS2 wavelength (>= 2.4e-4 A above 2048 A), so the stored values are exact.
WAVELENGTH_STEP = 1e-4
#: Rows per compression tile.
TILE_ROWS = 32


def _compressed(data: np.ndarray, kind: str) -> fits.CompImageHDU:
    """A tile-compressed image HDU (read back transparently by astropy and cfitsio)."""
    tile = (min(TILE_ROWS, data.shape[0]), data.shape[1])
    if kind == "noise":
        return fits.CompImageHDU(data, compression_type="RICE_1", quantize_level=-NOISE_STEP,
                                 quantize_method=1, dither_seed=1, tile_shape=tile)
    if kind == "wavelength":
        return fits.CompImageHDU(data, compression_type="RICE_1",
                                 quantize_level=-WAVELENGTH_STEP, quantize_method=-1,
                                 tile_shape=tile)
    if kind == "lossless" and np.issubdtype(data.dtype, np.integer):
        return fits.CompImageHDU(data, compression_type="RICE_1", tile_shape=tile)
    raise ValueError(f"no {kind!r} compression for {data.dtype} images")


#: Compressed extensions of frozen arrays (see :func:`_frozen`), as FITS bytes by array:
#: the calibration's wavelength image is the same in every exposure of a channel, and
#: compressing it takes ~50 ms of the ~0.25 s a ``multi`` file takes to write.
_FROZEN_HDUS: dict = {}
_FROZEN_CACHE_SIZE = 4


def _frozen(data: np.ndarray) -> bool:
    """True when neither ``data`` nor any array it views can be written to."""
    a = data
    while isinstance(a, np.ndarray):
        if a.flags.writeable:
            return False
        a = a.base
    return a is None


def _compressed_hdu(data: np.ndarray, kind: str) -> fits.CompImageHDU | fits.BinTableHDU:
    """:func:`_compressed`, compressed once per frozen array: later calls copy the stored
    tile table (a binary table with ZIMAGE = T, which readers open as the image)."""
    if not _frozen(data):
        return _compressed(data, kind)
    key = (id(data), kind)
    entry = _FROZEN_HDUS.get(key)
    if entry is None or entry[0] is not data:
        buf = io.BytesIO()
        fits.HDUList([fits.PrimaryHDU(), _compressed(data, kind)]).writeto(buf)
        while len(_FROZEN_HDUS) >= _FROZEN_CACHE_SIZE:
            _FROZEN_HDUS.pop(next(iter(_FROZEN_HDUS)))
        _FROZEN_HDUS[key] = entry = (data, buf.getvalue())  # holds data: id stays unique
    return fits.open(io.BytesIO(entry[1]), disable_image_compression=True)[1]


def multi_name(date: str, obsid: int, exp: int, channel: str) -> str:
    """``multi_{date}_{obsid7}_exp{NN}_{channel}.fits``."""
    return f"multi_{date}_{obsid:07d}_exp{exp:02d}_{channel}.fits"


def product_folder(root: str | Path, program: str | None, is_standard: bool) -> Path:
    """``LRS2/{QPROG}``, ``LRS2/STANDARDS`` (standards without program) or ``LRS2/ORPHANS``."""
    root = Path(root)
    if program:
        return root / program
    return root / ("STANDARDS" if is_standard else "ORPHANS")


def write_product(layout: Layout, arrays: dict[str, np.ndarray | None], path: str | Path,
                  header: fits.Header | None = None, options: dict | None = None,
                  units: dict[str, str] | None = None) -> Path:
    """Write arrays in ``layout`` order (missing ones as empty HDUs), atomically, with
    checksums, BUNIT on every extension and provenance in the primary header.

    ``units`` overrides the declared unit of some extensions (e.g. spectra that are not yet
    flux calibrated)."""
    unknown = set(arrays) - set(layout.names)
    if unknown:
        raise ValueError(f"arrays not in the {layout.kind} layout: {sorted(unknown)}")
    hdus = []
    for i, ext in enumerate(layout.extensions):
        data = arrays.get(ext.name)
        if data is not None:
            data = np.asarray(data, dtype=ext.dtype)
        if i == 0:
            hdu = fits.PrimaryHDU(data)
        elif ext.compression and data is not None:
            hdu = _compressed_hdu(data, ext.compression)
        else:
            hdu = fits.ImageHDU(data)
        hdu.name = ext.name.upper()
        hdu.header["EXTNAME"] = ext.name
        hdu.header["BUNIT"] = (units or {}).get(ext.name, ext.unit)
        hdu.header["COMMENT"] = ext.description
        hdus.append(hdu)
    prim = hdus[0].header
    if header is not None:
        for card in header.cards:
            key = card.keyword
            if key in prim or key in _STRUCTURAL or key.startswith("NAXIS"):
                continue
            prim.append(card, end=True)
    prim[layout.version_card] = (layout.version, f"{layout.kind} layout version")
    stamp(prim, options)
    return write_fits_atomic(fits.HDUList(hdus), path)


def read_product(layout: Layout, path: str | Path) -> tuple[dict[str, np.ndarray], fits.Header]:
    """Read a product, checking its layout version and extension names and order."""
    path = Path(path)
    try:
        hdul = fits.open(path, checksum=True)
    except (OSError, ValueError) as err:
        raise ProductError(f"{path}: cannot read {layout.kind} product ({err})") from err
    with hdul:
        prim = hdul[0].header
        version = prim.get(layout.version_card)
        if version != layout.version:
            raise ProductError(f"{path}: {layout.kind} layout version {version}, expected "
                               f"{layout.version}")
        names = tuple(str(h.header.get("EXTNAME", h.name)).lower() for h in hdul)
        if names != layout.names:
            raise ProductError(f"{path}: extensions {names} differ from the layout "
                               f"{layout.names}")
        arrays = {n: np.asarray(h.data) for n, h in zip(names, hdul) if h.data is not None}
        return arrays, prim.copy()
