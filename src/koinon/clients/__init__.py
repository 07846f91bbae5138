"""Client algorithms (local SGD, FedProx, SCAFFOLD, worker momentum, SPSA) and local-training
hyperparameters."""

from koinon.clients import curriculum as _curriculum  # noqa: F401  (registers curriculum)
from koinon.clients import momentum as _momentum  # noqa: F401  (registers worker_momentum)
from koinon.clients import spsa as _spsa  # noqa: F401  (registers spsa)
from koinon.clients.base import (
    CLIENT_ALGORITHMS,
    ClientAlgorithm,
    FedProx,
    LocalSGD,
    LocalTraining,
    Scaffold,
)
from koinon.clients.momentum import WorkerMomentum

__all__ = [
    "CLIENT_ALGORITHMS", "ClientAlgorithm", "FedProx", "LocalSGD", "LocalTraining", "Scaffold",
    "WorkerMomentum",
]
