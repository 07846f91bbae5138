"""Attacks for robustness evaluation. Importing this package registers every attack."""

from koinon.attacks import data as _data  # noqa: F401  (registers backdoor)
from koinon.attacks import model as _model  # noqa: F401  (gaussian, alie, ipm, min_max, min_sum, mimic, optimal)
from koinon.attacks import simple as _simple  # noqa: F401  (registers label_flip, sign_flip, none)
from koinon.attacks.base import ATTACKS, Attack, AttackContext, DataAttack, ModelAttack, honest_rows

__all__ = ["ATTACKS", "Attack", "AttackContext", "DataAttack", "ModelAttack", "honest_rows"]
