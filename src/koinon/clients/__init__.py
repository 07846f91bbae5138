"""Client algorithms (local SGD, FedProx, SCAFFOLD, worker momentum, SPSA) and local-training
hyperparameters."""

from koinon.clients import adversarial as _adversarial  # noqa: F401  (registers adversarial)
from koinon.clients import autoflip as _autoflip  # noqa: F401  (registers autoflip)
from koinon.clients import curriculum as _curriculum  # noqa: F401  (registers curriculum)
from koinon.clients import feddyn as _feddyn  # noqa: F401  (registers feddyn)
from koinon.clients import fedlex as _fedlex  # noqa: F401  (registers fedlex)
from koinon.clients import fednova as _fednova  # noqa: F401  (registers fednova)
from koinon.clients import frl as _frl  # noqa: F401  (registers frl)
from koinon.clients import mime as _mime  # noqa: F401  (registers mime_lite)
from koinon.clients import momentum as _momentum  # noqa: F401  (registers worker_momentum)
from koinon.clients import moon as _moon  # noqa: F401  (registers moon)
from koinon.clients import sam as _sam  # noqa: F401  (registers fedsam, fedspeed)
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
