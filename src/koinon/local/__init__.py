"""Local training: the cohort trainer, losses, evaluation and local optimizers.

Below every algorithm family and every driver: federated clients, gossip peers, the server's
root training and DiLoCo's inner steps all train through `CohortTrainer` and `LOCAL_OPTIMIZERS`.
"""

from koinon.local.algorithm import ClientAlgorithm, LocalTraining, State
from koinon.local.losses import cross_entropy, evaluate
from koinon.local.optim import LOCAL_OPTIMIZERS, SGD, AdamW, LocalOptimizer
from koinon.local.trainer import CohortTrainer, start_stack

__all__ = [
    "LOCAL_OPTIMIZERS", "SGD", "AdamW", "ClientAlgorithm", "CohortTrainer", "LocalOptimizer",
    "LocalTraining", "State", "cross_entropy", "evaluate", "start_stack",
]
