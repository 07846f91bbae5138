"""Server optimizers and client samplers."""

from koinon.server.optimizers import SERVER_OPTIMIZERS, ServerOptimizer
from koinon.server.samplers import SAMPLERS, Sampler

__all__ = ["SAMPLERS", "SERVER_OPTIMIZERS", "Sampler", "ServerOptimizer"]
