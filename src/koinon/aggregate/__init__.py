"""Aggregators over stacked updates. Importing this package registers every aggregator."""

from koinon.aggregate import mean as _mean  # noqa: F401  (registers mean)
from koinon.aggregate.base import AGGREGATORS, Aggregator, check_stack

__all__ = ["AGGREGATORS", "Aggregator", "check_stack"]
