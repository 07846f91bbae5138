"""Personalized metrics: hand-made splits and models, new clients, the config keys end to end."""

import numpy as np
import pytest
import torch
from torch import nn

import koinon as kn
from koinon.data import Dataset, FederatedData
from koinon.params import Layout
from koinon.personal import per_client_accuracy, split_new_clients, summarize
from koinon.topology.evaluation import Evaluation, evaluate_clients


def test_summary_of_hand_made_accuracies():
    acc = torch.tensor([1.0, 0.5, 0.0, 0.75])
    counts = torch.tensor([2.0, 4.0, 1.0, 4.0])
    out = summarize(acc, counts, "personal_accuracy")
    assert out["personal_accuracy_mean"] == pytest.approx(2.25 / 4)
    assert out["personal_accuracy_weighted"] == pytest.approx((2 + 2 + 0 + 3) / 11)
    # numpy's linear percentile over the sorted values 0, 0.5, 0.75, 1: 0 + 0.3 * 0.5
    assert out["personal_accuracy_p10"] == pytest.approx(0.15)
    assert out["personal_accuracy_min"] == 0.0


def test_each_client_is_scored_with_its_own_model_on_its_own_split():
    # Two features, two classes; the identity model predicts argmax(x), its negation the other class.
    module = nn.Sequential(nn.Linear(2, 2, bias=False))
    layout = Layout.from_module(module)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    y = torch.tensor([0, 1, 1, 1, 0])
    identity = torch.eye(2).flatten()
    models = torch.stack([identity, -identity, identity])
    held = [torch.tensor([0, 1]), torch.tensor([2, 3, 4]), torch.tensor([], dtype=torch.long)]
    acc, counts = per_client_accuracy(module, layout, models, x, y, held)
    # client 0: both right; client 1 with the flipped model: sample 2 right, 3 and 4 wrong
    assert acc.tolist() == pytest.approx([1.0, 1 / 3, 0.0]) and counts.tolist() == [2.0, 3.0, 0.0]


def _digits_federation(algorithm="fedavg", num_clients=10, **kw):
    ds = kn.DATASETS.get("digits")(seed=0, test_fraction=0.2, num_clients=num_clients)
    data = kn.partition_dataset(ds, "shards", num_clients, seed=0, options={"classes_per_client": 2})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    args = {"local": kn.LocalTraining(lr=0.1, epochs=1), "clients_per_round": 4, "seed": 3,
            "algorithm": algorithm, "runtime": "inprocess",
            "evaluation": Evaluation(holdout=0.25, new_clients=2)}
    args.update(kw)
    return kn.Federation(model, data, **args)


def test_fedavg_personal_accuracy_is_the_global_models_client_accuracy():
    fed = _digits_federation()
    r = fed.fit(3)[-1]
    assert fed.data.num_clients == 8  # two clients kept out of training
    for stat in ("mean", "weighted", "p10"):
        assert r.extra[f"personal_accuracy_{stat}"] == pytest.approx(r.extra[f"client_accuracy_{stat}"])
    assert r.extra["personal_accuracy_min"] == pytest.approx(r.extra["client_accuracy_worst"])
    # New clients under FedAvg serve the global model: their accuracy is that model's on their split.
    # They are other clients than the training ones: ids 8 and 9, no samples under ids 0-7.
    new_data, held = fed.personal.new_train.data, fed.personal.new_held
    assert new_data.num_clients == 10 and all(len(new_data.client_indices[c]) == 0 for c in range(8))
    direct = evaluate_clients(fed.model, fed.layout, fed.params, new_data, held, [8, 9], kn.local.cross_entropy)
    assert r.extra["new_client_accuracy_mean"] == pytest.approx(direct["client_accuracy_mean"])


def test_fine_tuning_serves_each_client_better_than_the_global_model_under_shards():
    fed = _digits_federation("finetune")
    r = fed.fit(4)[-1]
    assert r.extra["personal_accuracy_mean"] > r.extra["client_accuracy_mean"] + 0.2
    assert r.extra["new_client_accuracy_mean"] > 0.5


def test_new_clients_are_a_seeded_disjoint_share():
    ds = Dataset.from_tensors(torch.randn(40, 3), torch.arange(40) % 2, torch.randn(4, 3), torch.arange(4) % 2)
    data = FederatedData(ds, [torch.arange(4 * c, 4 * c + 4) for c in range(10)])
    train, new = split_new_clients(data, 0.3, seed=1)
    assert new is not None and train.num_clients == 7 and new.num_clients == 3
    all_ix = torch.cat(train.client_indices + new.client_indices).sort().values
    assert torch.equal(all_ix, torch.arange(40))
    again = split_new_clients(data, 3, seed=1)[1]
    assert again is not None and all(torch.equal(a, b) for a, b in zip(new.client_indices, again.client_indices))
    assert split_new_clients(data, 0.0, seed=1) == (data, None)
    with pytest.raises(ValueError, match="holdout_clients"):
        split_new_clients(data, 10, seed=1)
    with pytest.raises(ValueError, match="holdout_clients"):
        split_new_clients(data, 2.5, seed=1)


def _config(tmp_path, **data):
    cfg = kn.Config()
    cfg.data.num_clients, cfg.data.partition = 12, "shards"
    cfg.server.rounds, cfg.server.clients_per_round, cfg.server.eval_every = 2, 4, 1
    cfg.client.algorithm = "finetune"
    cfg.runtime.name = "inprocess"
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def test_config_keys_end_to_end(tmp_path):
    cfg = _config(tmp_path, client_test_fraction=0.25, holdout_clients=2, feature_shift="rotation",
                  shift_groups=3)
    out = kn.run_experiment(cfg, tmp_path / "run", progress=False)
    rows = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    import json

    last = json.loads(rows[-1])
    flat = {**last, **last.get("extra", {})}
    for key in ("personal_accuracy_mean", "personal_accuracy_weighted", "personal_accuracy_p10",
                "personal_accuracy_min", "new_client_accuracy_mean", "test_accuracy"):
        assert key in flat and 0.0 <= flat[key] <= 1.0, key
    assert out is not None


@pytest.mark.parametrize(("key", "value", "match"), [
    ("holdout_clients", 2, "client_test_fraction"),
    ("feature_shift", "blur", "feature_shift"),
    ("shift_strength", 2.0, "shift_strength"),
])
def test_bad_personal_config_is_one_clear_error(tmp_path, key, value, match):
    cfg = _config(tmp_path, **{key: value})
    with pytest.raises(kn.ConfigError, match=match):
        kn.run_experiment(cfg, tmp_path / "run", progress=False)


def test_percentile_matches_numpy():
    acc = torch.rand(37, generator=torch.Generator().manual_seed(0))
    out = summarize(acc, torch.ones(37), "p")
    assert out["p_p10"] == pytest.approx(float(np.percentile(acc.numpy(), 10)))


@pytest.mark.parametrize(("algorithm", "options"), [
    ("fedbn", {}), ("fedper", {"adapt_steps": 5}), ("fedrep", {"head_steps": 2}), ("ditto", {"lam": 0.5}),
    ("perfedavg", {"alpha": 0.02}), ("ifca", {"clusters": 3}), ("clustered_meta", {"clusters": 2}),
])
def test_every_method_runs_from_a_config_with_its_options(tmp_path, algorithm, options):
    cfg = _config(tmp_path, client_test_fraction=0.25)
    cfg.model.name = "mlp_norm"
    cfg.client.algorithm, cfg.client.options = algorithm, dict(options)
    summary = kn.run_experiment(cfg, tmp_path / "run", progress=False)
    assert summary["final_accuracy"] > 0.0
    cfg.client.options = {**options, "no_such_option": 1}
    with pytest.raises(kn.ConfigError, match="no_such_option"):
        kn.run_experiment(cfg, tmp_path / "again", progress=False)


def test_personal_metrics_need_a_server(tmp_path):
    cfg = _config(tmp_path, client_test_fraction=0.25)
    cfg.topology.name = "gossip"
    with pytest.raises(kn.ConfigError, match="topology.name = 'federated'"):
        kn.run_experiment(cfg, tmp_path / "run", progress=False)
