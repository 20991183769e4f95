"""Looking at attention: sparsity statistics, heatmaps and a side-by-side HTML report of attention dumps.

Reads the dumps of :mod:`structattn.export`. :mod:`.stats` needs only numpy; :mod:`.plot` and :mod:`.html`
import matplotlib lazily (Agg, no display needed). Console commands: ``structattn-stats``, ``structattn-plot``,
``structattn-report`` (:mod:`.cli`).
"""

from .stats import dump_stats, matrix_stats, row_segments, row_support

__all__ = ["dump_stats", "matrix_stats", "row_segments", "row_support"]
