"""Run configuration: the bundled YAML file, ``--config`` overrides and the typed result.

``data/config.yaml`` holds every tunable the night runner passes to the stages. A user file
given with ``--config`` overrides it key by key; the command line overrides both. Keys the
bundled file does not know and values of another type are :class:`ConfigError` naming the
key. :func:`run_config` builds the :class:`RunConfig` the night runner takes: the pipeline
never sees the argparse namespace.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from .. import __version__
from ..calibration import CalibrationOptions
from ..errors import PanaceaError
from ..science import ScienceOptions

#: Values a key may take, where not any value of the bundled type is allowed.
CHOICES = {
    "science.sky_method": ("spline", "template"),
    "science.cosmic_method": ("fiber", "lacosmic"),
    "executor.engine": ("processes", "dask", "slurm"),
    "calibration.overscan": ("row",),
}
#: Keys whose bundled value is null, and the types they accept besides null.
NULLABLE = {
    "science.central_wave": (int, float),
    "flux.standards_dir": (str,),
    "flux.response_dir": (str,),
    "executor.scheduler": (str,),
    "executor.slurm.account": (str,),
    "executor.slurm.log_directory": (str,),
}
#: Sections that do not change products (left out of the configuration hash).
NOT_IN_HASH = ("archive", "executor", "logging", "qa")
#: Sections whose keys are free (filled by other parts of the pipeline).
OPEN_SECTIONS = ("qa",)


class ConfigError(PanaceaError):
    """A configuration file or value that cannot be used (exit code 2)."""


def bundled() -> dict:
    """The bundled configuration (``panacea/data/config.yaml``) as a dict."""
    text = resources.files("panacea.data").joinpath("config.yaml").read_text()
    return yaml.safe_load(text)


def load(path: str | Path | None = None) -> dict:
    """The bundled configuration overridden by the YAML file ``path`` (if given).

    Raises
    ------
    ConfigError
        The file is missing, not YAML, or holds an unknown key or a value of the wrong type.
    """
    config = bundled()
    if path is None:
        return config
    path = Path(path)
    try:
        user = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"{path}: cannot read configuration ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if user is None:
        return config
    if not isinstance(user, dict):
        raise ConfigError(f"{path}: a configuration must be a mapping of sections")
    merge(config, user, source=str(path))
    return config


def merge(base: dict, override: dict, source: str = "", prefix: str = "") -> dict:
    """Override ``base`` in place with ``override``, checking every key and type."""
    where = f"{source}: " if source else ""
    for key, value in override.items():
        name = f"{prefix}{key}"
        if prefix.rstrip(".") in OPEN_SECTIONS:
            base[key] = value
            continue
        if key not in base:
            raise ConfigError(f"{where}unknown configuration key {name!r}"
                              f" (known here: {', '.join(sorted(base))})")
        current = base[key]
        if isinstance(current, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{name} must be a mapping, got {value!r}")
            merge(current, value, source, f"{name}.")
            continue
        base[key] = check_value(name, current, value, where)
    return base


def check_value(name: str, current, value, where: str = ""):
    """``value`` for key ``name`` if it has the bundled value's type, else ConfigError."""
    if name in NULLABLE:
        allowed = (type(None), *NULLABLE[name])
    elif isinstance(current, bool):
        allowed = (bool,)
    elif isinstance(current, float):
        allowed = (int, float)
    else:
        allowed = (type(current),)
    if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
        names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise ConfigError(f"{where}{name} must be {names}, got {value!r}")
    if name in CHOICES and value not in CHOICES[name]:
        raise ConfigError(f"{where}{name} must be one of {', '.join(CHOICES[name])}, "
                          f"got {value!r}")
    if isinstance(value, list) and isinstance(current, list) and current:
        kind = type(current[0])
        if not all(isinstance(v, kind) for v in value):
            raise ConfigError(f"{where}{name} must be a list of {kind.__name__}, got {value!r}")
    return float(value) if isinstance(current, float) and value is not None else value


def config_hash(config: dict, sections: tuple[str, ...] | None = None) -> str:
    """Short SHA-1 of the sections that shape products (or of ``sections``), with the
    pipeline version."""
    shaping = {k: v for k, v in config.items()
               if (k in sections if sections is not None else k not in NOT_IN_HASH)}
    text = json.dumps(shaping, sort_keys=True) + __version__
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def dump(config: dict) -> str:
    """The configuration as YAML text (what ``panacea-lrs2 config`` prints)."""
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False)


@dataclass(frozen=True)
class Selection:
    """Which exposures of a night are reduced as science."""

    kinds: tuple[str, ...] = ("sci",)
    object: str | None = None


@dataclass(frozen=True)
class FluxSettings:
    """Where the flux calibration comes from."""

    standard_star_date: str | None = None
    standard_star_obsid: int | None = None
    standards_dir: str | None = None
    response_dir: str | None = None
    default_response: bool = True


@dataclass(frozen=True)
class ExecutorSettings:
    """How the tasks of a night are run."""

    engine: str = "processes"
    jobs: int = 1
    scheduler: str | None = None
    slurm: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RunConfig:
    """Everything a night run needs, typed: built from the YAML file and the command line.

    Attributes
    ----------
    dates : tuple of str
        Nights to reduce, YYYYMMDD.
    channels : tuple of str
        Channel names, in the order asked for.
    baseraw, output : Path
        Raw archive root and product tree root.
    calibration, science : CalibrationOptions, ScienceOptions
        Stage options.
    selection, flux, executor : Selection, FluxSettings, ExecutorSettings
    force : bool
        Rebuild products even when up to date.
    wait : bool
        Wait for another run's lock instead of exiting with code 3.
    night_log : bool
        Also log to ``{output}/NIGHTS/{date}/panacea_{date}.log``.
    cubes : tuple of str
        Kinds of data cube to write (of ``obs``, ``sky``, ``skysub``; empty: none).
    settings : dict
        The effective configuration (for ``config`` and the provenance).
    config_hash : str
        Hash of the product-shaping settings and the version (science products).
    calibration_hash : str
        Hash of the ``calibration`` section and the version (calibration bundles).
    """

    dates: tuple[str, ...]
    channels: tuple[str, ...]
    baseraw: Path
    output: Path
    calibration: CalibrationOptions
    science: ScienceOptions
    selection: Selection = Selection()
    flux: FluxSettings = FluxSettings()
    executor: ExecutorSettings = ExecutorSettings()
    force: bool = False
    wait: bool = False
    night_log: bool = True
    cubes: tuple[str, ...] = ("skysub",)
    settings: dict = field(default_factory=dict)
    config_hash: str = ""
    calibration_hash: str = ""

    @property
    def date(self) -> str:
        """The first (usually only) night."""
        return self.dates[0]


def build(settings: dict, dates: tuple[str, ...], channels: tuple[str, ...],
          **overrides) -> RunConfig:
    """The :class:`RunConfig` of an effective configuration ``settings`` (see :func:`load`)
    for ``dates`` and ``channels``; ``overrides`` set RunConfig fields directly (those the
    command line owns: force, wait, cubes, selection, flux)."""
    settings = copy.deepcopy(settings)
    cal, sci, flux, ex = (settings[k] for k in ("calibration", "science", "flux", "executor"))
    jobs = ex["jobs"] or (os.cpu_count() or 1)
    run = RunConfig(
        dates=tuple(dates), channels=tuple(channels),
        baseraw=Path(settings["archive"]["baseraw"]),
        output=Path(settings["archive"]["output"]),
        calibration=CalibrationOptions(use_flat=cal["use_flat"], overscan=cal["overscan"],
                                       windows=dict(cal["windows"])),
        science=ScienceOptions(sky_method=sci["sky_method"], cosmic_method=sci["cosmic_method"],
                               correct_ftf=sci["correct_ftf"],
                               central_wave=sci["central_wave"],
                               wavelength_bin=sci["wavelength_bin"]),
        selection=Selection(kinds=tuple(sci["kinds"])),
        flux=FluxSettings(standards_dir=flux["standards_dir"],
                          response_dir=flux["response_dir"],
                          default_response=flux["default_response"]),
        executor=ExecutorSettings(engine=ex["engine"], jobs=jobs, scheduler=ex["scheduler"],
                                  slurm=dict(ex["slurm"])),
        night_log=settings["logging"]["night_log"],
        cubes=_cubes(sci["cubes"]),
        settings=settings,
        config_hash=config_hash(settings),
        calibration_hash=config_hash(settings, ("calibration",)),
    )
    return _replace(run, overrides)


def _cubes(text: str) -> tuple[str, ...]:
    """The ``science.cubes`` setting as kinds of cube (ConfigError naming the key)."""
    from ..exposure_products import parse_cubes

    try:
        return parse_cubes(text)
    except ValueError as err:
        raise ConfigError(f"science.cubes: {err}") from None


def _replace(run: RunConfig, overrides: dict) -> RunConfig:
    from dataclasses import replace

    return replace(run, **overrides) if overrides else run
