"""The LRS2 night simulator: raw frames in the archive's exact layout, with the truth.

See :func:`simulate_night` and the README written into the truth folder.
"""

from .night import NightConfig, plan_night, simulate_night

__all__ = ["NightConfig", "plan_night", "simulate_night"]
