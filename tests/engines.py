"""Helpers of the engine tests: product trees compared to float32 rounding (and, in lossy
tile-compressed images, to one stored quantisation step)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits

#: Largest difference allowed between engines, relative to the array's largest value: a
#: few float32 roundings (numerical libraries may sum in another order in a worker).
RTOL = 2e-6


def arrays(path: Path) -> dict:
    """Every data array of a FITS file, table columns included, by (HDU, column)."""
    out = {}
    with fits.open(path) as hdul:
        for i, hdu in enumerate(hdul):
            if hdu.data is None:
                continue
            names = getattr(hdu.data, "names", None)
            if names:
                for name in names:
                    out[(i, name)] = np.array(hdu.data[name])
            else:
                out[(i, "")] = np.array(hdu.data)
    return out


def quantisation_steps(path: Path) -> dict:
    """The largest quantisation step (ZSCALE of any tile) of every lossy tile-compressed
    image of a FITS file, by HDU index: two runs whose values differ by float32 rounding may
    land one stored step apart there (the products' stated storage bound)."""
    out = {}
    with fits.open(path, disable_image_compression=True) as hdul:
        for i, hdu in enumerate(hdul):
            cols = getattr(getattr(hdu, "columns", None), "names", None) or []
            if "ZSCALE" in cols:
                out[i] = float(np.nanmax(np.abs(hdu.data["ZSCALE"]), initial=0.0))
    return out


def differences(a: Path, b: Path, rename=lambda name: name, exclude=()) -> list[str]:
    """Products of tree ``a`` missing from or different in tree ``b`` (``rename`` maps a
    file name of ``a`` to its name in ``b``; names starting with ``exclude`` are left
    out)."""
    bad = []
    files = sorted(p for p in a.rglob("*.fits") if not p.name.startswith(tuple(exclude)))
    assert files, f"no products under {a}"
    for p in files:
        q = b / p.parent.relative_to(a) / rename(p.name)
        if not q.is_file():
            bad.append(f"{q} missing")
            continue
        x, y = arrays(p), arrays(q)
        steps, other = quantisation_steps(p), quantisation_steps(q)
        if x.keys() != y.keys():
            bad.append(f"{q}: other arrays")
            continue
        for key, u in x.items():
            v = y[key]
            if u.shape != v.shape:
                bad.append(f"{q} {key}: shape {v.shape} != {u.shape}")
            elif u.dtype.kind in "fc":
                scale = np.nanmax(np.abs(u)) if np.isfinite(u).any() else 0.0
                diff = np.abs(u - v)
                same_nan = np.array_equal(np.isnan(u), np.isnan(v))
                # each stored value is within half its file's step of the computed one
                step = max(steps.get(key[0], 0.0), other.get(key[0], 0.0))
                allowed = RTOL * scale + 1.0001 * step
                if not same_nan or np.nanmax(diff, initial=0.0) > allowed:
                    bad.append(f"{q} {key}: differs by {np.nanmax(diff, initial=0):.3g}")
            elif not np.array_equal(u, v):
                bad.append(f"{q} {key}: differs")
    return bad
