"""Hidden labels (unlabeled clients, unseen classes), FedoSSL and KAFAL: the data settings on a
hand-made split, each method's defining step against a hand-computed case, both runtimes."""

import math

import pytest
import torch
from torch import nn

import koinon as kn
from koinon.data import FederatedData
from koinon.errors import ConfigError
from koinon.experiment.runner import build_federation
from koinon.local import LocalTraining
from koinon.personal.fedossl import FedoSSL, _SemiSupervisedLoss, calibrated_targets, encode
from koinon.personal.kafal import KAFAL, ksas_scores, labels_used, pick
from koinon.personal.labels import UNLABELED, LabelSetting, PartlyLabeled, matched_accuracy
from koinon.topology.evaluation import Evaluation


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 10))


def _digits(num_clients=8):
    ds = kn.DATASETS.get("digits")(seed=0, test_fraction=0.2, num_clients=num_clients)
    return kn.partition_dataset(ds, "dirichlet", num_clients, seed=0, options={"alpha": 0.5})


def _hand_made():
    x = torch.zeros(12, 1)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])
    ds = kn.Dataset.from_tensors(x, y, x[:3], y[:3], num_classes=3)
    return FederatedData(ds, [torch.arange(0, 6), torch.arange(6, 12)])


def test_unseen_classes_lose_their_labels_everywhere_and_nothing_else_does():
    data = _hand_made()
    out = LabelSetting(unseen_classes=(2,)).apply(data, seed=0)
    assert isinstance(out, PartlyLabeled)
    assert [ix.tolist() for ix in out.client_indices] == [[0, 1, 3, 4], [6, 7, 9, 10]]
    assert [ix.tolist() for ix in out.unlabeled] == [[2, 5], [8, 11]]
    assert out.dataset.y_train[[2, 5, 8, 11]].tolist() == [UNLABELED] * 4
    assert torch.equal(out.reveal(torch.tensor([2, 11])), torch.tensor([2, 2]))
    assert data.dataset.y_train[2] == 2  # the input is not changed


def test_unlabeled_clients_and_label_fraction():
    data = _digits(8)
    out = LabelSetting(unlabeled_clients=2, label_fraction=0.25).apply(data, seed=3)
    sizes = [len(ix) for ix in out.client_indices]
    assert sizes.count(0) == 2
    for c, ix in enumerate(data.client_indices):
        if sizes[c]:
            assert sizes[c] == max(1, round(0.25 * len(ix)))
        both = torch.cat([out.client_indices[c], out.unlabeled[c]]).sort().values
        assert torch.equal(both, ix.sort().values)  # every sample stays with its client
    again = LabelSetting(unlabeled_clients=2, label_fraction=0.25).apply(data, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(out.unlabeled, again.unlabeled))  # seeded


@pytest.mark.parametrize("kwargs", [{"unlabeled_clients": -1}, {"unlabeled_clients": 1.5}, {"label_fraction": 0.0},
                                    {"unseen_classes": (1, 1)}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        LabelSetting(**kwargs)


def test_matched_accuracy_maps_outputs_to_classes_over_the_whole_set():
    # Outputs 0 and 1 are owned by classes 0 and 1; class 2 (novel) comes out as 2 on 2 of 3.
    y = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    pred = torch.tensor([0, 0, 1, 1, 2, 2, 0])
    novel = y == 2
    assert matched_accuracy(pred, y, 3, novel) == pytest.approx(2 / 3)
    # Novel class named by another output (1 <-> 2 swapped) counts as found.
    assert matched_accuracy(torch.tensor([0, 0, 2, 2, 1, 1, 1]), y, 3, novel) == 1.0
    # A novel class predicted as a seen class that owns the output scores nothing.
    y = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2])
    assert matched_accuracy(torch.tensor([0, 0, 0, 0, 1, 1, 0, 0, 0]), y, 3, y == 2) == 0.0


def test_config_keys_and_personal_metrics_with_hidden_labels():
    cfg = kn.Config()
    cfg.data.num_clients, cfg.data.client_test_fraction = 8, 0.25
    cfg.data.unlabeled_clients, cfg.data.label_fraction, cfg.data.unseen_classes = 0.25, 0.5, [8, 9]
    cfg.server.rounds, cfg.server.clients_per_round = 2, 8
    fed = build_federation(cfg)
    assert isinstance(fed.data, PartlyLabeled) and [len(ix) for ix in fed.data.client_indices].count(0) == 2
    held = torch.cat(fed.holdout)
    assert bool((fed.data.dataset.y_train[held] >= 0).all())  # held-out samples keep their labels
    extra = fed.fit(2)[-1].extra
    for key in ("personal_accuracy_mean", "personal_accuracy_p10", "personal_accuracy_min", "seen_accuracy",
                "novel_accuracy"):
        assert key in extra
    cfg.data.unseen_classes = [10]
    with pytest.raises(ConfigError, match="unseen_classes"):
        build_federation(cfg)
    cfg.data.unseen_classes, cfg.data.unlabeled_clients = [], 8
    with pytest.raises(ConfigError, match="unlabeled_clients"):
        build_federation(cfg)


def test_fedossl_calibrated_pseudo_labels_by_hand():
    probs = torch.tensor([[0.8, 0.2], [0.6, 0.4]])
    # marginal (0.7, 0.3); q / marginal: (8/7, 2/3) and (6/7, 4/3) -> normalized:
    t0 = torch.tensor([8 / 7, 2 / 3]) / (8 / 7 + 2 / 3)
    t1 = torch.tensor([6 / 7, 4 / 3]) / (6 / 7 + 4 / 3)
    label, weight = calibrated_targets(probs, threshold=0.6)
    assert label.tolist() == [0, 1]  # the second sample goes to the under-predicted class
    h1 = -(t1 * t1.log()).sum()
    assert float(t0.max()) >= 0.6 and float(t1.max()) >= 0.6  # both above the threshold
    assert float(weight[0]) == pytest.approx(1 - float(-(t0 * t0.log()).sum()) / math.log(2), abs=1e-6)
    assert float(weight[1]) == pytest.approx(1 - float(h1) / math.log(2), abs=1e-6)
    assert calibrated_targets(probs, threshold=0.99)[1].tolist() == [0.0, 0.0]
    # The encoded pseudo-labels give weighted cross-entropy; labels (>= 0) weight 1.
    loss = _SemiSupervisedLoss(2, lam=0.5)
    out = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.5, 0.5]])
    y = torch.cat([encode(label, weight, 2), torch.tensor([1])])
    ce = torch.nn.functional.cross_entropy(out, torch.tensor([0, 1, 1]), reduction="none")
    w = torch.tensor([0.5 * round(float(weight[0]) * 1000) / 1000, 0.5 * round(float(weight[1]) * 1000) / 1000, 1.0])
    assert torch.allclose(loss(out, y), ce * w, atol=1e-6)


def test_ksas_picks_the_largest_local_global_disagreement():
    local = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 3.0]])
    glob = torch.zeros(3, 2)
    # KL(p || uniform) = log 2 - H(p): 0 for the uniform row, largest for the sharpest.
    p = local.softmax(1)
    expected = (p * (p.log() - math.log(0.5))).sum(1)
    assert torch.allclose(ksas_scores(local, glob), expected, atol=1e-6)
    assert pick(ksas_scores(local, glob), 2).tolist() == [0, 2]
    assert pick(torch.tensor([1.0, 1.0, 1.0]), 1).tolist() == [0]  # ties: the earlier sample


def _federation(algorithm, runtime, setting):
    return kn.Federation(_model(), _digits(8), local=LocalTraining(lr=0.1, epochs=1), clients_per_round=4,
                         seed=1, algorithm=algorithm, runtime=runtime, evaluation=Evaluation(holdout=0.2),
                         labels=setting)


@pytest.mark.parametrize("make", [lambda: FedoSSL(threshold=0.3), lambda: KAFAL(label_budget=6, query_per_round=2)],
                         ids=["fedossl", "kafal"])
def test_both_local_runtimes_give_the_same_models(make):
    setting = LabelSetting(unlabeled_clients=2, label_fraction=0.2, unseen_classes=(9,))
    feds = [_federation(make(), runtime, setting) for runtime in ("inprocess", "vectorized")]
    for fed in feds:
        fed.fit(3, eval_every=3)
    a, b = feds
    assert torch.allclose(a.params, b.params, atol=1e-5)
    assert a.client_states.keys() == b.client_states.keys()
    for c in a.client_states:
        for key in a.client_states[c]:
            assert torch.equal(a.client_states[c][key], b.client_states[c][key])


def test_kafal_buys_labels_within_its_budget_and_trains_on_them():
    setting = LabelSetting(label_fraction=0.1)
    fed = _federation(KAFAL(label_budget=5, query_per_round=2), "vectorized", setting)
    start = labels_used(fed.data, fed.client_states)
    fed.fit(4, eval_every=4)
    for c, st in fed.client_states.items():
        q = st["queried"]
        assert 0 < len(q) <= 5 and len(set(q.tolist())) == len(q)
        assert bool(torch.isin(q, fed.data.unlabeled[c]).all())  # only its own unlabeled samples
    assert labels_used(fed.data, fed.client_states) - start == sum(len(s["queried"]) for s in fed.client_states.values())


def test_fedossl_trains_unlabeled_clients():
    """A client without a single label still changes the model and counts in the average."""
    setting = LabelSetting(unlabeled_clients=7)  # one labeled client of 8
    fed = _federation(FedoSSL(threshold=0.0), "vectorized", setting)
    dark = [c for c in range(8) if len(fed.data.client_indices[c]) == 0]
    result = fed.runtime.train(dark[:2], fed.params, {}, [{}, {}], 1, 0)
    assert result.deltas is not None and bool((result.deltas.abs().sum(1) > 0).all())
    # Weighted by the samples it trained on: its pseudo-labeled ones (weight > 0 after rounding).
    for i, c in enumerate(dark[:2]):
        assert 0 < int(result.num_samples[i]) <= len(fed.data.unlabeled[c])


def test_clustering_takes_a_zero_update_as_unlike_every_other():
    """A client with nothing to train on (no labels) uploads zero: no cosine direction."""
    from koinon.personal.clusters import hierarchical_clusters

    updates = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 0.1], [0.0, 1.0]])
    assert hierarchical_clusters(updates, 0.5, 3).tolist() == [0, 1, 0, 2]


def test_kcfu_compensation_by_hand():
    from koinon.personal.kafal import compensation, weak_classes

    assert weak_classes(torch.tensor([0, 0, 1]), 3).tolist() == [0.0, 0.5, 1.0]
    g = torch.tensor([[0.0, 0.0]])  # p_global = (1/2, 1/2)
    local = torch.tensor([[math.log(3.0), 0.0]])  # p_local = (3/4, 1/4)
    # weight 1/2 * 0 + 1/2 * 1; KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3).
    out = compensation(g, local, torch.tensor([0.0, 1.0]))
    assert float(out[0]) == pytest.approx(0.25 * math.log(4 / 3), abs=1e-6)
