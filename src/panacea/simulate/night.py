"""Plan and write a whole simulated LRS2 night in the archive's layout, with its truth.

Output, for ``out`` and date ``D``::

    out/D/lrs2/lrs2NNNNNNN.tar        raw amplifier files, one tarball per observation
    out/D/gc1/gc1.tar, gc2/gc2.tar    guider frames (TRANSPAR, GUIDLOOP, tracker position)
    out/standards/m<name>.dat.txt     reference spectrum of the night's standard (AB mag)
    out/truth/D/                      the truth (see the README written there)
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import multiprocessing as mp
import os
import shutil
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import astropy.units as u
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.time import Time

from .. import instrument as inst
from ..fluxcal import standard_filename  # the name the pipeline looks for
from . import nuisance
from . import spectra as sp
from .detector import bias_structure, expose, fits_bytes
from .optics import (
    ChannelOptics,
    build_optics,
    channel_seed,
    continuum_to_pixels,
    lines_to_pixels,
    scattered_light,
)

log = logging.getLogger(__name__)

LENSLET_AREA = inst.LENSLET_PITCH**2  # arcsec^2 of sky per fiber
MOFFAT_BETA = 3.5


@dataclass
class NightConfig:
    """What to simulate. Defaults give the full demo night."""

    date: str
    seed: int = 0
    channels: tuple[str, ...] = ("uv", "orange", "red", "farred")
    n_bias: int = 10
    n_twilight: int = 3
    n_flat: int = 2
    arcs: tuple[str, ...] = ("hg", "cd", "fear")
    standard: str = "FEIGE_34"
    n_science: int = 2
    science_exptime: float = 900.0
    extended: bool = True
    program: str = "HET18-2-100"
    compress: bool = False
    #: draw the nuisances of ``simulate.nuisance`` from the seed (False: fixed defaults)
    randomize: bool = False


@dataclass
class ExposurePlan:
    """One exposure of the night and its true conditions."""

    obsid: int
    exp: int
    ftype: str
    object: str
    exptime: float
    start: str  # ISO UTC
    kind: str  # bias, twilight, flat, arc, standard, science, extended
    lamp: str | None = None
    program: str | None = None
    source_slot: str | None = None  # IFU slot that holds the standard star
    source_xy: tuple[float, float] | None = None
    seeing: float | None = None  # PSF FWHM at 5000 A (arcsec)
    ellipticity: float = 0.0
    psf_model: str = "moffat"  # or "gauss"
    psf_beta: float = MOFFAT_BETA  # Moffat wing index at 5000 A
    psf_beta_slope: float = 0.0  # d beta / d(lambda / 5000 A - 1)
    psf_angle: float = 0.0  # radians; the minor axis lies along IFU x turned by this angle
    airmass: float = 1.22
    pwv_mm: float = 0.0  # water vapour of the telluric absorption (0: none)
    o2_scale: float = 0.0  # O2 band strength (0: none)
    transparency: float = 1.0
    area_cm2: float = inst.DEFAULT_AREA_CM2
    parangle: float = 0.0
    ra: float = 0.0
    dec: float = 0.0
    temperature: float = 10.0
    pressure: float = 795.0
    humidity: float = 30.0
    trace_shift: float = 0.0
    level: float = 1.0
    tracker: list = field(default_factory=list)  # [(x_m, y_m, phi_deg)] at start, end
    #: spectral flexure against the arcs per channel: (shift px, stretch px), randomized nights
    flexure: dict = field(default_factory=dict)

    @property
    def time(self) -> dt.datetime:
        return dt.datetime.fromisoformat(self.start)

    @property
    def stamp(self) -> str:
        t = self.time
        return t.strftime("%Y%m%dT%H%M%S") + f".{t.microsecond // 100000}"


def plan_night(cfg: NightConfig) -> list[ExposurePlan]:
    """The sequence of exposures of a night with their true conditions."""
    rng = np.random.default_rng([cfg.seed, int(cfg.date), 99])
    nz = nuisance.draw(cfg.seed, cfg.date, cfg.randomize)
    day = dt.datetime.strptime(cfg.date, "%Y%m%d")
    plans: list[ExposurePlan] = []

    def at(hour: float) -> dt.datetime:
        return day + dt.timedelta(hours=hour)

    t = at(0.1)
    for i in range(cfg.n_bias):
        plans.append(ExposurePlan(1, i + 1, "zro", "bias", 0.0, t.isoformat(), "bias"))
        t += dt.timedelta(seconds=40)
    t = at(0.65)
    for i in range(cfg.n_twilight):
        exptime = 10.0 * (i + 1)
        plans.append(
            ExposurePlan(2, i + 1, "twi", "skyflat", exptime, t.isoformat(), "twilight",
                         level=0.8 ** i * 10.0 / exptime)
        )
        t += dt.timedelta(seconds=exptime + 40)
    t = at(0.9)
    for i in range(cfg.n_flat):
        plans.append(ExposurePlan(3, i + 1, "flt", "ldls_long", 60.0, t.isoformat(), "flat"))
        t += dt.timedelta(seconds=100)
    arc_objects = {"hg": ("Hg_B", 20.0), "cd": ("Cd-A_B", 60.0), "fear": ("FeAr_R", 180.0)}
    t = at(1.1)
    for i, lamp in enumerate(cfg.arcs):
        obj, exptime = arc_objects[lamp]
        plans.append(ExposurePlan(4 + i, 1, "cmp", obj, exptime, t.isoformat(), "arc",
                                  lamp=lamp))
        t += dt.timedelta(seconds=exptime + 60)

    def observed(obsid, exp, obj, exptime, start, kind, **kw):
        x0 = rng.uniform(-2.5, 2.5)
        tracker = [(x0, rng.uniform(-1.5, 1.5), rng.uniform(0, 360)), None]
        tracker[1] = (x0 + rng.uniform(0.8, 1.6), tracker[0][1] + rng.uniform(-0.3, 0.3),
                      tracker[0][2] + 1.0)
        track = np.linspace(0, 1, 21)
        xs = tracker[0][0] + track * (tracker[1][0] - tracker[0][0])
        ys = tracker[0][1] + track * (tracker[1][1] - tracker[0][1])
        area = float(np.mean(inst.illuminated_area(xs, ys)))
        if nz.randomized:
            kw.update(psf_model=nz.psf_model, psf_beta=nz.psf_beta,
                      psf_beta_slope=nz.psf_beta_slope, pwv_mm=nz.pwv_mm,
                      o2_scale=nz.o2_scale)
            if nz.free_angle:
                kw["psf_angle"] = float(rng.uniform(-np.pi / 2, np.pi / 2))
        return ExposurePlan(
            obsid, exp, "sci", obj, exptime, start.isoformat(), kind,
            seeing=float(rng.uniform(*nz.seeing_range)),
            ellipticity=float(rng.uniform(0.0, nz.max_ellipticity)),
            transparency=float(rng.uniform(0.85, 0.98)), area_cm2=area,
            parangle=float(rng.uniform(-170, 170)), temperature=float(rng.uniform(5, 15)),
            pressure=float(rng.uniform(790, 800)), humidity=float(rng.uniform(15, 50)),
            trace_shift=float(rng.uniform(-0.25, 0.25)), tracker=tracker, **kw,
        )

    t = at(2.0)
    if cfg.standard:
        for obsid, slot in ((7, "056"), (8, "066")):
            plans.append(observed(obsid, 1, f"{cfg.standard}_{slot}_E", 180.0, t, "standard",
                                  source_slot=slot, source_xy=(rng.uniform(-0.8, 0.8),
                                                               rng.uniform(-0.6, 0.6)),
                                  ra=40.5, dec=13.1))
            t += dt.timedelta(seconds=600)
    t = at(3.0)
    xy = (float(rng.uniform(-1.5, 1.5)), float(rng.uniform(-1.0, 1.0)))
    if nz.edge_margin > 0:
        xy = _source_anywhere(np.random.default_rng([cfg.seed, int(cfg.date), 98]),
                              nz.edge_margin)
    for i in range(cfg.n_science):
        plans.append(observed(12, i + 1, "SN2018abc", cfg.science_exptime, t, "science",
                              program=cfg.program, source_xy=xy, ra=52.3, dec=-0.4))
        t += dt.timedelta(seconds=cfg.science_exptime + 60)
    if cfg.extended:
        t = at(4.5)
        plans.append(observed(13, 1, "NGC1234_HII", cfg.science_exptime, t, "extended",
                              program=cfg.program, source_xy=(-1.8, 0.9), ra=60.1, dec=20.2))
    _draw_flexure(cfg, plans)
    return plans


def _source_anywhere(rng, margin: float) -> tuple[float, float]:
    """A source position (IFU arcsec at 5000 A) at least ``margin`` arcsec inside the edge
    of the IFU (the outer boundary of its outermost lenslets); half the draws sit exactly
    ``margin`` inside one of the four sides, the others anywhere."""
    xy = _fiber_xy()
    half = inst.LENSLET_PITCH / 2
    xmax, ymax = xy[:, 0].max() + half - margin, xy[:, 1].max() + half - margin
    x, y = float(rng.uniform(-xmax, xmax)), float(rng.uniform(-ymax, ymax))
    if rng.uniform() < 0.5:
        side = int(rng.integers(4))
        if side < 2:
            x = xmax if side == 0 else -xmax
        else:
            y = ymax if side == 2 else -ymax
    return x, y


def _draw_flexure(cfg: NightConfig, plans: list[ExposurePlan]) -> None:
    """Spectral flexure of every on-sky exposure of a randomized night (nothing otherwise)."""
    nuis = nuisance.draw(cfg.seed, cfg.date, cfg.randomize)
    for p in plans:
        if p.tracker and nuis.flexure:
            p.flexure = {c: nuisance.flexure(nuis, cfg.seed, cfg.date, p.obsid, p.exp, c)
                         for c in inst.channels()}


# ----------------------------------------------------------------------------- light


def _fiber_xy() -> np.ndarray:
    return inst.fiber_positions()


def moffat_fractions(plan: ExposurePlan, waves: np.ndarray, offsets: tuple) -> np.ndarray:
    """Fraction of a point source's light in every lenslet at each wavelength (280, nwave).

    The lenslet is integrated on an 8 x 8 sub-grid of its 0.59" square; the PSF is an
    elliptical Moffat (beta ``plan.psf_beta`` at 5000 A, changing linearly with wavelength
    by ``plan.psf_beta_slope``) or Gaussian (``plan.psf_model``), whose FWHM scales as
    wavelength^-0.2; its minor axis is turned by ``plan.psf_angle`` from IFU x.
    """
    xy = _fiber_xy()
    n = 8
    sub = (np.arange(n) + 0.5) / n - 0.5
    sx, sy = np.meshgrid(sub * inst.LENSLET_PITCH, sub * inst.LENSLET_PITCH)
    px = xy[:, 0, None] + sx.ravel()[None, :]
    py = xy[:, 1, None] + sy.ravel()[None, :]
    dxs, dys = offsets
    out = np.empty((inst.NFIBERS, waves.size))
    q = 1 - plan.ellipticity
    c, s = np.cos(plan.psf_angle), np.sin(plan.psf_angle)
    for i, w in enumerate(waves):
        fwhm = plan.seeing * (w / 5000.0) ** -0.2
        x = px - (plan.source_xy[0] + dxs[i])
        y = py - (plan.source_xy[1] + dys[i])
        if plan.psf_angle != 0.0:
            x, y = x * c + y * s, -x * s + y * c
        if plan.psf_model == "gauss":
            alpha = fwhm / (2 * np.sqrt(np.log(2.0)))  # exp(-r^2 / alpha^2)
            r2 = (x**2 + (y / q) ** 2) / alpha**2
            prof = np.exp(-r2) / (np.pi * alpha**2 * q)
        else:
            beta = plan.psf_beta + plan.psf_beta_slope * (w / 5000.0 - 1.0)
            alpha = fwhm / (2 * np.sqrt(2 ** (1 / beta) - 1))
            r2 = (x**2 + (y / q) ** 2) / alpha**2
            prof = (beta - 1) / (np.pi * alpha**2 * q) * (1 + r2) ** -beta
        out[:, i] = prof.sum(axis=1) * (LENSLET_AREA / n**2)
    return out


def dar_offsets(plan: ExposurePlan, waves: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True refraction offsets (arcsec) relative to 5000 A for this exposure."""
    return sp.refraction_offsets(waves, 5000.0, plan.parangle, plan.temperature,
                                 plan.pressure, plan.humidity)


def photons_per_angstrom(ch: inst.Channel, wave: np.ndarray, flam: np.ndarray,
                         plan: ExposurePlan, transparency: bool = True,
                         nz: nuisance.Nuisances | None = None) -> np.ndarray:
    """Electrons per Angstrom collected in the exposure from F_lambda (before fiber effects),
    through the telluric absorption of ``plan`` and the channel edges of ``nz``."""
    tau = plan.transparency if transparency else 1.0
    return (flam * telluric(plan, wave) * plan.area_cm2 * tau * plan.exptime
            / channel_response(ch, wave, nz))


def channel_response(ch: inst.Channel, wave: np.ndarray, nz: nuisance.Nuisances | None = None
                     ) -> np.ndarray:
    """True response (erg per electron) of a channel, with the night's dichroic edges."""
    if nz is None or nz.edge_width <= 0:
        return sp.response(ch, wave)
    return sp.response(ch, wave, (nz.edge_width, nz.edge_inset))


def telluric(plan: ExposurePlan, wave: np.ndarray) -> np.ndarray | float:
    """True telluric transmission of an exposure at ``wave`` (1.0 without absorption)."""
    if plan.pwv_mm <= 0 and plan.o2_scale <= 0:
        return 1.0
    return sp.telluric_transmission(wave, plan.pwv_mm, plan.o2_scale, plan.airmass)


def sky_spectra(optics: ChannelOptics, plan: ExposurePlan, rng,
                nz: nuisance.Nuisances | None = None) -> np.ndarray:
    """Expected sky electrons per column in every fiber (with fiber throughput)."""
    ch = optics.channel
    wf = sp.fine_grid(ch)
    cont = photons_per_angstrom(ch, wf, sp.sky_continuum(wf) * LENSLET_AREA, plan, False, nz)
    s = continuum_to_pixels(optics, wf, cont)
    lines = [ln for ln in inst.sky_lines() if ch.wave_lo - 30 < ln.wavelength < ch.wave_hi + 30]
    if lines:
        lw = np.array([ln.wavelength for ln in lines])
        var = rng.uniform(0.8, 1.2, lw.size)  # line strengths change through the night
        flux = sp.sky_line_flux([ln.strength for ln in lines]) * var * LENSLET_AREA
        e_lines = (flux * telluric(plan, lw) * plan.area_cm2 * plan.exptime
                   / channel_response(ch, lw, nz))
        s = s + lines_to_pixels(optics, lw, e_lines)
    xy = _fiber_xy()
    grad = 1 + 0.004 * xy[:, 0] - 0.003 * xy[:, 1]
    return s * grad[:, None] * optics.fiber_throughput


def point_source_spectra(optics: ChannelOptics, plan: ExposurePlan, flam_fn,
                         nz: nuisance.Nuisances | None = None) -> np.ndarray:
    """Expected electrons per column of a point source in every fiber."""
    ch = optics.channel
    wf = sp.fine_grid(ch)
    total = continuum_to_pixels(optics, wf, photons_per_angstrom(ch, wf, flam_fn(wf), plan,
                                                                 nz=nz))
    wk = np.linspace(ch.wave_lo - 100, ch.wave_hi + 100, 48)
    frac = moffat_fractions(plan, wk, dar_offsets(plan, wk))
    frac_pix = np.stack([np.interp(optics.wave[k], wk, frac[k]) for k in range(inst.NFIBERS)])
    return total * frac_pix * optics.fiber_throughput


#: Exponential profile of the extended region: scale length (arcsec) and axis ratio (y / x);
#: its continuum (AB mag per arcsec^2 at the peak) and redshift.
EXTENDED_SCALE, EXTENDED_RATIO = 1.8, 0.7
EXTENDED_AB, EXTENDED_Z = 22.0, 0.005


def extended_profile(plan: ExposurePlan) -> np.ndarray:
    """Surface brightness of the extended region at each lenslet's centre relative to its
    peak, times the lenslet's area (arcsec^2): the sky area its light fills in every fiber.
    Over the whole sky the profile covers ``2 pi EXTENDED_SCALE^2 EXTENDED_RATIO``."""
    xy = _fiber_xy()
    r = np.hypot(xy[:, 0] - plan.source_xy[0], (xy[:, 1] - plan.source_xy[1]) / EXTENDED_RATIO)
    return np.exp(-r / EXTENDED_SCALE) * LENSLET_AREA


def extended_spectra(optics: ChannelOptics, plan: ExposurePlan, z: float = EXTENDED_Z,
                     nz: nuisance.Nuisances | None = None) -> np.ndarray:
    """Expected electrons per column of an extended emission-line region in every fiber."""
    ch = optics.channel
    profile = extended_profile(plan)  # arcsec^2 weighted surface brightness
    waves = np.array([w for w, _ in sp.EXTENDED_LINES]) * (1 + z)
    sb = np.array([f for _, f in sp.EXTENDED_LINES])
    keep = (waves > ch.wave_lo - 20) & (waves < ch.wave_hi + 20)
    out = np.zeros((inst.NFIBERS, optics.ncol))
    if keep.any():
        e = (sb[keep] * telluric(plan, waves[keep]) * plan.area_cm2 * plan.transparency
             * plan.exptime / channel_response(ch, waves[keep], nz))
        out += lines_to_pixels(optics, waves[keep], profile[:, None] * e[None, :])
    wf = sp.fine_grid(ch)
    cont = photons_per_angstrom(ch, wf, sp.ab_to_flambda(EXTENDED_AB, wf), plan, nz=nz)
    out += continuum_to_pixels(optics, wf, cont) * profile[:, None]
    return out * optics.fiber_throughput


def lamp_lines(optics: ChannelOptics, lamp: str,
               nuis: nuisance.Nuisances | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Lines of one lamp in a channel: listed lines plus a few weak unlisted ones (blends).

    A randomized night (``nuis``) leaves out some listed lines (never the brightest), adds
    more and brighter unlisted ones and blends a few listed lines with a close neighbour.
    """
    ch = optics.channel
    listed = [a for a in inst.arc_lines(ch.name) if a.lamp == lamp]
    w = [a.wavelength for a in listed]
    s = [a.strength for a in listed]
    rng = np.random.default_rng(channel_seed(f"unlisted-{ch.name}-{lamp}"))
    if listed and (nuis is None or not nuis.randomized):
        nextra = 5
        w += list(rng.uniform(ch.wave_lo, ch.wave_hi, nextra))
        s += list(rng.uniform(0.002, 0.012, nextra) * max(s))
    elif listed:
        rng = np.random.default_rng([channel_seed(f"arcs-{ch.name}-{lamp}"),
                                     int(round(1e6 * nuis.ripple_period))])
        top = float(max(s))
        order = np.argsort(s)[:-1]  # the brightest stays
        drop = set(rng.permutation(order)[: nuis.arc_missing].tolist()) if order.size else set()
        w = [x for i, x in enumerate(w) if i not in drop]
        s = [x for i, x in enumerate(s) if i not in drop]
        disp = np.abs(np.gradient(optics.wave[inst.NFIBERS // 2])).mean()  # A per px
        for i in rng.permutation(len(w))[: nuis.arc_blends]:
            w.append(w[i] + rng.choice([-1, 1]) * rng.uniform(1.0, 2.5) * disp)
            s.append(s[i] * rng.uniform(0.05, 0.3))
        w += list(rng.uniform(ch.wave_lo, ch.wave_hi, nuis.arc_unlisted))
        s += list(rng.uniform(0.002, 0.03, nuis.arc_unlisted) * top)
    return np.array(w), np.array(s)


#: Electrons (summed over the line) of a line of listed strength 1.0 in one fiber, per second.
ARC_SCALE = {"uv": 6.0e4, "orange": 1.2e4, "red": 5.0e3, "farred": 5.0e3}


def expected_spectra(optics: ChannelOptics, plan: ExposurePlan, rng,
                     nz: nuisance.Nuisances | None = None) -> dict[str, np.ndarray]:
    """All expected per-fiber electron spectra of one exposure, by component (``nz``: the
    night's nuisances; None for the default night)."""
    ch = optics.channel
    zeros = np.zeros((inst.NFIBERS, optics.ncol))
    wf = sp.fine_grid(ch)
    if plan.kind == "bias":
        return {"total": zeros}
    if plan.kind == "twilight":
        sun = sp.solar_photons(wf)
        if nz is not None and (nz.pwv_mm > 0 or nz.o2_scale > 0):  # twilight looks at the sky
            sun = sun * sp.telluric_transmission(wf, nz.pwv_mm, nz.o2_scale, 1.22)
        peak = 1.2e3 * plan.level * plan.exptime  # electrons per Angstrom per fiber
        s = continuum_to_pixels(optics, wf, sun * peak / np.median(sun)) * optics.fiber_throughput
        return {"total": s}
    if plan.kind == "flat":
        lamp = sp.ldls_photons(wf)
        xy = _fiber_xy()
        illum = 1 + 0.02 * xy[:, 0] / 6.2 + 0.01 * (xy[:, 1] / 3.5) ** 2
        s = continuum_to_pixels(optics, wf, lamp * 150.0 * plan.exptime)
        return {"total": s * illum[:, None] * optics.fiber_throughput}
    if plan.kind == "arc":
        w, s = lamp_lines(optics, plan.lamp, nz)
        if w.size == 0:
            return {"total": zeros}
        e = s * ARC_SCALE[ch.name] * plan.exptime
        return {"total": lines_to_pixels(optics, w, e) * optics.fiber_throughput}
    sky = sky_spectra(optics, plan, rng, nz)
    strong = nz is not None and nz.stellar_lines
    if plan.kind == "standard":
        if plan.source_slot == ch.ifuslot:
            src = point_source_spectra(
                optics, plan, lambda w: sp.standard_flambda(plan.object, w,
                                                            strong_lines=strong), nz)
        else:
            src = zeros
    elif plan.kind == "science":
        src = point_source_spectra(optics, plan, sp.science_flambda, nz)
    elif plan.kind == "extended":
        src = extended_spectra(optics, plan, nz=nz)
    else:
        raise ValueError(f"unknown exposure kind {plan.kind!r}")
    return {"total": sky + src, "sky": sky, "source": src}


# ----------------------------------------------------------------------------- headers


def raw_header(plan: ExposurePlan, optics: ChannelOptics, amp_index: int) -> fits.Header:
    """Header cards of one raw amplifier file, as the HET archive writes them."""
    ch = optics.channel
    amp = ch.amps[amp_index]
    t = plan.time
    h = fits.Header()
    h["OBJECT"] = plan.object
    h["OBSID"] = (plan.obsid, "observation number")
    h["EXPN"] = (plan.exp, "exposure number")
    h["IMAGETYP"] = plan.ftype
    h["DATE-OBS"] = t.strftime("%Y-%m-%d")
    h["UT"] = t.strftime("%H:%M:%S.%f")[:12]
    h["DATE"] = (t.strftime("%Y-%m-%dT%H:%M:%S.%f")[:21], "exposure start (UTC)")
    h["MJD"] = (round(Time(t).mjd, 6), "modified Julian date at start")
    h["EXPTIME"] = (plan.exptime, "seconds")
    h["DARKTIME"] = (plan.exptime + 1.3, "seconds")
    h["TELESCOP"] = "HET"
    h["INSTRUME"] = "LRS2"
    h["OBSERVAT"] = "McDonald"
    h["SPECID"] = ch.specid
    h["IFUSLOT"] = int(ch.ifuslot)
    h["IFUID"] = str(ch.ifuid)
    h["CCDPOS"] = amp[0]
    h["CCDHALF"] = amp[1]
    h["AMPNAME"] = amp
    h["AMPLIFIE"] = amp
    h["GAIN"] = (float(optics.gain[amp_index]), "e-/ADU")
    h["RDNOISE"] = (float(optics.header_rdnoise[amp_index]), "e-")
    nx, ny, no = optics.ncol, optics.nrow_amp, inst.AMP_OVERSCAN_COLS
    h["BIASSEC"] = f"[{nx + 1}:{nx + no},1:{ny}]"
    h["TRIMSEC"] = f"[1:{nx},1:{ny}]"
    h["DATASEC"] = f"[1:{nx},1:{ny}]"
    h["CCDSEC"] = f"[1:{nx},1:{ny}]"
    h["BINNING"] = "1x1"
    h["AIRMASS"] = 1.22
    if plan.program:
        h["QPROG"] = (plan.program, "program")
    if plan.kind in ("standard", "science", "extended"):
        h["PARANGLE"] = (round(plan.parangle, 3), "parallactic angle (deg)")
        h["TRAJRA"] = (plan.ra, "trajectory RA of the IFU (deg)")
        h["TRAJDEC"] = (plan.dec, "trajectory Dec of the IFU (deg)")
        target = SkyCoord(plan.ra * u.deg, plan.dec * u.deg)
        h["QRA"] = (target.ra.to_string(unit=u.hourangle, sep=":", precision=2, pad=True),
                    "queue target RA")
        h["QDEC"] = (target.dec.to_string(sep=":", precision=1, pad=True, alwayssign=True),
                     "queue target Dec")
        h["QOBJECT"] = (plan.object.removesuffix(f"_{plan.source_slot}_E")
                        if plan.source_slot else plan.object, "queue object name")
        h["AMBTEMP"] = (round(plan.temperature, 2), "ambient temperature (C)")
        h["BAROMPRE"] = (round(plan.pressure, 2), "barometric pressure (mbar)")
        h["HUMIDITY"] = (round(plan.humidity, 1), "relative humidity (%)")
    return h


# ----------------------------------------------------------------------------- writing


def write_guider(out_night: Path, plans: list[ExposurePlan], seed: int) -> list[dict]:
    """Guider tarballs gc1/gc2: frames every 15 s through each on-sky exposure.

    Each frame is laid out as real ones are: the tracker cards (RHO_STRT, THE_STRT,
    PHI_STRT, X_STRT, Y_STRT) in the primary header, the image in extension 1 whose header
    holds GUIDLOOP, MJD and TRANSPAR."""
    rng = np.random.default_rng([seed, 4242])
    records = []
    for cam in ("gc1", "gc2"):
        folder = out_night / cam
        folder.mkdir(parents=True, exist_ok=True)
        with tarfile.open(folder / f"{cam}.tar", "w") as tf:
            for p in plans:
                if not p.tracker:
                    continue
                t0 = p.time - dt.timedelta(seconds=30)
                n = int((p.exptime + 60) / 15) + 1
                for i in range(n):
                    t = t0 + dt.timedelta(seconds=15 * i)
                    frac = np.clip((t - p.time).total_seconds() / max(p.exptime, 1), 0, 1)
                    (x0, y0, f0), (x1, y1, f1) = p.tracker
                    active = p.time <= t <= p.time + dt.timedelta(seconds=p.exptime)
                    transp = p.transparency + rng.normal(0, 0.01)
                    if rng.uniform() < 0.05:
                        transp = float(rng.choice([0.0, 1.6, 3.2]))  # glitches, not trusted
                    prim = fits.Header()
                    prim["DATE-OBS"] = t.strftime("%Y-%m-%d")
                    prim["UT"] = t.strftime("%H:%M:%S.%f")[:12]
                    x, y = x0 + frac * (x1 - x0), y0 + frac * (y1 - y0)
                    prim["X_STRT"] = (round(x, 4), "tracker x at start (m)")
                    prim["Y_STRT"] = (round(y, 4), "tracker y at start (m)")
                    prim["RHO_STRT"] = (round(float(np.hypot(x, y)), 4),
                                        "tracker radius at start (m)")
                    prim["THE_STRT"] = (round(float(np.degrees(np.arctan2(y, x))), 4),
                                        "tracker angle at start (deg)")
                    prim["PHI_STRT"] = (round(f0 + frac * (f1 - f0), 4),
                                        "tracker rotation at start (deg)")
                    h = fits.Header()
                    h["MJD"] = (round(Time(t).mjd, 7), "modified Julian date")
                    h["GUIDLOOP"] = ("ACTIVE" if active else "ACQUIRE", "guide loop state")
                    h["TRANSPAR"] = (round(float(transp), 4), "sky transparency")
                    img = rng.poisson(300, (32, 32)).astype(np.uint16)
                    name = t.strftime("%Y%m%dT%H%M%S") + f".{t.microsecond // 100000}"
                    buf = io.BytesIO()
                    fits.HDUList([fits.PrimaryHDU(header=prim),
                                  fits.ImageHDU(img, header=h)]).writeto(buf)
                    data = buf.getvalue()
                    info = tarfile.TarInfo(f"{name}_{cam}_sci.fits")
                    info.size = len(data)
                    info.mtime = t.timestamp()
                    tf.addfile(info, io.BytesIO(data))
                    if cam == "gc1":
                        records.append({"time": t.isoformat(), "obsid": p.obsid, "exp": p.exp,
                                        "guidloop": h["GUIDLOOP"], "transpar": h["TRANSPAR"]})
    return records


def write_standard(folder: Path, name: str, nz: nuisance.Nuisances | None = None) -> Path:
    """Reference spectrum of the standard: wavelength (A) and AB magnitude, 2 A point samples
    on the default night; with ``nz`` its step, sampling and stellar lines."""
    folder.mkdir(parents=True, exist_ok=True)
    nz = nz or nuisance.Nuisances()
    wave, flam = sp.tabulate_reference(
        lambda w: sp.standard_flambda(name, w, strong_lines=nz.stellar_lines), 3500.0, 10700.0,
        nz.reference_step, nz.reference_binned)
    mag = sp.flambda_to_ab(flam, wave)
    path = folder / standard_filename(name)
    np.savetxt(path, np.column_stack([wave, mag]), fmt="%.2f %.4f",
               header=f"{name}: simulated reference spectrum; wavelength (A, air), AB mag")
    return path


TRUTH_README = """# Simulator truth for night {date}

Written by `panacea-lrs2 simulate`; every array is in the oriented, stitched channel frame
(rows = spatial, 2 x 1032; columns = dispersion, 2064; fiber k = 0..279 is IFU fiber 280-k).

* `night.json`: configuration, every exposure with its true conditions (seeing = Moffat FWHM
  at 5000 A in arcsec, beta 3.5; source_xy in IFU arcsec at 5000 A; transparency; illuminated
  area in cm^2; trace_shift in px relative to the night's traces), and the guider records.
* `channel_<name>.fits`, one per channel, extensions:
  `WAVELENGTH` (280 x 2064, air A at pixel centres), `TRACE` (280 x 2064, stitched row of each
  fiber's centre), `SIGMA` (core Gaussian sigma of the cross-dispersion profile, px; the
  profile is 96 % that core and 4 % a Gaussian 2.2 times wider), `LSF_FWHM` (px),
  `THROUGHPUT` (280 x 2064, fiber-to-fiber throughput at each fiber's own pixel wavelengths;
  0 for dead fibers), `DEAD` (280, 1 = dead), `BIAS` (2 x 1032 x 2064, fixed bias structure of
  each amp in units of 0.01 ADU minus the pedestal PEDEST1/2 of the primary header, raw
  readout orientation, data columns only; each frame adds a row drift), `PIXELFLAT` (2064 x
  2064, relative pixel quantum efficiency minus 1 in units of 1e-4),
  `RESPONSE` (2 x 2064: common grid wavelength, erg per electron), and header cards GAIN1/2,
  RDNOISE1/2 (true values; headers carry RDNOISE with a few per cent error).
* `exp_<obsid7>_<NN>_<channel>.fits` for every exposure with light: `COSMIC` (2064 x 2064
  uint8, 1 where a cosmic ray was added) and, for on-sky exposures, `SKY` and `SOURCE`
  (280 x 2064, expected electrons per column of each fiber, noise free, fiber throughput
  included). Calibration light follows from the channel truth.
* `night.json` also holds `nuisances`: what a randomized night drew (PSF family `psf_model`,
  `psf_beta` at 5000 A and its change `psf_beta_slope` per unit of lambda/5000 A - 1, seeing
  range, ellipticity, source margin from the IFU edge, the standard's strong lines and its
  reference tabulation step and sampling, water vapour `pwv_mm` and `o2_scale` of the
  telluric absorption, dichroic `edge_width` and `edge_inset` in A); every exposure carries
  its own PSF parameters (psf_model, psf_beta, psf_beta_slope, psf_angle, ellipticity).
  `RESPONSE` of the channel truth includes the dichroic edges.
* `spectra/telluric.txt` (randomized nights with absorption): the true telluric
  transmission at airmass 1.22 on a 0.1 A grid, before the line spread.
* Randomized nights also draw, in `nuisances` (ranges documented in
  `panacea.simulate.nuisance`): wavelength ripples and low-order change, which are inside
  `WAVELENGTH`; line-spread scale and asymmetry; arc lines missing, unlisted and blended;
  AMPNAME convention; scattered light; and, per on-sky exposure, `flexure`
  {{channel: [shift px, stretch px]}}. Such an exposure's truth file then also holds
  `WAVELENGTH` (280 x 2064, the exposure's own wavelengths after flexure) and header cards
  WSHIFT/WSTRETCH; `WAVELENGTH` of the channel truth stays the arcs' (calibration) one.
* `spectra/<kind>.txt`: the true F_lambda (erg/s/cm^2/A, before the line spread) of the
  standard and the science point source on a 0.5 A grid.
"""


def _write_channel_truth(folder: Path, optics: ChannelOptics,
                         nz: nuisance.Nuisances | None = None) -> None:
    ch = optics.channel
    grid = ch.grid
    hdus = [fits.PrimaryHDU()]
    hdr = hdus[0].header
    for i in range(2):
        hdr[f"GAIN{i + 1}"] = float(optics.gain[i])
        hdr[f"RDNOISE{i + 1}"] = float(optics.rdnoise[i])
        hdr[f"AMP{i + 1}"] = ch.amps[i]
        hdr[f"PEDEST{i + 1}"] = (float(optics.pedestal[i]), "bias pedestal (ADU)")
    for name, arr in (
        ("WAVELENGTH", optics.wave),
        ("TRACE", optics.trace),
        ("SIGMA", optics.sigma),
        ("LSF_FWHM", optics.lsf_fwhm),
        ("THROUGHPUT", optics.fiber_throughput),
    ):
        hdus.append(fits.ImageHDU(arr.astype(np.float64 if name == "WAVELENGTH" else np.float32),
                                  name=name))
    hdus.append(fits.ImageHDU(optics.dead.astype(np.uint8), name="DEAD"))
    # bias structure minus pedestal in units of 0.01 ADU, Rice-compressed int16
    bias = np.stack([bias_structure(optics, i) - optics.pedestal[i] for i in range(2)])
    bhdu = fits.CompImageHDU(np.round(bias * 100).astype(np.int16), name="BIAS")
    bhdu.header["BUNIT"] = ("0.01 ADU", "bias structure minus PEDEST1/2")
    hdus.append(bhdu)
    pix = fits.CompImageHDU(np.round((optics.pixel_flat - 1) * 1e4).astype(np.int16),
                            name="PIXELFLAT")
    pix.header["BUNIT"] = ("1e-4", "pixel flat minus 1, in units of 1e-4")
    hdus.append(pix)
    hdus.append(fits.ImageHDU(np.stack([grid, channel_response(ch, grid, nz)]),
                              name="RESPONSE"))
    fits.HDUList(hdus).writeto(folder / f"channel_{ch.name}.fits", overwrite=True)


def _simulate_channel(cfg: NightConfig, name: str, staging: Path, truth: Path) -> int:
    """Render every exposure of one channel into raw FITS files under ``staging``."""
    ch = inst.get_channel(name)
    ci = list(inst.channels()).index(name)
    nz = nuisance.draw(cfg.seed, cfg.date, cfg.randomize)
    o_night = build_optics(ch, cfg.date, nuis=nz)
    _write_channel_truth(truth, o_night, nz)
    ampnames = _ampnames(ch, nz)
    nfiles = 0
    for p in plan_night(cfg):
        rng = np.random.default_rng([cfg.seed, int(cfg.date), p.obsid, p.exp, ci])
        o = o_night.with_flexure(*p.flexure.get(name, (0.0, 0.0)))
        comps = expected_spectra(o, p, rng, nz)
        if p.kind == "bias":
            image = np.zeros((2 * o.nrow_amp, o.ncol))
        else:
            image = o.render(comps["total"], shift=p.trace_shift)
            image += scattered_light(image, nz.scatter_frac, nz.scatter_sigma)
            image *= o.pixel_flat
        raws, cosmic = expose(o, image, rng, p.exptime, with_cosmics=p.exptime > 0,
                              ampnames=ampnames)
        member_dir = staging / f"lrs2{p.obsid:07d}" / f"exp{p.exp:02d}" / "lrs2"
        member_dir.mkdir(parents=True, exist_ok=True)
        for ai, raw in enumerate(raws):
            fname = f"{p.stamp}_{ch.ifuslot}{ch.amps[ai]}_{p.ftype}.fits"
            header = raw_header(p, o, ai)
            header["AMPNAME"] = ampnames[ai]
            (member_dir / fname).write_bytes(fits_bytes(raw, header))
            nfiles += 1
        if p.kind != "bias":
            _write_exposure_truth(truth, p, ch, comps, cosmic, o if o is not o_night else None)
    return nfiles


def _ampnames(ch: inst.Channel, nuis: nuisance.Nuisances) -> tuple[str, str]:
    """Header AMPNAME of the channel's two amps: the amp codes, or (randomized nights that
    draw the other convention) ``LR``/``UL`` for LL/LU, whose raw columns are reversed."""
    flip = {"LL": "LR", "LU": "UL"} if nuis.ampname_flip else {}
    return tuple(flip.get(a, a) for a in ch.amps)


def _pack_tarballs(staging: Path, night_dir: Path, compress: bool) -> None:
    """One tarball per observation from the staged files; the staging tree is removed."""
    for obs_dir in sorted(staging.iterdir()):
        suffix = ".tar.gz" if compress else ".tar"
        final = night_dir / f"{obs_dir.name}{suffix}"
        partial = final.with_name(final.name + ".part")
        with tarfile.open(partial, "w:gz" if compress else "w") as tf:
            for f in sorted(obs_dir.rglob("*.fits")):
                tf.add(f, arcname=str(f.relative_to(staging)))
        partial.replace(final)
    shutil.rmtree(staging)


def simulate_night(cfg: NightConfig, out: str | Path, workers: int | None = None) -> dict:
    """Simulate a whole night; return a summary (paths, counts, seconds).

    Channels are rendered in parallel by up to ``workers`` processes (default: one per core,
    at most one per channel).
    """
    t_start = time.perf_counter()
    out = Path(out)
    night_dir = out / cfg.date / "lrs2"
    night_dir.mkdir(parents=True, exist_ok=True)
    truth = out / "truth" / cfg.date
    truth.mkdir(parents=True, exist_ok=True)
    staging = night_dir / ".staging"
    if staging.exists():
        shutil.rmtree(staging)
    names = [inst.get_channel(c).name for c in cfg.channels]
    plans = plan_night(cfg)
    workers = min(len(names), workers or os.cpu_count() or 1)
    if workers > 1:
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            counts = list(pool.map(_simulate_channel, [cfg] * len(names), names,
                                   [staging] * len(names), [truth] * len(names)))
    else:
        counts = [_simulate_channel(cfg, n, staging, truth) for n in names]
    nfiles = sum(counts)
    _pack_tarballs(staging, night_dir, cfg.compress)
    guider = write_guider(out / cfg.date, plans, cfg.seed)
    nz = nuisance.draw(cfg.seed, cfg.date, cfg.randomize)
    std_path = write_standard(out / "standards", cfg.standard, nz) if cfg.standard else None
    _write_spectra_truth(truth / "spectra", cfg, nz)
    (truth / "README.md").write_text(TRUTH_README.format(date=cfg.date))
    summary = {
        "config": asdict(cfg),
        "nuisances": nz.as_dict(),
        "exposures": [asdict(p) for p in plans],
        "guider": guider,
        "standard_file": str(std_path) if std_path else None,
        "files": nfiles,
        "seconds": round(time.perf_counter() - t_start, 2),
    }
    (truth / "night.json").write_text(json.dumps(summary, indent=1, default=str))
    log.info("simulated %s: %d raw files in %.1f s", cfg.date, nfiles, summary["seconds"])
    return summary


def _write_exposure_truth(folder: Path, p: ExposurePlan, ch: inst.Channel, comps: dict,
                          cosmic: np.ndarray, flexed: ChannelOptics | None = None) -> None:
    hdus = [fits.PrimaryHDU()]
    if flexed is not None:  # spectral flexure: this exposure's own wavelengths
        shift, stretch = p.flexure[ch.name]
        hdus[0].header["WSHIFT"] = (shift, "true flexure shift against the arcs (px)")
        hdus[0].header["WSTRETCH"] = (stretch, "true flexure stretch, px at the ends")
        hdus.append(fits.ImageHDU(flexed.wave, name="WAVELENGTH"))
    # calibration light follows from the channel truth; on-sky exposures keep their parts
    for key in ("sky", "source"):
        if key in comps:
            hdus.append(fits.ImageHDU(comps[key].astype(np.float32), name=key.upper()))
    hdus.append(fits.CompImageHDU(cosmic.astype(np.uint8), name="COSMIC"))
    fits.HDUList(hdus).writeto(folder / f"exp_{p.obsid:07d}_{p.exp:02d}_{ch.name}.fits",
                               overwrite=True)


def _write_spectra_truth(folder: Path, cfg: NightConfig,
                         nz: nuisance.Nuisances | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    nz = nz or nuisance.Nuisances()
    wave = np.arange(3500.0, 10700.0, 0.5)
    np.savetxt(folder / "science.txt", np.column_stack([wave, sp.science_flambda(wave)]),
               header="wavelength (A, air), F_lambda (erg/s/cm2/A)")
    if cfg.standard:
        np.savetxt(folder / "standard.txt",
                   np.column_stack([wave, sp.standard_flambda(cfg.standard, wave,
                                                               strong_lines=nz.stellar_lines)]),
                   header=f"{cfg.standard}: wavelength (A, air), F_lambda (erg/s/cm2/A)")
    if nz.pwv_mm > 0 or nz.o2_scale > 0:
        fine = np.arange(3500.0, 10700.0, 0.1)
        trans = sp.telluric_transmission(fine, nz.pwv_mm, nz.o2_scale, 1.22)
        np.savetxt(folder / "telluric.txt", np.column_stack([fine, trans]), fmt="%.2f %.5f",
                   header="wavelength (A, air), telluric transmission at airmass 1.22 "
                          "(before the line spread)")
