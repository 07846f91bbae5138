"""Population-based training: truncation selection copies weights, perturbs hyper-parameters."""

import json

import numpy as np
import pytest
import torch

from koinon.config import Config
from koinon.experiment.pbt import Member, exploit_explore, population_based_training


def _members():
    out = []
    for i, acc in enumerate([0.5, 0.9, 0.7, 0.3]):
        hypers = {"client.lr": 0.1 * (i + 1), "client.steps": 10 + i, "server.lr": 1.0}
        out.append(Member(i, hypers, {"server/params": torch.full((3,), float(i))}, acc))
    return out


def test_the_bottom_copies_the_top_and_perturbs_its_hyperparameters():
    members = _members()
    copies = exploit_explore(members, np.random.default_rng(0), fraction=0.25, factors=(0.8, 1.2))
    assert copies == {3: 1}  # worst (0.3) copies best (0.9)
    loser, winner = members[3], members[1]
    assert torch.equal(loser.state["server/params"], winner.state["server/params"])
    assert loser.state["server/params"] is not winner.state["server/params"]  # a copy
    assert loser.hypers["client.lr"] in (pytest.approx(0.2 * 0.8), pytest.approx(0.2 * 1.2))
    assert loser.hypers["client.steps"] in (round(11 * 0.8), round(11 * 1.2))
    assert isinstance(loser.hypers["client.steps"], int)
    assert loser.hypers["server.lr"] in (pytest.approx(0.8), pytest.approx(1.2))
    assert [m.hypers["client.lr"] for m in members[:3]] == [0.1, 0.2, pytest.approx(0.3)]  # others untouched
    with pytest.raises(ValueError, match="fraction"):
        exploit_explore(members, np.random.default_rng(0), fraction=0.8)


def test_population_based_training_logs_a_lineage(tmp_path):
    cfg = Config().with_overrides({"data.num_clients": 10, "server.clients_per_round": 4, "client.steps": 3,
                                   "runtime.name": "inprocess"})
    lineage = population_based_training(cfg, population=4, generations=2, interval=2, workers=0, out=tmp_path)
    assert len(lineage) == 8 and {r["round"] for r in lineage} == {2, 4}
    first = [r for r in lineage if r["generation"] == 0]
    copied = [r for r in first if r["copied_from"] is not None]
    assert len(copied) == 1
    best = max(first, key=lambda r: r["accuracy"])
    assert copied[0]["copied_from"] == best["member"]
    # Selection ranks the validation half; the test half is reported beside it, never ranked.
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in lineage)
    assert any(r["test_accuracy"] != r["accuracy"] for r in lineage)
    assert json.loads((tmp_path / "lineage.json").read_text()) == lineage
    assert (tmp_path / "lineage.png").stat().st_size > 0
