"""Differential atmospheric refraction on the IFU.

HET observes at a fixed elevation (:data:`instrument.HET_ELEVATION_DEG`), so the refraction
track of an exposure depends only on the weather and on the parallactic angle. The
refraction constants come from ERFA's ``refco`` (the SOFA/ERFA model of moist air, valid
from the ultraviolet to the near infrared), evaluated with the header's temperature,
pressure and humidity. The image of a source moves towards the zenith as wavelength
decreases; on the IFU that direction is set by PARANGLE: ``dx = r sin(PA)``,
``dy = r cos(PA)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import erfa
import numpy as np
from astropy.io import fits

from . import instrument
from .io_utils import header_number

log = logging.getLogger(__name__)

RAD_TO_ARCSEC = 206264.80624709636

#: Header cards tried, in order, for the weather (first present and plausible wins).
TEMPERATURE_CARDS = ("AMBTEMP", "TEMPERAT", "AIRTEMP", "TEMP")
PRESSURE_CARDS = ("BAROMPRE", "PRESSURE", "BAROM")
HUMIDITY_CARDS = ("HUMIDITY", "RELHUM", "HUMID")
#: Typical McDonald night used when a card is missing (Celsius, mbar, %).
DEFAULT_WEATHER = (10.0, 795.0, 30.0)


@dataclass
class Weather:
    """Air temperature (C), pressure (mbar) and relative humidity (%), with their source."""

    temperature: float
    pressure: float
    humidity: float
    notes: list[str] = field(default_factory=list)


def _card(header: fits.Header, names: tuple[str, ...], lo: float, hi: float) -> float | None:
    """The first of the cards ``names`` that holds a number within [lo, hi]."""
    for name in names:
        value = header_number(header, name)
        if value is not None and lo <= value <= hi:
            return value
    return None


def header_weather(header: fits.Header) -> Weather:
    """The weather of an exposure from its header, defaults (with a note) where missing."""
    t = _card(header, TEMPERATURE_CARDS, -30, 40)
    p = _card(header, PRESSURE_CARDS, 600, 1100)
    h = _card(header, HUMIDITY_CARDS, 0, 100)
    notes = []
    for value, name, default in ((t, "temperature", DEFAULT_WEATHER[0]),
                                 (p, "pressure", DEFAULT_WEATHER[1]),
                                 (h, "humidity", DEFAULT_WEATHER[2])):
        if value is None:
            notes.append(f"no {name} card; {default} assumed")
    return Weather(t if t is not None else DEFAULT_WEATHER[0],
                   p if p is not None else DEFAULT_WEATHER[1],
                   h if h is not None else DEFAULT_WEATHER[2], notes)


def refraction(wave: np.ndarray, weather: Weather,
               elevation_deg: float = instrument.HET_ELEVATION_DEG) -> np.ndarray:
    """Refraction (arcsec) at ``wave`` (air Angstrom) for the given weather and elevation."""
    wave = np.asarray(wave, float)
    refa, refb = erfa.refco(weather.pressure, weather.temperature, weather.humidity / 100.0,
                            wave / 1e4)
    tz = np.tan(np.deg2rad(90.0 - elevation_deg))
    return (refa * tz + refb * tz**3) * RAD_TO_ARCSEC


def refraction_track(wave: np.ndarray, ref_wave: float, parangle_deg: float, weather: Weather,
                     elevation_deg: float = instrument.HET_ELEVATION_DEG
                     ) -> tuple[np.ndarray, np.ndarray]:
    """IFU offsets (dx, dy) in arcsec of a source at ``wave`` relative to ``ref_wave``."""
    r = refraction(wave, weather, elevation_deg) - refraction(np.array([ref_wave]), weather,
                                                              elevation_deg)[0]
    pa = np.deg2rad(parangle_deg)
    return r * np.sin(pa), r * np.cos(pa)
