"""Product data model: declared FITS layouts, where products go, writing and checked reading.

Every product is a list of named extensions in a fixed order (downstream tools such as
LRS2Multi open them by *position*), each with a unit, a dtype and a storage kind
(:data:`COMPRESSIONS`, each with the largest change it may make). A layout carries a version
that is written into the primary header and checked when the file is read back.
:data:`MULTI_CONTRACT` and :data:`CONTRACT_CARDS` state what a positional reader may rely on
(docs/products.md; ``tests/test_contract.py`` reads products as such a tool does).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import astropy.units as u
import numpy as np
from astropy.coordinates import Angle
from astropy.io import fits
from astropy.time import Time

from .errors import PanaceaError
from .fluxcal import FLUX_UNIT
from .io_utils import write_fits_atomic
from .provenance import stamp

log = logging.getLogger(__name__)


#: Cards of a raw header that describe its own data layout and must not be copied.
_STRUCTURAL = {"SIMPLE", "BITPIX", "EXTEND", "BZERO", "BSCALE", "BLANK", "BUNIT", "CHECKSUM",
               "DATASUM", "PCOUNT", "GCOUNT", "XTENSION", "EXTNAME", "COMMENT", "HISTORY", ""}


class ProductError(PanaceaError):
    """A product that is missing, unreadable or of another layout."""


@dataclass(frozen=True)
class Extension:
    """One declared extension: name, meaning, unit, dtype, shape rule and storage.

    ``compression`` is one of :data:`COMPRESSIONS` (None: a plain image); the error each
    kind may add is stated there and in docs/products.md.
    """

    name: str
    description: str
    unit: str
    dtype: str
    shape: str  # human-readable shape, e.g. "280 x ncol"
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


#: Storage kinds of an extension and the largest change each makes to a value.
COMPRESSIONS = {
    "lossless": "integers or masks, RICE_1: exact",
    "float": "floats, GZIP_2 with byte shuffling: exact",
    "wavelength": "HCOMPRESS_1 of the values in steps of WAVELENGTH_STEP (1e-4 A), below "
                  "half the float32 spacing of an LRS2 wavelength: exact for float32",
    "frame": "RICE_1, dithered steps of FRAME_STEP (0.5 e-): |change| <= 0.25 e-, RMS "
             "0.14 e- (5 % of a 3 e- read noise in quadrature: +0.1 % variance)",
    "master": "RICE_1, dithered steps of MASTER_STEP (0.25 e-): |change| <= 0.125 e-",
    "unity": "RICE_1, dithered steps of UNITY_STEP (1e-4) for flats near 1: "
             "|change| <= 5e-5",
    "trace": "RICE_1, steps of TRACE_STEP (1e-3 px): |change| <= 5e-4 px",
    "sigma": "RICE_1, dithered steps of SIGMA_FRACTION (1/16) of the 1st percentile of the "
             "product's errors (card QSTEP): |change| <= sigma / 32 for 99 % of the pixels, "
             "RMS <= sigma / 55",
    "error": "errors themselves, RICE_1, dithered steps of ERROR_FRACTION (1/1024) of their "
             "1st percentile (card QSTEP): relative change <= 5e-4 for 99 % of the pixels",
    "noise": "RICE_1, tiles of NOISE_PLANES cube planes, dithered steps of 1/NOISE_Q (1/32) "
             "of the pixel-to-pixel noise cfitsio measures in each tile: |change| <= "
             "sigma_tile / 64",
    "reference": "not stored here: an empty extension whose header names the file and "
                 "extension holding the data (CALFILE, CALEXT)",
}

#: Quantisation step (electrons) of science frame images (``image``, ``flattened_image``):
#: 1/6 of a 3 e- read noise; the sky and the source only add noise.
FRAME_STEP = 0.5
#: Quantisation step (electrons) of master calibration frames in the bundle.
MASTER_STEP = 0.25
#: Quantisation step of dimensionless flats near 1 (pixel flat, fiber-to-fiber image).
UNITY_STEP = 1e-4
#: Quantisation step (pixel) of traces.
TRACE_STEP = 1e-3
#: Quantisation step (Angstrom) of wavelength images: below half the float32 spacing of any
#: LRS2 wavelength (>= 2.4e-4 A above 2048 A), so the stored values are exact.
WAVELENGTH_STEP = 1e-4
#: Steps per noise sigma of "noise" compressed cubes (cfitsio quantize_level).
NOISE_Q = 32.0
#: Cube planes per "noise" compression tile.
NOISE_PLANES = 64
#: Step of "sigma" compressed spectra, in units of the 1st percentile of the errors.
SIGMA_FRACTION = 1.0 / 16.0
#: Step of "error" compressed errors, in units of their 1st percentile.
ERROR_FRACTION = 1.0 / 1024.0
#: Extension holding the errors that set the steps of "sigma" and "error" extensions.
ERROR_EXTENSION = "error_spectra"
#: Rows per compression tile of 2-D images (larger tiles write faster; 128 rows: -25 %).
TILE_ROWS = 128
#: Values per compression tile of a 3-D image (whole planes, e.g. the bundle's ``profile``
#: of 280 planes of 17 x 321): one tile per plane made the reading of a profile 0.06 s, of
#: which 0.03 s per-tile overhead; tiles of ~24 planes read in 0.03 s and are 17 % smaller.
TILE_VALUES_3D = 1 << 17

#: The per-fiber science product ``multi_{date}_{obsid7}_exp{NN}_{channel}.fits``.
#: Version 2: ``adr`` is 3 x n (was n x 3), extensions 6 and 7 are always filled, ``bigw``
#: is a reference to the calibration bundle, spectra and frames are tile compressed.
MULTI_LAYOUT = Layout("multi", 2, "MULTIVER", (
    Extension("observed_spectra", "flux-calibrated object+sky per fiber on the grid",
              FLUX_UNIT, "float32", "280 x 2064"),
    Extension("sky_spectra", "sky model per fiber on the grid", FLUX_UNIT,
              "float32", "280 x 2064", "sigma"),
    Extension("skysub_spectra", "sky-subtracted spectra per fiber on the grid",
              FLUX_UNIT, "float32", "280 x 2064", "sigma"),
    Extension("error_spectra", "1-sigma error per fiber; 0 marks a bad pixel",
              FLUX_UNIT, "float32", "280 x 2064", "error"),
    Extension("collapsed_image", "sky-subtracted image over the collapse window",
              FLUX_UNIT, "float32", "ny x nx"),
    Extension("fiber_positions", "IFU x, IFU y, focal x, focal y, RA, Dec", "arcsec / deg",
              "float64", "280 x 6"),
    Extension("extracted_spectrum", "wavelength, F_lambda, sky, error, sky error, response",
              "mixed", "float64", "6 x 2064"),
    Extension("adr", "rows: wavelength, x offset, y offset of the refraction track",
              "Angstrom / arcsec", "float64", "3 x n"),
    Extension("bigw", "wavelength of every CCD pixel (in the calibration bundle)",
              "Angstrom", "float32", "nrow x ncol", "reference"),
    Extension("image", "bias-subtracted 2-D frame", "electron", "float32", "nrow x ncol",
              "frame"),
    Extension("flattened_image", "bias-subtracted frame divided by the pixel flat",
              "electron", "float32", "nrow x ncol", "frame"),
    Extension("trace", "stitched-frame row of each fiber at each column", "pixel", "float32",
              "280 x ncol", "trace"),
    Extension("cosmics", "1 where a cosmic ray was found", "", "uint8", "nrow x ncol",
              "lossless"),
    Extension("unrectified_spectra", "extracted spectra on native pixels", "electron",
              "float32", "280 x ncol", "frame"),
))

#: What a reading tool may rely on in ``multi_*`` files (LRS2Multi opens them by position):
#: extension number -> (name, shape; "n" is any length).
MULTI_CONTRACT = {
    0: ("observed_spectra", (280, 2064)),
    3: ("error_spectra", (280, 2064)),  # 0 marks a bad pixel
    5: ("fiber_positions", (280, 6)),  # IFU x, y in columns 0, 1; RA, Dec in 4, 5
    6: ("extracted_spectrum", (6, 2064)),  # row 0 wavelength, last row response
    7: ("adr", (3, "n")),  # rows wavelength, x, y (arcsec)
}
#: Primary cards every ``multi``, ``spectrum`` and cube file carries (with the raw cards).
CONTRACT_CARDS = ("OBJECT", "EXPTIME", "DATE", "QRA", "QDEC", "QOBJECT", "QPROG", "PARANGLE",
                  "MILLUM", "THROUGHP")


def error_floor(error: np.ndarray) -> float | None:
    """The 1st percentile of the positive, finite values of ``error`` (None if there are
    none): the error scale that sets the quantisation steps of "sigma"/"error" storage."""
    e = np.asarray(error, float)
    e = e[np.isfinite(e) & (e > 0)]
    return float(np.percentile(e, 1)) if e.size else None


def compressed_hdu(data: np.ndarray, kind: str, floor: float | None = None
                   ) -> fits.CompImageHDU:
    """A tile-compressed image HDU (read back transparently by astropy and cfitsio).

    ``kind`` is one of :data:`COMPRESSIONS`; "sigma" and "error" need ``floor``, the error
    scale from :func:`error_floor` (without one they are stored as "noise")."""
    integer = np.issubdtype(data.dtype, np.integer)
    if kind in ("sigma", "error"):
        if floor is None or not floor > 0:
            kind = "noise"
        else:
            step = floor * (SIGMA_FRACTION if kind == "sigma" else ERROR_FRACTION)
            hdu = fits.CompImageHDU(data, compression_type="RICE_1", quantize_level=-step,
                                    quantize_method=2, dither_seed=1, tile_shape=_tile(data))
            hdu.header["QSTEP"] = (step, "quantisation step of the stored values")
            return hdu
    if kind == "lossless" and integer:
        return fits.CompImageHDU(data, compression_type="RICE_1", tile_shape=_tile(data))
    if integer:
        raise ValueError(f"no {kind!r} compression for {data.dtype} images")
    steps = {"frame": FRAME_STEP, "master": MASTER_STEP, "unity": UNITY_STEP}
    if kind in steps:
        return fits.CompImageHDU(data, compression_type="RICE_1", quantize_level=-steps[kind],
                                 quantize_method=2, dither_seed=1, tile_shape=_tile(data))
    if kind == "trace":
        return fits.CompImageHDU(data, compression_type="RICE_1", quantize_level=-TRACE_STEP,
                                 quantize_method=-1, tile_shape=_tile(data))
    if kind == "wavelength":
        return fits.CompImageHDU(data, compression_type="HCOMPRESS_1", hcomp_scale=0,
                                 quantize_level=-WAVELENGTH_STEP, quantize_method=-1,
                                 tile_shape=_tile(data))
    if kind == "noise":
        tile = (min(NOISE_PLANES, data.shape[0]),) + data.shape[1:] if data.ndim == 3 \
            else _tile(data)
        return fits.CompImageHDU(data, compression_type="RICE_1", quantize_level=NOISE_Q,
                                 quantize_method=2, dither_seed=1, tile_shape=tile)
    if kind == "float":
        return fits.CompImageHDU(data, compression_type="GZIP_2", quantize_level=0.0,
                                 tile_shape=_tile(data))
    raise ValueError(f"unknown compression {kind!r}")


def _tile(data: np.ndarray) -> tuple[int, ...]:
    """Tiles of TILE_ROWS rows; of whole planes, about TILE_VALUES_3D values, for a 3-D
    image (a cube's "noise" storage has its own tiles, see :func:`compressed_hdu`)."""
    if data.ndim == 1:
        return (data.shape[0],)
    if data.ndim == 2:
        return (min(TILE_ROWS, data.shape[0]), data.shape[1])
    plane = int(np.prod(data.shape[-2:]))
    planes = max(1, min(data.shape[-3], TILE_VALUES_3D // max(plane, 1)))
    return (1,) * (data.ndim - 3) + (planes,) + data.shape[-2:]


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
    flux calibrated). The primary header holds no free text (LRS2Multi copies its cards one
    by one and stops at COMMENT or HISTORY): the description of extension 0 and the COMMENT
    and HISTORY cards of ``header`` go to extension 1 (dropped from one-HDU products)."""
    unknown = set(arrays) - set(layout.names)
    if unknown:
        raise ValueError(f"arrays not in the {layout.kind} layout: {sorted(unknown)}")
    header = header if header is not None else fits.Header()
    err = arrays.get(ERROR_EXTENSION)
    floor = error_floor(err) if err is not None else None
    hdus = []
    for i, ext in enumerate(layout.extensions):
        data = arrays.get(ext.name)
        if data is not None:
            data = np.asarray(data, dtype=ext.dtype)
        if i == 0:
            hdu = fits.PrimaryHDU(data)
        elif ext.compression and ext.compression != "reference" and data is not None:
            hdu = compressed_hdu(data, ext.compression, floor)
        else:
            hdu = fits.ImageHDU(None if ext.compression == "reference" else data)
        hdu.name = ext.name.upper()
        hdu.header["EXTNAME"] = ext.name
        hdu.header["BUNIT"] = (units or {}).get(ext.name, ext.unit)
        if ext.compression:
            hdu.header["STORAGE"] = (ext.compression, "how stored: see docs/products.md")
        if ext.compression == "reference":
            hdu.header["CALFILE"] = (str(header.get("CALFILE", ""))[:50],
                                     "file holding this extension's data")
            hdu.header["CALEXT"] = (ext.name, "extension of CALFILE holding the data")
        if i > 0:
            hdu.header["COMMENT"] = ext.description
        hdus.append(hdu)
    prim = hdus[0].header
    for card in header.cards:
        key = card.keyword
        if key in ("COMMENT", "HISTORY"):
            if len(hdus) > 1:
                hdus[1].header.append(card, end=True)
            continue
        if key in prim or key in _STRUCTURAL or key.startswith("NAXIS"):
            continue
        prim.append(card, end=True)
    if len(hdus) > 1:
        hdus[1].header["HISTORY"] = f"extension 0 ({layout.extensions[0].name}): "
        hdus[1].header["HISTORY"] = layout.extensions[0].description
    prim[layout.version_card] = (layout.version, f"{layout.kind} layout version")
    stamp(prim, options)
    return write_fits_atomic(fits.HDUList(hdus), path)


def read_product(layout: Layout, path: str | Path, names: tuple[str, ...] | None = None,
                 checksum: bool = True) -> tuple[dict[str, np.ndarray], fits.Header]:
    """Read a product, checking its layout version and extension names and order.

    ``names`` limits the arrays decompressed and returned to those extensions (default
    all); ``checksum`` False skips astropy's checksum test on opening (for a caller that has
    verified the file's sums already)."""
    path = Path(path)
    try:
        hdul = fits.open(path, checksum=checksum)
    except (OSError, ValueError) as err:
        raise ProductError(f"{path}: cannot read {layout.kind} product ({err})") from err
    with hdul:
        prim = hdul[0].header
        version = prim.get(layout.version_card)
        if version != layout.version:
            raise ProductError(f"{path}: {layout.kind} layout version {version}, expected "
                               f"{layout.version}")
        found = tuple(str(h.header.get("EXTNAME", h.name)).lower() for h in hdul)
        if found != layout.names:
            raise ProductError(f"{path}: extensions {found} differ from the layout "
                               f"{layout.names}")
        wanted = set(found if names is None else names)
        if wanted - set(found):
            raise ProductError(f"{path}: no extension {sorted(wanted - set(found))} in the "
                               f"{layout.kind} layout {layout.names}")
        arrays = {}
        for n, h in zip(found, hdul):
            if n in wanted and h.data is not None:
                arrays[n] = np.asarray(h.data)
        return arrays, prim.copy()


def _sexagesimal(value, unit) -> str | None:
    """A card value (degrees, or a sexagesimal string in ``unit``) as a sexagesimal string
    (hours for RA, degrees with sign for Dec); None when it is not an angle."""
    try:
        if isinstance(value, str) and ":" in value:
            angle = Angle(value.strip(), unit=unit)
        else:
            angle = Angle(float(value), unit=u.deg)
    except (TypeError, ValueError):
        return None
    if not np.isfinite(angle.deg):
        return None
    if unit is u.hourangle:
        return angle.wrap_at(360 * u.deg).to_string(unit=u.hourangle, sep=":", precision=2,
                                                    pad=True)
    return angle.to_string(unit=u.deg, sep=":", precision=1, pad=True, alwayssign=True)


def complete_header(header: fits.Header) -> fits.Header:
    """A copy of a raw header with the queue cards real LRS2 frames carry (QRA, QDEC,
    QOBJECT, DATE), derived where the frame lacks them, each derived card saying
    "derived from ..." in its comment.

    QRA/QDEC come from RA/DEC, else TRAJRA/TRAJDEC (degrees or sexagesimal); QOBJECT from
    OBJECT; DATE (ISO date-time of the exposure start) from DATE-OBS and UT. A card that
    cannot be derived is left out (and logged)."""
    h = header.copy()
    for key, sources, unit in (("QRA", ("RA", "TRAJRA"), u.hourangle),
                               ("QDEC", ("DEC", "TRAJDEC"), u.deg)):
        if key in h:
            continue
        for src in sources:
            value = _sexagesimal(h[src], unit) if src in h else None
            if value is not None:
                h[key] = (value, f"derived from {src}")
                break
        else:
            log.debug("no %s and nothing to derive it from", key)
    if "QOBJECT" not in h and "OBJECT" in h:
        h["QOBJECT"] = (str(h["OBJECT"]), "derived from OBJECT")
    if "DATE" not in h and "DATE-OBS" in h:
        date = str(h["DATE-OBS"]).strip()
        if "T" not in date and "UT" in h:
            date = f"{date}T{str(h['UT']).strip()}"
        try:
            iso = Time(date, format="isot" if "T" in date else "iso", scale="utc").isot
        except ValueError:
            log.warning("DATE-OBS/UT %r is not a date: no DATE card", date)
        else:
            h["DATE"] = (iso[:21], "derived from DATE-OBS and UT" if "UT" in h
                         else "derived from DATE-OBS")
    return h
