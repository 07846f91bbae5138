"""Client algorithms (local SGD, FedProx, SCAFFOLD, SPSA) and local-training hyperparameters."""

from koinon.clients import spsa as _spsa  # noqa: F401  (registers spsa)
from koinon.clients.base import (
    CLIENT_ALGORITHMS,
    ClientAlgorithm,
    FedProx,
    LocalSGD,
    LocalTraining,
    Scaffold,
)

__all__ = ["CLIENT_ALGORITHMS", "ClientAlgorithm", "FedProx", "LocalSGD", "LocalTraining", "Scaffold"]
