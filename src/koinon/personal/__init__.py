"""Personalization and heterogeneity: every client gets the model that serves it, measured per client.

- methods, registered as client algorithms (`client.algorithm = ...`): `finetune` (FedAvg +
  local fine-tuning), `fedbn`, `fedper`, `fedrep`, `ditto`, `perfedavg` (first-order), `ifca`,
  `clustered_meta` (hierarchical clustering of client updates + meta-learning in clusters),
  `fedbabu` (the body trains under a fixed random head, then fine-tuning), `fedcac` (per-parameter sensitivity decides what a client shares, and with whom), `pfedpg`
  (a server-side generator of client-specific prompts); each has a `personalize` hook giving
  every client its own model (`base.py`);
- methods for labels a federation lacks and for virtual data: `fedossl` (open-world
  semi-supervised), `kafal` (active learning under a label budget), `fedlgd` (training on
  distilled virtual data);
- `LabelSetting`: unlabeled clients, partly labeled clients, classes never labeled
  (`labels.py`; `data.unlabeled_clients`, `data.label_fraction`, `data.unseen_classes`);
- `PersonalEvaluation`: personalized accuracy per client on its held-out split, and on clients
  kept out of training (`evaluate.py`; `data.client_test_fraction`, `data.holdout_clients`);
- `feature_shift`: per-client or per-group input transforms (`shift.py`; `data.feature_shift`).
"""
from koinon.personal import clusters as _clusters  # noqa: F401  (registers ifca, clustered_meta)
from koinon.personal import fedbabu as _fedbabu  # noqa: F401  (registers fedbabu)
from koinon.personal import fedcac as _fedcac  # noqa: F401  (registers fedcac)
from koinon.personal import fedconv as _fedconv  # noqa: F401  (registers fedconv)
from koinon.personal import fedins as _fedins  # noqa: F401  (registers fedins)
from koinon.personal import fedka as _fedka  # noqa: F401  (registers fedka)
from koinon.personal import fedlgd as _fedlgd  # noqa: F401  (registers fedlgd)
from koinon.personal import fedossl as _fedossl  # noqa: F401  (registers fedossl)
from koinon.personal import fraug as _fraug  # noqa: F401  (registers fraug)
from koinon.personal import kafal as _kafal  # noqa: F401  (registers kafal)
from koinon.personal import meta as _meta  # noqa: F401  (registers perfedavg)
from koinon.personal import methods as _methods  # noqa: F401  (registers finetune, fedbn, fedper, fedrep, ditto)
from koinon.personal import pfedgate as _pfedgate  # noqa: F401  (registers pfedgate)
from koinon.personal import pfedpg as _pfedpg  # noqa: F401  (registers pfedpg)
from koinon.personal import recon as _recon  # noqa: F401  (registers reconnaissance)
from koinon.personal.base import personal_downlinks, personal_payloads
from koinon.personal.clusters import IFCA, ClusteredMeta, hierarchical_clusters
from koinon.personal.evaluate import (
    PersonalEvaluation,
    per_client_accuracy,
    personal_models,
    split_new_clients,
    summarize,
)
from koinon.personal.fedbabu import FedBABU
from koinon.personal.fedcac import FedCAC
from koinon.personal.fedconv import FedConv
from koinon.personal.fedins import FedIns
from koinon.personal.fedka import FedKA
from koinon.personal.fedlgd import FedLGD
from koinon.personal.fedossl import FedoSSL
from koinon.personal.fraug import FRAug
from koinon.personal.kafal import KAFAL
from koinon.personal.labels import LabelSetting, PartlyLabeled
from koinon.personal.meta import PerFedAvg
from koinon.personal.methods import Ditto, FedBN, FedPer, FedRep, FineTune
from koinon.personal.pfedgate import PFedGate
from koinon.personal.pfedpg import PFedPG
from koinon.personal.recon import Reconnaissance
from koinon.personal.shift import SHIFTS, feature_shift

__all__ = [
    "ClusteredMeta", "Ditto", "FRAug", "FedBABU", "FedBN", "FedCAC", "FedConv", "FedIns", "FedKA", "FedLGD", "FedPer",
    "FedRep", "FedoSSL", "FineTune", "IFCA", "KAFAL", "LabelSetting", "PFedGate", "PFedPG", "PartlyLabeled",
    "PerFedAvg", "PersonalEvaluation", "Reconnaissance", "SHIFTS", "feature_shift", "hierarchical_clusters",
    "per_client_accuracy", "personal_downlinks", "personal_models", "personal_payloads", "split_new_clients", "summarize",
]
