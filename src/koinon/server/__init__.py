"""Server optimizers and client samplers."""

from koinon.server import feedback as _feedback  # noqa: F401  (registers the learning samplers)
from koinon.server.optimizers import SERVER_OPTIMIZERS, ServerOptimizer
from koinon.server.samplers import SAMPLERS, Feedback, Sampler

__all__ = ["SAMPLERS", "SERVER_OPTIMIZERS", "Feedback", "Sampler", "ServerOptimizer"]
