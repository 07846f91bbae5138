"""Attacks for robustness evaluation. Importing this package registers every attack."""

from koinon.attacks import simple as _simple  # noqa: F401  (registers label_flip, sign_flip)
from koinon.attacks.base import ATTACKS, Attack, AttackContext, DataAttack, ModelAttack, honest_rows

__all__ = ["ATTACKS", "Attack", "AttackContext", "DataAttack", "ModelAttack", "honest_rows"]
