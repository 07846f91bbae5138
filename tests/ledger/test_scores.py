"""Contribution scores on real federated rounds (digits, an MLP): the sampling estimators agree
with exact Shapley within their error bound; duplicates share credit; free riders, label
flippers and sign flippers score near zero or below and are paid nothing; a robust rule's own
decisions remove attackers before scoring."""

from __future__ import annotations

import json

import numpy as np
import pytest

import koinon as kn
from koinon.config import Config
from koinon.data import DATASETS
from koinon.experiment import run_experiment
from koinon.ledger import CONTRIBUTIONS, Budget, LedgerSettings, Validation, attach, exact_shapley
from koinon.ledger.contribution import RoundGame, RoundUpdates
from koinon.ledger.population import population_federation, true_quality
from koinon.ledger.shapley import permutation_shapley
from koinon.ledger.verify import verify_run

ROLES = ["clean", "clean", "clean", "duplicate:0", "free_rider", "label_flip"]


def federation(roles, seed=0):
    ds = DATASETS.build("digits", {}, "data", seed=seed, test_fraction=0.2, num_clients=len(roles))
    model = kn.build_model("mlp", {"hidden": [32]}, ds.input_shape, ds.num_classes, seed)
    return population_federation(model, ds, roles, seed, local=kn.LocalTraining(lr=0.1, epochs=1, batch_size=32))


@pytest.fixture(scope="module")
def captured():
    fed = federation(["clean", "clean", "clean", "noisy:0.5", "label_flip", "sign_flip"])
    rounds = []
    fed.server.observer = rounds.append
    for _ in range(2):
        fed.run_round(evaluate=False)
    ds = fed.data.dataset
    validation = Validation(fed.model, fed.layout, ds.x_test, ds.y_test, "loss")
    c = rounds[-1]
    return RoundUpdates(c.round, c.clients, c.previous, c.updates, c.weights, c.lr), validation


@pytest.mark.parametrize("guided", [False, True])
def test_tmc_and_gtg_within_their_error_bound_of_exact_on_six_clients(captured, guided):
    data, validation = captured
    game = RoundGame(data, validation)
    exact = exact_shapley(game).values
    est = permutation_shapley(game, np.random.default_rng(1), guided=guided, budget=Budget(max_permutations=300))
    assert np.all(np.abs(est.values - exact) <= 4 * est.stderr + 1e-6), (est.values, exact, est.stderr)
    # The attackers (rows 4, 5) are the worst players of the round.
    assert set(np.argsort(exact)[:2]) == {4, 5}


def test_registered_methods_score_a_real_round(captured):
    data, validation = captured
    for name in ("exact", "loo", "tmc", "gtg", "shapfed", "cosine", "trust"):
        est = CONTRIBUTIONS.build(name, {}, "ledger").score(data, validation, 0, Budget())
        assert est.values.shape == (6,), name
        assert est.values[5] < est.values[:3].min(), name  # the sign flipper ranks below the clean
    trust = CONTRIBUTIONS.build("trust", {}, "ledger").score(data, validation, 0, Budget())
    assert trust.values[5] == 0.0  # ReLU of a negative cosine


@pytest.fixture(scope="module")
def paid(tmp_path_factory):
    fed = federation(ROLES)
    out = tmp_path_factory.mktemp("pop")
    ledger = attach(fed, out, LedgerSettings("exact", {}, payout_cents=100_000))
    for _ in range(4):
        fed.run_round(evaluate=False)
    payout = ledger.finish(out)
    totals = {c: v / 1e9 for c, v in ledger.totals.items()}
    return totals, payout, out


def test_duplicates_share_credit(paid):
    totals, payout, _ = paid
    clean = np.mean([totals[1], totals[2]])
    assert totals[0] > 0 and totals[3] > 0
    assert abs(totals[0] - totals[3]) < 0.35 * clean  # the pair splits its credit evenly


def test_free_rider_and_label_flipper_score_at_most_zero_and_are_paid_nothing(paid):
    totals, payout, out = paid
    clean = np.mean([totals[0], totals[1], totals[2]])
    assert totals[4] == 0.0 and "free rider" in payout.reasons[4]
    assert totals[5] < 0.05 * clean
    assert payout.paid[4] == payout.paid[5] == 0
    assert sum(payout.paid.values()) == 100_000
    assert true_quality("free_rider") == 0.0 and true_quality("noisy:0.25") == 0.75
    assert verify_run(out).ok  # the Python API's folder verifies (hashes, signatures, payouts)


def test_a_robust_rules_drops_are_removed_before_scoring_and_replayed(tmp_path):
    cfg = Config.from_dict({
        "seed": 1, "data": {"name": "digits", "partition": "iid", "num_clients": 10},
        "model": {"name": "mlp", "hidden": [16]}, "client": {"epochs": 1, "batch_size": 32, "lr": 0.1},
        "server": {"rounds": 3, "clients_per_round": 10}, "aggregator": {"name": "multi_krum"},
        "attack": {"name": "sign_flip", "fraction": 0.2},
        "ledger": {"contribution": "loo", "payout_cents": 5000},
    })
    run_experiment(cfg, tmp_path / "run", progress=False)
    log = [json.loads(x) for x in (tmp_path / "run" / "ledger" / "log.jsonl").read_text().splitlines()]
    aggregates = [e for e in log if e["type"] == "aggregate"]
    dropped = {int(c) for e in aggregates for c, why in e["excluded"].items() if why == "dropped by multi_krum"}
    assert dropped and all(set(e["scored"]).isdisjoint(
        {int(c) for c, why in e["excluded"].items() if why.startswith("dropped")}) for e in aggregates)
    payout = log[-1]
    for c in payout["flagged"]:
        assert payout["paid"][c] == 0
    assert sum(payout["paid"].values()) == 5000
    report = verify_run(tmp_path / "run")
    assert report.ok and not report.partial, (report.failure, report.partial)
    assert not any("hash only" in n for n in report.notes), report.notes  # replayed, not hash-only


def test_shapfed_class_wise_scores(captured):
    from koinon.ledger.classwise import ClassGame, ShapFed, output_rows

    data, validation = captured
    rows = output_rows(validation.layout, 10)
    assert rows.shape == (10, 33)  # the MLP's last layer: 32 weights and a bias per class
    method = ShapFed()
    per_class = method.class_scores(data, validation)
    overall = method.score(data, validation, 0, Budget())
    assert per_class.shape == (6, 10)
    np.testing.assert_allclose(per_class.mean(axis=1), overall.values, atol=1e-12)  # linearity
    # Efficiency per class: the values add up to v_c(N) - v_c(empty) = 1 - 0.
    np.testing.assert_allclose(per_class.sum(axis=0), 1.0, atol=1e-9)
    assert overall.values[5] < 0 < overall.values[:3].min()  # the sign flipper points away
    game = ClassGame(data, rows)
    sampled = ShapFed(max_exact=2, max_permutations=400).score(data, validation, 0, Budget())
    assert np.all(np.abs(sampled.values - overall.values) <= 4 * sampled.stderr + 1e-9)
    assert game.values(np.ones((1, 6), bool))[0] == pytest.approx(1.0)
