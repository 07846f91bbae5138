"""Runtimes: where client work runs. Importing this package registers every runtime."""

from koinon.runtime import local as _local  # noqa: F401  (registers inprocess, vectorized)
from koinon.runtime import ray as _ray  # noqa: F401  (registers ray; Ray itself is imported in setup)
from koinon.runtime.base import RUNTIMES, Runtime
from koinon.runtime.trainer import CohortResult, CohortTrainer, evaluate, mix_seed

__all__ = ["RUNTIMES", "CohortResult", "CohortTrainer", "Runtime", "evaluate", "mix_seed"]
