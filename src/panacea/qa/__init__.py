"""Quality assessment of a reduced night: metrics with thresholds, PNG plots, HTML report.

``metrics`` reads what a night left on disk (calibration bundles, responses, ``multi_*``,
``spectrum_*`` and ``joined_*`` products) and judges it against the thresholds of
``panacea/data/qa.yaml``; ``plots`` draws the diagnostic figures (matplotlib, Agg);
``report`` writes the static HTML pages. The plotting helpers of the benchmarks are
re-exported here.
"""

from .plots import plot_frame, plot_joined, plot_multi_summary, plot_residual_maps

__all__ = ["plot_frame", "plot_joined", "plot_multi_summary", "plot_residual_maps"]
