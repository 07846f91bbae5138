"""Runtimes: where client work runs. Importing this package registers every runtime."""

from koinon.runtime import local as _local  # noqa: F401  (registers inprocess, vectorized)
from koinon.runtime import ray as _ray  # noqa: F401  (registers ray; Ray itself is imported in setup)
from koinon.runtime.base import RUNTIMES, Runtime

__all__ = ["RUNTIMES", "Runtime"]
