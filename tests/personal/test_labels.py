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
from koinon.personal.fedossl import (
    FedoSSL,
    _OpenWorldLoss,
    assign,
    calibrated_targets,
    capped,
    merge_centroids,
    nearest_neighbours,
    outliers,
)
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


def test_fedossl_loss_by_hand():
    """Labels weigh 1; an unlabeled sample (-1 - row) weighs its table weight on its pseudo-label
    plus -pair * sum_c s_c log p_c on its neighbour's target s."""
    label = torch.tensor([0, 1, 0])
    weight = torch.tensor([0.0, 0.5, 0.0])
    pair_target = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.8, 0.0]])
    loss = _OpenWorldLoss(label, weight, pair_target, pair=0.25)
    out = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.5, 0.5]])
    y = torch.tensor([1, -2, -3])  # a label, then rows 1 and 2 of the tables
    logp = out.log_softmax(1)
    expected = torch.stack([-logp[0, 1], 0.5 * -logp[1, 1], -0.25 * 0.8 * logp[2, 0]])
    assert torch.allclose(loss(out, y), expected, atol=1e-6)
    assert torch.allclose(_OpenWorldLoss(label, weight, pair_target, pair=0.0)(out, y),
                          torch.stack([-logp[0, 1], 0.5 * -logp[1, 1], torch.tensor(0.0)]), atol=1e-6)


def test_fedossl_geometry_by_hand():
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]])
    # Nearest by cosine, itself excluded: 0 -> 2 (0.6 beats 0 and -1), 1 -> 2, 2 -> 1 (0.8), 3 -> 1 (0 beats -0.6).
    assert nearest_neighbours(e).tolist() == [2, 2, 1, 1]
    assert nearest_neighbours(e[:1]).tolist() == [0]
    mu = torch.tensor([[2.0, 0.0], [0.0, 3.0], [0.0, 0.0]])  # normalized inside; output 2 has no centroid
    has = torch.tensor([True, True, False])
    a = assign(e, mu, has, temperature=0.5)
    assert torch.allclose(a[0], torch.tensor([1.0, math.exp(-2.0), 0.0]) / (1 + math.exp(-2.0)), atol=1e-6)
    assert float(a[:, 2].abs().sum()) == 0.0
    # Least similar to every centroid: row 3 (best cosine 0); a share 1/4 of 4 rows is one row.
    assert outliers(e, mu, has, 0.25).tolist() == [3]
    assert outliers(e, mu, torch.zeros(3, dtype=torch.bool), 0.25).tolist() == []


def test_fedossl_cap_keeps_the_rows_nearest_each_novel_centroid_by_hand():
    mu = torch.tensor([[1.0, 0.0], [0.0, -2.0]])  # normalized inside: (0, -1)
    e = torch.tensor([[0.0, -1.0], [0.6, -0.8], [0.8, -0.6], [1.0, 0.0], [0.28, -0.96]])
    near = torch.tensor([1, 1, 1, 0, 1])
    chosen = torch.tensor([True, True, True, False, True])
    # Cap 0.4 of 5 rows: at most 2 rows an output. Output 1's chosen rows by cosine to (0, -1):
    # row 0 (1.0), row 4 (0.96), row 1 (0.8), row 2 (0.6): rows 0 and 4 stay.
    assert capped(e, mu, near, chosen, 0.4).tolist() == [True, False, False, False, True]
    # ceil(0.5 * 5) = 3 rows stay; cap 1 keeps all; the input is not changed.
    assert capped(e, mu, near, chosen, 0.5).tolist() == [True, True, False, False, True]
    assert capped(e, mu, near, chosen, 1.0).tolist() == chosen.tolist()
    assert chosen.tolist() == [True, True, True, False, True]


def test_fedossl_server_merges_centroids_and_seeds_a_novel_output():
    c, d = 3, 2
    old = torch.zeros(c, d)
    has = torch.zeros(c, dtype=torch.bool)
    labeled = torch.zeros(c, dtype=torch.bool)
    # Outputs 0 and 1 are labeled on some client; output 2 on none: the outliers' mean seeds it.
    sums = torch.tensor([[3.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    counts = torch.tensor([1.5, 1.0, 0.0])
    mu, has, labeled = merge_centroids(old, has, labeled, sums, counts, torch.tensor([0.5, 0.5, 0.0]),
                                       torch.tensor([-2.0, -2.0]), 2.0)
    assert labeled.tolist() == [True, True, False] and has.tolist() == [True, True, True]
    s = 1 / math.sqrt(2)
    assert torch.allclose(mu, torch.tensor([[1.0, 0.0], [0.0, 1.0], [-s, -s]]), atol=1e-6)
    # Next round: output 2 moves to the mean of the samples assigned to it; output 0 keeps its
    # centroid where no client of the cohort has labels of it (count 0); flags stay (OR).
    sums = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, -4.0]])
    mu2, has2, labeled2 = merge_centroids(mu, has, labeled, sums, torch.tensor([0.0, 1.0, 2.0]),
                                          torch.tensor([0.0, 1.0, 0.0]), torch.zeros(2), 0.0)
    assert labeled2.tolist() == [True, True, False] and has2.tolist() == [True, True, True]
    assert torch.allclose(mu2, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]), atol=1e-6)


def test_fedossl_client_targets_by_hand():
    """Outputs 0, 1 labeled, 2 novel with a centroid at (0, -1)."""
    alg = FedoSSL(lam=0.5, threshold=0.5, pair=1.0, temperature=0.1)
    mu = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    has = torch.tensor([1.0, 1.0, 1.0])
    labeled = torch.tensor([1.0, 1.0, 0.0])
    emb_l = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.28, -0.96]])  # a 0 far from its class mean
    y_l = torch.tensor([0, 1, 0])
    # u0 sits on the novel centroid (cos 1 beats the labeled (0.28, -0.96): 0.96); u1 near
    # output 0; u2 is nearest to the novel centroid (0.8) but nearer still to that labeled 0 (0.936).
    emb_u = torch.tensor([[0.0, -1.0], [0.96, 0.28], [0.6, -0.8]])
    logits_u = torch.tensor([[2.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    label, weight, pair_target, upload = alg.client_targets(emb_l, y_l, emb_u, logits_u, mu, has, labeled)
    assert label[0] == 2 and float(weight[0]) == pytest.approx(0.5)  # novel: weight lam
    ref_label, ref_weight = calibrated_targets(logits_u.softmax(1), 0.5)
    assert label[1:].tolist() == ref_label[1:].tolist()  # the model's pseudo-labels
    assert torch.allclose(weight[1:], 0.5 * ref_weight[1:])
    # Neighbours among [l0, l1, l2, u0, u1, u2]: u0 -> l2 (0.96), u1 -> l0 (0.96), u2 -> l2 (0.936).
    assert pair_target.tolist() == [[1.0, 0.0, 0.0]] * 3
    # Upload: labeled sums by label, u0 under output 2, flags, outliers (share 1/3: u2, best cos 0.8).
    sums, counts, flags = upload[:6].view(3, 2), upload[6:9], upload[9:12]
    assert torch.allclose(sums, torch.tensor([[1.28, -0.96], [0.0, 1.0], [0.0, -1.0]]))
    assert counts.tolist() == [2.0, 1.0, 1.0] and flags.tolist() == [1.0, 1.0, 0.0]
    assert torch.allclose(upload[12:14], emb_u[2]) and float(upload[14]) == 1.0
    # With u0 moved off the novel centroid to (0.6, -0.8) and u2 onto it, both are nearest to
    # it and nearer than every labeled sample; the default cap (1 / 3 outputs of 3 samples: one
    # sample) keeps u2 (cos 1) there, u0 (0.8) gets the model's pseudo-label; cap 1 keeps both.
    swapped = emb_u[[2, 1, 0]]
    emb_far = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    label, _, _, _ = alg.client_targets(emb_far, y_l[:2], swapped, logits_u, mu, has, labeled)
    assert label.tolist() == [ref_label[0], ref_label[1], 2]
    label, _, _, _ = FedoSSL(cap=1.0).client_targets(emb_far, y_l[:2], swapped, logits_u, mu, has, labeled)
    assert label.tolist() == [2, ref_label[1], 2]
    # Without discovery nothing is novel and there is no pair term.
    label, _, pair_target, _ = FedoSSL(discover=False).client_targets(emb_l, y_l, emb_u, logits_u, mu, has, labeled)
    assert label[0] == ref_label[0] and float(pair_target.abs().sum()) == 0.0


@pytest.mark.parametrize("options", [{"pair": -1.0}, {"temperature": 0.0}, {"discover": "yes"}, {"lam": -0.5},
                                     {"threshold": 1.5}, {"cap": 0.0}, {"cap": 1.5}])
def test_fedossl_refuses_bad_options_in_one_line(options):
    cfg = kn.Config()
    cfg.data.num_clients, cfg.data.unseen_classes = 8, [9]
    cfg.server.clients_per_round = 4
    cfg.client.algorithm, cfg.client.options = "fedossl", options
    with pytest.raises(ConfigError) as err:
        build_federation(cfg)
    assert "\n" not in str(err.value) and next(iter(options)) in str(err.value)


@pytest.mark.slow
def test_fedossl_finds_novel_classes_on_digits():
    """The benchmark's `unlabeled` setting, one seed: outputs 8 and 9 take the unseen digits."""
    cfg = kn.Config()
    cfg.data.num_clients, cfg.data.client_test_fraction, cfg.data.holdout_clients = 24, 0.25, 4
    cfg.data.partition, cfg.data.alpha = "dirichlet", 0.5
    cfg.data.unlabeled_clients, cfg.data.label_fraction, cfg.data.unseen_classes = 0.25, 0.25, [8, 9]
    cfg.model.name, cfg.model.options = "mlp_norm", {"hidden": [64], "norm": "layer"}
    cfg.client.lr, cfg.client.batch_size = 0.1, 16
    cfg.server.rounds, cfg.server.clients_per_round = 30, 20
    cfg.runtime.name = "vectorized"
    found = {}
    for algorithm in ("fedavg", "fedossl"):
        cfg.client.algorithm = algorithm
        fed = build_federation(cfg)
        found[algorithm] = fed.fit(30, eval_every=30)[-1].extra
    assert found["fedavg"]["novel_accuracy"] == 0.0
    assert found["fedossl"]["novel_accuracy"] > 0.3  # chance, a cluster of 2 classes' samples: about 0.1
    assert found["fedossl"]["seen_accuracy"] > 0.75


def test_ksas_is_the_symmetric_kl_of_the_count_shifted_predictions():
    local = torch.tensor([[2.0, 0.0, 5.0], [0.0, 0.0, 0.0], [0.0, 3.0, 1.0]])
    glob = torch.zeros(3, 3)

    def sym_kl(p, q):
        return 0.5 * ((p * (p / q).log()).sum(1) + (q * (q / p).log()).sum(1))

    # Without counts: the plain symmetric KL of the two predictions.
    assert torch.allclose(ksas_scores(local, glob), sym_kl(local.softmax(1), glob.softmax(1)), atol=1e-6)
    # Counts (3, 1, 0): class 2 drops out, the logits gain log 3 and log 1 (the client's class 0 weighs more).
    counts = torch.tensor([3, 1, 0])
    shifted = torch.tensor([math.log(3.0), 0.0])
    p = (local[:, :2] + shifted).softmax(1)
    q = (glob[:, :2] + shifted).softmax(1)
    scores = ksas_scores(local, glob, counts)
    assert torch.allclose(scores, sym_kl(p, q), atol=1e-6)
    # Sample 0's disagreement sits in class 2, which the client has no label of: it scores
    # below sample 2's, which disagrees on class 1.
    assert pick(scores, 1).tolist() == [2]
    assert pick(torch.tensor([1.0, 1.0, 1.0]), 1).tolist() == [0]  # ties: the earlier sample


def test_kcfu_weights_and_loss_by_hand():
    from koinon.personal.kafal import _KCFULoss, compensation_weights

    # r = (4/3, 4/1, 0) for counts (3, 1, 0), normalized: (1/4, 3/4, 0).
    assert torch.allclose(compensation_weights(torch.tensor([3, 1, 0])), torch.tensor([0.25, 0.75, 0.0]))
    label = torch.tensor([1, -1])
    shift = torch.tensor([[math.log(3.0), 0.0, -1e4], [0.0, 0.0, 0.0]])
    teacher = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.25, 0.25]])
    weight = torch.tensor([0.0, 0.75])
    loss = _KCFULoss(label, shift, teacher, weight, scale=2.0)
    out = torch.tensor([[1.0, 1.0, 9.0], [0.0, 0.0, 0.0]])
    got = loss(out, torch.tensor([-1, -2]))
    # Balanced softmax over classes 0, 1 (class 2 out): -log(e^1 / (3 e^1 + e^1)) = log 4, doubled.
    assert float(got[0]) == pytest.approx(2 * math.log(4.0), abs=1e-5)
    t = teacher[1]
    kl = float((t * (t / (1 / 3)).log()).mean())
    assert float(got[1]) == pytest.approx(0.75 * kl, abs=1e-6)


def _federation(algorithm, runtime, setting):
    return kn.Federation(_model(), _digits(8), local=LocalTraining(lr=0.1, epochs=1), clients_per_round=4,
                         seed=1, algorithm=algorithm, runtime=runtime, evaluation=Evaluation(holdout=0.2),
                         labels=setting)


@pytest.mark.parametrize("make", [lambda: FedoSSL(threshold=0.3), lambda: KAFAL(label_budget=6, query_per_round=2),
                                  lambda: KAFAL(label_budget=6, query_per_round=3, query_every=2, kd=0.0,
                                                balanced=False, sampling="random")],
                         ids=["fedossl", "kafal", "kafal-plain"])
def test_both_local_runtimes_give_the_same_models(make):
    setting = LabelSetting(unlabeled_clients=2, label_fraction=0.2, unseen_classes=(9,))
    feds = [_federation(make(), runtime, setting) for runtime in ("inprocess", "vectorized")]
    for fed in feds:
        fed.fit(3, eval_every=3)
    a, b = feds
    assert torch.allclose(a.params, b.params, atol=1e-5)
    assert a.server.server_state.keys() == b.server.server_state.keys()
    for key in a.server.server_state:  # FedoSSL's centroids
        assert torch.allclose(a.server.server_state[key], b.server.server_state[key], atol=1e-5)
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


@pytest.mark.parametrize("options", [{"query_every": 0}, {"balanced": "yes"}, {"sampling": "ksa"}, {"kd": -1.0}])
def test_kafal_refuses_bad_options_in_one_line(options):
    cfg = kn.Config()
    cfg.data.num_clients, cfg.data.label_fraction = 8, 0.2
    cfg.server.clients_per_round = 4
    cfg.client.algorithm, cfg.client.options = "kafal", options
    with pytest.raises(ConfigError) as err:
        build_federation(cfg)
    assert "\n" not in str(err.value) and next(iter(options)) in str(err.value)


def test_kafal_queries_every_few_rounds():
    setting = LabelSetting(label_fraction=0.1)
    fed = _federation(KAFAL(label_budget=6, query_per_round=2, query_every=2), "vectorized", setting)
    fed.fit(1, eval_every=1)
    assert all(len(st["queried"]) == 0 for st in fed.client_states.values())  # round 0: no query
    fed.fit(1, eval_every=1)
    assert any(len(st["queried"]) == 2 for st in fed.client_states.values())  # after round 1


def test_fedossl_without_hidden_labels_is_fedavg():
    feds = [kn.Federation(_model(), _digits(8), local=LocalTraining(lr=0.1, epochs=1), clients_per_round=4, seed=1,
                          algorithm=algorithm, runtime="vectorized") for algorithm in ("fedavg", FedoSSL())]
    for fed in feds:
        fed.fit(2, eval_every=2)
    assert torch.allclose(feds[0].params, feds[1].params, atol=1e-6)


def test_fedossl_server_update_unpacks_the_cohort_mean_upload():
    """The upload's layout (sums, counts, flags, outliers, then C, D, 1 as ratios) round-trips
    through `server_update` into the packed server state."""
    alg = FedoSSL()
    c, d, numel = 3, 2, 40
    state = alg.init_server_state(numel)
    up = torch.zeros(numel)
    up[:6] = torch.tensor([2.0, 0.0, 0.0, 3.0, 0.0, 0.0])  # sums of outputs 0, 1
    up[6:9] = torch.tensor([2.0, 1.0, 0.0])  # counts
    up[9:12] = torch.tensor([1.0, 1.0, 0.0])  # outputs 0 and 1 labeled here
    up[12:14], up[14] = torch.tensor([0.0, -3.0]), 1.0  # one outlier at (0, -3)
    up[-3:] = torch.tensor([float(c), float(d), 1.0]) * 0.5  # a cohort mean: ratios still give C, D
    up[:-3] *= 0.5
    out = alg.server_update(state, {"centroids": up}, 1.0)["centroids"]
    mu, has, labeled = alg.unpack(out, c, d)
    assert torch.allclose(mu, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]))
    assert has.tolist() == [1.0, 1.0, 1.0] and labeled.tolist() == [1.0, 1.0, 0.0]
    assert alg.server_update(state, {"centroids": torch.zeros(numel)}, 1.0) is state  # no upload: unchanged
