"""Attacks through a real federation: every attack runs, and robust rules resist sign flipping."""

import math

import pytest

import koinon as kn
from koinon.aggregate import build_aggregator
from koinon.attacks import ATTACKS
from koinon.config import Config
from koinon.data import DATASETS
from koinon.experiment.runner import build_federation


@pytest.mark.parametrize("name", [n for n in ATTACKS.names() if n != "none"])
def test_every_attack_runs_in_a_federation(name):
    cfg = Config().with_overrides({
        "data.num_clients": 10, "server.clients_per_round": 6, "attack.name": name,
        "attack.fraction": 0.3, "aggregator.name": "median",
    })
    fed = build_federation(cfg)
    results = fed.fit(2, eval_every=2)
    assert sum(r.num_byzantine for r in results) > 0  # the attack was exercised
    assert math.isfinite(results[-1].test_loss)
    if name == "backdoor":
        assert 0.0 <= results[-1].extra["backdoor_success"] <= 1.0


def accuracy_under_sign_flip(aggregator: str, fraction: float) -> float:
    ds = DATASETS.build("digits", {}, "data", seed=0, test_fraction=0.2, num_clients=20)
    data = kn.partition_dataset(ds, "iid", num_clients=20, seed=0, options={})
    model = kn.build_model("mlp", {}, ds.input_shape, ds.num_classes, 0)
    fed = kn.Federation(
        model, data, local=kn.LocalTraining(lr=0.05, epochs=2, momentum=0.9),
        clients_per_round=20, runtime="vectorized", seed=0,
        aggregator=build_aggregator(aggregator, {}, 6),
        # Scale 3: the six attackers outweigh the fourteen honest clients in a plain mean
        # (14 - 3 * 6 < 0), while they remain a minority for the median.
        attack=ATTACKS.build("sign_flip", {"scale": 3.0}, "attack"), byzantine_fraction=fraction,
    )
    return fed.fit(15, eval_every=15)[-1].test_accuracy


def test_fltrust_defeats_sign_flipping_that_breaks_the_mean():
    # The server's own update on its clean root data gives the sign flippers no trust.
    attacked_mean = accuracy_under_sign_flip("mean", 0.3)
    assert attacked_mean < 0.3
    assert accuracy_under_sign_flip("fltrust", 0.3) > max(0.85, attacked_mean + 0.5)


@pytest.mark.slow
def test_sign_flip_breaks_the_mean_but_not_median_or_trimmed_mean():
    clean = accuracy_under_sign_flip("mean", 0.0)
    assert clean > 0.85  # the task is learnt in 15 rounds without attackers
    attacked_mean = accuracy_under_sign_flip("mean", 0.3)
    assert attacked_mean < 0.3
    for rule in ("median", "trimmed_mean"):
        assert accuracy_under_sign_flip(rule, 0.3) > max(clean - 0.05, attacked_mean + 0.4)
