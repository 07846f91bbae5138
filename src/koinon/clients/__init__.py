"""Client algorithms (local SGD, FedProx, SCAFFOLD) and local-training hyperparameters."""

from koinon.clients.base import (
    CLIENT_ALGORITHMS,
    ClientAlgorithm,
    FedProx,
    LocalSGD,
    LocalTraining,
    Scaffold,
)

__all__ = ["CLIENT_ALGORITHMS", "ClientAlgorithm", "FedProx", "LocalSGD", "LocalTraining", "Scaffold"]
