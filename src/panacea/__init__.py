"""Panacea: the data-reduction pipeline for LRS2 on the Hobby-Eberly Telescope."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("panacea-lrs2")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"
