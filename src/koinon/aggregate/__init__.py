"""Aggregators over stacked updates. Importing this package registers every aggregator.

Final rules live in `AGGREGATORS`, pre-aggregation steps (NNM, bucketing, clipping, ARC) in
`PRE_AGGREGATORS`; `build_aggregator("nnm+trimmed_mean", options, num_byzantine)` composes them.
"""

from koinon.aggregate import bucketing as _bucketing  # noqa: F401  (registers bucketing)
from koinon.aggregate import caf as _caf  # noqa: F401  (registers caf)
from koinon.aggregate import clipping as _clipping  # noqa: F401  (centered_clipping, clipping, arc)
from koinon.aggregate import distance as _distance  # noqa: F401  (krum, multi_krum, bulyan, monna, nnm)
from koinon.aggregate import flag as _flag  # noqa: F401  (registers flag)
from koinon.aggregate import geomed as _geomed  # noqa: F401  (geometric_median)
from koinon.aggregate import mean as _mean  # noqa: F401  (registers mean)
from koinon.aggregate import signguard as _signguard  # noqa: F401  (registers signguard)
from koinon.aggregate import statistics as _statistics  # noqa: F401  (median, trimmed_mean, meamed)
from koinon.aggregate import trust as _trust  # noqa: F401  (registers fltrust)
from koinon.aggregate.base import (
    AGGREGATORS,
    PRE_AGGREGATORS,
    Aggregator,
    PreAggregator,
    check_stack,
)
from koinon.aggregate.compose import Composed, build_aggregator

__all__ = [
    "AGGREGATORS",
    "PRE_AGGREGATORS",
    "Aggregator",
    "Composed",
    "PreAggregator",
    "build_aggregator",
    "check_stack",
]
