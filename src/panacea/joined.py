"""Spectra of one observation: exposures combined per channel, channels joined into one.

* :func:`combine_exposures`: inverse-variance mean of the exposures of one channel, with
  pixels more than :data:`REJECT_SIGMA` from the median of the exposures rejected (three or
  more exposures), or the higher of two discrepant values dropped (two exposures: a
  cosmic-ray or sky residual is positive far more often than negative).
* :func:`join_channels`: the four channels in wavelength order, each scaled to match its
  blue neighbour in their overlap (median ratio), cut at the middle of each overlap.
* :func:`write_joined`: a FITS binary table (wavelength, flux, error, sky, channel) with
  units, readable by ``specutils.Spectrum1D.read(path, format="tabular-fits")``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from astropy.io import fits

from .io_utils import write_fits_atomic
from .provenance import stamp

log = logging.getLogger(__name__)

REJECT_SIGMA = 5.0
CHANNEL_ORDER = ("uv", "orange", "red", "farred")
#: Fewest good pixels in an overlap to measure a scale between channels.
MIN_OVERLAP = 5


def combine_exposures(flux: list[np.ndarray], error: list[np.ndarray],
                      sky: list[np.ndarray] | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse-variance mean of exposures on one grid (error 0 marks a bad pixel)."""
    f, e = np.array(flux, float), np.array(error, float)
    s = np.array(sky, float) if sky is not None else np.zeros_like(f)
    good = e > 0
    if len(f) >= 3:
        med = np.nanmedian(np.where(good, f, np.nan), axis=0)
        good &= np.abs(f - med) < REJECT_SIGMA * np.where(good, e, np.inf)
    elif len(f) == 2:
        both = good.all(axis=0)
        diff = np.abs(f[0] - f[1]) > REJECT_SIGMA * np.hypot(e[0], e[1])
        drop = both & diff
        higher = np.argmax(f, axis=0)
        for k in range(2):
            good[k] &= ~(drop & (higher == k))
    w = np.where(good, 1.0 / np.where(good, e, 1.0) ** 2, 0.0)
    wsum = w.sum(axis=0)
    ok = wsum > 0
    mean = np.divide((w * f).sum(axis=0), wsum, out=np.zeros(f.shape[1]), where=ok)
    skym = np.divide((w * s).sum(axis=0), wsum, out=np.zeros(f.shape[1]), where=ok)
    err = np.divide(1.0, np.sqrt(wsum), out=np.zeros(f.shape[1]), where=ok)
    return mean, err, skym


def join_channels(parts: dict[str, tuple[np.ndarray, ...]]) -> dict[str, np.ndarray | dict]:
    """Join channel spectra ``{name: (wave, flux, error, sky)}`` into one spectrum.

    Each channel after the first is scaled by the median ratio of its blue neighbour to it
    in their overlap (1 when the overlap has too few good pixels); the spectra are cut at
    the middle of each overlap."""
    names = [n for n in CHANNEL_ORDER if n in parts]
    scales = {}
    prev = None
    pieces = []
    for i, name in enumerate(names):
        wave, flux, err, sky = (np.asarray(a, float) for a in parts[name])
        scale = 1.0
        if prev is not None:
            pw, pf, pe, _ = prev
            lo, hi = max(wave[0], pw[0]), min(wave[-1], pw[-1])
            sel = (wave >= lo) & (wave <= hi) & (err > 0)
            ref = np.interp(wave[sel], pw, pf)
            refe = np.interp(wave[sel], pw, pe)
            use = refe > 0
            if use.sum() >= MIN_OVERLAP and np.median(flux[sel][use]) > 0:
                scale = float(np.median(ref[use]) / np.median(flux[sel][use]))
            else:
                log.info("join: %s overlap with its blue neighbour too small; not scaled", name)
        flux, err, sky = flux * scale, err * scale, sky * scale
        scales[name] = scale
        lo = 0.5 * (wave[0] + prev[0][-1]) if prev is not None else -np.inf
        nxt = names[i + 1] if i + 1 < len(names) else None
        hi = 0.5 * (wave[-1] + parts[nxt][0][0]) if nxt is not None else np.inf
        keep = (wave >= lo) & (wave < hi)
        pieces.append((wave[keep], flux[keep], err[keep], sky[keep],
                       np.full(keep.sum(), CHANNEL_ORDER.index(name))))
        prev = (wave, flux, err, sky)
    cols = [np.concatenate(c) for c in zip(*pieces)]
    return {"wave": cols[0], "flux": cols[1], "error": cols[2], "sky": cols[3],
            "channel": cols[4].astype(np.int16), "scales": scales}


def write_joined(path: str | Path, joined: dict, unit: str, header: fits.Header | None = None,
                 options: dict | None = None) -> Path:
    """Write a joined spectrum as a FITS table with units (specutils ``tabular-fits``)."""
    cols = [
        fits.Column("wavelength", "D", unit="Angstrom", array=joined["wave"]),
        fits.Column("flux", "D", unit=unit, array=joined["flux"]),
        fits.Column("error", "D", unit=unit, array=joined["error"]),
        fits.Column("sky", "D", unit=unit, array=joined["sky"]),
        fits.Column("channel", "I", array=joined["channel"]),
    ]
    table = fits.BinTableHDU.from_columns(cols, name="SPECTRUM")
    prim = fits.PrimaryHDU()
    if header is not None:
        for key in ("OBJECT", "QPROG", "DATE-OBS", "TRAJRA", "TRAJDEC", "OBSID", "DATE", "QRA",
                    "QDEC", "QOBJECT"):
            if key in header:
                prim.header[key] = header[key]
    for name, scale in joined["scales"].items():
        prim.header[f"SCL_{name.upper()[:4]}"] = (round(scale, 5), f"scale applied to {name}")
    # free text in the table's header, never the primary's (tools copy primary cards)
    table.header["COMMENT"] = "channel: 0 uv, 1 orange, 2 red, 3 farred; air wavelengths"
    stamp(prim.header, options)
    return write_fits_atomic(fits.HDUList([prim, table]), path)
