"""Collaboration without one shared model: owners' experts behind a router, and distillation.

`Mixture` (a frozen public model, one expert per owner, a router; owners opt out at inference),
the routers (`DomainRouter`: FlexOlmo's domain embeddings; `LinearRouter`: trained on public
data), per-owner domain shifts (`shift_domains`), and the distillation losses (`kl`, `bdkd`,
`taid`) and KnFu's knowledge fusion. The topologies that train them are
`koinon.topology.experts` (`topology.name = "experts"` and `"distillation"`).
"""

from koinon.experts.distill import (
    LOSSES,
    TaidSchedule,
    bdkd_loss,
    consensus,
    fuse,
    kl_loss,
    knfu_weights,
    taid_loss,
    taid_target,
)
from koinon.experts.domains import SHIFTS, domain_test_sets, shift_domains
from koinon.experts.mixture import DomainRouter, LinearRouter, Mixture, features_and_logits, route

__all__ = [
    "LOSSES", "SHIFTS", "DomainRouter", "LinearRouter", "Mixture", "TaidSchedule", "bdkd_loss",
    "consensus", "domain_test_sets", "features_and_logits", "fuse", "kl_loss", "knfu_weights",
    "route", "shift_domains", "taid_loss", "taid_target",
]
