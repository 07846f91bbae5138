"""Each personalization method's defining step against a hand-computed case, what stays on a
client, both local runtimes, and one client (every method is then local training)."""

import importlib.util
from pathlib import Path

import pytest
import torch

import koinon as kn
from koinon.clients import LocalSGD
from koinon.data import FederatedData
from koinon.local import LocalTraining
from koinon.params import Layout
from koinon.personal import (
    IFCA,
    ClusteredMeta,
    Ditto,
    FedBN,
    FedCAC,
    FedPer,
    FedRep,
    FineTune,
    PerFedAvg,
    personal_models,
)
from koinon.personal.base import norm_mask
from koinon.personal.meta import meta_steps
from koinon.personal.methods import _ProxTo
from koinon.topology.evaluation import Evaluation

_tiny_spec = importlib.util.spec_from_file_location("personal_tiny", Path(__file__).parent / "tiny.py")
assert _tiny_spec and _tiny_spec.loader
tiny = importlib.util.module_from_spec(_tiny_spec)
_tiny_spec.loader.exec_module(tiny)
_model, _digits, _grad, _trainer = tiny.model, tiny.digits, tiny.grad, tiny.trainer


def test_finetune_is_sgd_steps_on_the_clients_own_data():
    data = _digits()
    trainer, w = _trainer(FineTune(adapt_steps=1), data)
    out = personal_models(trainer.algorithm, trainer, [2], w, {}, [{}], seed=0, round_index=0)
    ix = data.client_indices[2]
    expected = w - 0.1 * _grad(trainer.module, trainer.layout, w, trainer.x_train[ix], trainer.y_train[ix])
    assert torch.allclose(out[0], expected, atol=1e-6)


def test_fedrep_trains_the_head_then_the_body():
    data = _digits()
    alg = FedRep(head_steps=1)
    trainer, w = _trainer(alg, data, steps=1)
    mask = alg.shared_mask(trainer.layout)  # True on the body
    head = torch.randn(int((~mask).sum()), generator=torch.Generator().manual_seed(1))
    idx, steps = trainer.schedule([1], 0, 0)
    result = trainer.train([1], w, {}, [{"private": head}], seed=0, round_index=0, schedule=(idx, steps))
    ix = data.client_indices[1]
    x, y = trainer.x_train[ix], trainer.y_train[ix]
    start = w.clone()
    start[~mask] = head
    g = _grad(trainer.module, trainer.layout, start, x, y)
    with_head = start.clone()
    with_head[~mask] -= 0.1 * g[~mask]  # the head's step, body frozen
    g2 = _grad(trainer.module, trainer.layout, with_head, x, y)
    body = with_head.clone()
    body[mask] -= 0.1 * g2[mask]  # the body's step, head frozen
    assert torch.allclose(result.client_states[0]["private"], with_head[~mask], atol=1e-6)
    assert torch.allclose(result.deltas[0], torch.where(mask, body - w, torch.zeros_like(w)), atol=1e-6)


def test_ditto_personal_model_is_pulled_towards_the_received_one():
    data = _digits()
    alg = Ditto(lam=0.5)
    trainer, w = _trainer(alg, data, steps=1)
    v = w + 0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(2))
    result = trainer.train([0], w, {}, [{"personal": v}], seed=0, round_index=0)
    ix = data.client_indices[0]
    x, y = trainer.x_train[ix], trainer.y_train[ix]
    assert torch.allclose(result.deltas[0], -0.1 * _grad(trainer.module, trainer.layout, w, x, y), atol=1e-6)
    expected = v - 0.1 * (_grad(trainer.module, trainer.layout, v, x, y) + 0.5 * (v - w))
    assert torch.allclose(result.client_states[0]["personal"], expected, atol=1e-6)


def test_perfedavg_meta_step_is_first_order_maml():
    data = _digits()
    alg = PerFedAvg(alpha=0.3)
    trainer, w = _trainer(alg, data, batch_size=8, steps=2)
    idx, steps = trainer.schedule([3], 0, 0)
    result = trainer.train([3], w, {}, [{}], seed=0, round_index=0, schedule=(idx, steps))
    d, d2 = idx[0, 0], idx[0, 1]
    trial = w - 0.3 * _grad(trainer.module, trainer.layout, w, trainer.x_train[d], trainer.y_train[d])
    expected = w - 0.1 * _grad(trainer.module, trainer.layout, trial, trainer.x_train[d2], trainer.y_train[d2])
    assert torch.allclose(result.deltas[0], expected - w, atol=1e-6)


def test_cluster_update_moves_each_cluster_by_its_members_mean():
    alg = IFCA(clusters=2)
    old, new = torch.zeros(3), torch.ones(3)
    state = {"cluster_0": torch.zeros(3), "cluster_1": torch.ones(3)}
    rows = {"model": torch.tensor([[1.0, 0, 0], [3.0, 0, 0], [0, 2.0, 0]]),
            "assignment": torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0]])}
    out = alg.server_update_rows(state, old, new, rows, torch.tensor([1.0, 3.0, 2.0]), [4, 5, 6])
    # cluster 0's model: 0 + 0 + (1 * 1 + 3 * 3) / 4 = 2.5 in the first coordinate; minus the new global
    assert torch.allclose(out["cluster_0"], torch.tensor([1.5, -1.0, -1.0]))
    assert torch.allclose(out["cluster_1"], torch.tensor([0.0, 2.0, 0.0]))


def test_ifca_client_picks_the_cluster_with_the_lowest_loss():
    data = _digits()
    alg = IFCA(clusters=3, init_scale=0.0)
    trainer, w = _trainer(alg, data)
    good = w.clone()
    for _ in range(30):  # a model trained on client 0's data
        ix = data.client_indices[0]
        good -= 0.5 * _grad(trainer.module, trainer.layout, good, trainer.x_train[ix], trainer.y_train[ix])
    state = {"cluster_0": torch.zeros_like(w), "cluster_1": good - w, "cluster_2": -(good - w)}
    picks = alg.choose(trainer, [0], w, state, [{}])
    assert picks.tolist() == [1]


def test_hierarchical_clustering_of_planted_update_directions():
    gen = torch.Generator().manual_seed(0)
    base = torch.eye(3, 50)
    rows = torch.cat([base[g] + 0.05 * torch.randn(4, 50, generator=gen) for g in (0, 1, 2)])
    labels = kn.personal.hierarchical_clusters(rows, threshold=0.5, max_clusters=4)
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert kn.personal.hierarchical_clusters(rows, threshold=0.5, max_clusters=2).unique().numel() == 2


def _planted(algorithm, rounds, runtime="inprocess"):
    """Twelve digits clients in two groups that see the pixels in different orders."""
    data = kn.personal.feature_shift(_digits(12, "iid"), "permute", seed=0, groups=2)
    fed = kn.Federation(_model(), data, local=LocalTraining(lr=0.1, epochs=1), clients_per_round=12, seed=0,
                        algorithm=algorithm, runtime=runtime)
    fed.fit(rounds)
    return fed, kn.personal.shift.shift_groups(12, 2, seed=0)


def _same_partition(a, b):
    return all((a[i] == a[j]) == (b[i] == b[j]) for i in range(len(a)) for j in range(len(a)))


def test_ifca_recovers_planted_clusters():
    fed, groups = _planted(IFCA(clusters=2, init_scale=0.1), rounds=6)
    picks = fed.algorithm.choose(fed.runtime.trainer, list(range(12)), fed.params, fed.server.server_state,
                                 [{}] * 12)
    assert _same_partition(picks.tolist(), groups.tolist()), (picks, groups)


def test_clustered_meta_recovers_planted_clusters():
    fed, groups = _planted(ClusteredMeta(clusters=4, threshold=0.7, cluster_round=1, alpha=0.05), rounds=3)
    membership = fed.server.server_state["membership"][:12].long() - 1
    assert (membership >= 0).all()
    assert _same_partition(membership.tolist(), groups.tolist()), (membership, groups)


def test_fedbn_normalization_layers_never_appear_in_a_payload():
    data = _digits(8)
    alg = FedBN()
    fed = kn.Federation(_model(), data, local=LocalTraining(lr=0.1), clients_per_round=4, seed=0,
                        algorithm=alg, runtime="inprocess")
    norm = norm_mask(fed.layout)
    assert norm.sum() == 16 and fed.layout.entries[2].name == "2.weight"  # LayerNorm(8): weight, bias
    seen = []
    encode = kn.wire.CohortEncoder.encode

    def spy(self, result):
        out = encode(self, result)
        seen.extend(p[0] for p in out.payloads)
        return out

    start = fed.params.clone()
    kn.wire.CohortEncoder.encode = spy
    try:
        fed.fit(3)
    finally:
        kn.wire.CohortEncoder.encode = encode
    assert len(seen) == 12
    for payload in seen:
        row = fed.codec.decode(payload)
        assert torch.count_nonzero(row[norm]) == 0 and torch.count_nonzero(row[~norm]) > 0
    assert torch.equal(fed.params[norm], start[norm])  # the server never learns them
    privates = [s["private"] for s in fed.client_states.values()]
    assert len(privates) >= 4 and not torch.equal(privates[0], privates[1])
    assert not torch.equal(privates[0], start[norm])


@pytest.mark.parametrize("make", [
    lambda: FineTune(adapt_steps=3), lambda: FedBN(), lambda: FedPer(), lambda: FedRep(head_steps=2),
    lambda: Ditto(lam=0.2), lambda: PerFedAvg(alpha=0.05, adapt_steps=2), lambda: IFCA(clusters=2),
    lambda: ClusteredMeta(clusters=3, cluster_round=1), lambda: FedCAC(beta=2.0),
], ids=["finetune", "fedbn", "fedper", "fedrep", "ditto", "perfedavg", "ifca", "clustered_meta", "fedcac"])
def test_both_local_runtimes_give_the_same_models(make):
    feds = []
    for runtime in ("inprocess", "vectorized"):
        fed = kn.Federation(_model(), _digits(8, "dirichlet"), local=LocalTraining(lr=0.1, epochs=1),
                            clients_per_round=4, seed=1, algorithm=make(), runtime=runtime,
                            evaluation=Evaluation(holdout=0.2, new_clients=2))
        fed.fit(3, eval_every=3)
        feds.append(fed)
    a, b = feds
    assert torch.allclose(a.params, b.params, atol=1e-5)
    for key in a.server.server_state:
        assert torch.allclose(a.server.server_state[key], b.server.server_state[key], atol=1e-5)
    ids = list(range(a.data.num_clients))
    pa, pb = (personal_models(f.algorithm, f.runtime.trainer, ids, f.params, f.server.server_state,
                              [f.client_states.get(c, {}) for c in ids], 0, 3) for f in feds)
    assert torch.allclose(pa, pb, atol=1e-4)


def _one_client(algorithm, rounds=3):
    full = _digits(6)
    data = FederatedData(full.dataset, [full.client_indices[0]])
    fed = kn.Federation(_model(), data, local=LocalTraining(lr=0.1, batch_size=16, epochs=1), clients_per_round=1,
                        seed=0, algorithm=algorithm, runtime="inprocess")
    start = fed.params.clone()
    fed.fit(rounds)
    model = personal_models(fed.algorithm, fed.runtime.trainer, [0], fed.params, fed.server.server_state,
                            [fed.client_states.get(0, {})], 0, rounds)[0]
    return fed, start, model


def _local_chain(trainer, w, rounds, algorithm):
    """Local training alone: `rounds` passes of the trainer from where the last one ended."""
    for r in range(rounds):
        idx, steps = trainer.schedule([0], 0, r)
        w = w + trainer.run_steps([0], w, {}, [{}], idx, steps, algorithm=algorithm).deltas[0]
    return w


@pytest.mark.parametrize("make", [
    lambda: LocalSGD(), lambda: FineTune(adapt_steps=0), lambda: FedBN(), lambda: FedPer(),
    lambda: IFCA(clusters=1, init_scale=0.0), lambda: FedCAC(adapt_steps=0),
], ids=["fedavg", "finetune", "fedbn", "fedper", "ifca", "fedcac"])
def test_with_one_client_every_method_is_local_training(make):
    fed, start, model = _one_client(make())
    local = _local_chain(fed.runtime.trainer, start, 3, LocalSGD())
    assert torch.allclose(model, local, atol=1e-5)


def test_with_one_client_ditto_is_local_training_and_its_prox_model():
    fed, start, model = _one_client(Ditto(lam=0.3))
    trainer = fed.runtime.trainer
    w, v = start, start
    for r in range(3):
        idx, steps = trainer.schedule([0], 0, r)
        v = v + trainer.run_steps([0], v, {}, [{}], idx, steps, algorithm=_ProxTo(0.3, w)).deltas[0]
        w = w + trainer.run_steps([0], w, {}, [{}], idx, steps, algorithm=LocalSGD()).deltas[0]
    assert torch.allclose(fed.params, w, atol=1e-5) and torch.allclose(model, v, atol=1e-5)


@pytest.mark.parametrize("make", [lambda: PerFedAvg(alpha=0.05, adapt_steps=0),
                                  lambda: ClusteredMeta(alpha=0.05, adapt_steps=0, cluster_round=1)],
                         ids=["perfedavg", "clustered_meta"])
def test_with_one_client_meta_learning_is_local_meta_training(make):
    fed, start, model = _one_client(make())
    trainer = fed.runtime.trainer
    w = start
    for r in range(3):
        idx, _ = trainer.schedule([0], 0, r)
        w = meta_steps(trainer, w, idx, 0.05, 0.1, 1)[0][0]
    assert torch.allclose(model, w, atol=1e-5)


def test_fedrep_with_one_client_is_its_local_alternation():
    alg = FedRep(head_steps=2)
    fed, start, model = _one_client(alg)
    trainer = fed.runtime.trainer
    w, state = start, {}
    for r in range(3):
        result = trainer.train([0], w, {}, [state], 0, r)
        w, state = w + result.deltas[0], result.client_states[0]
    mask = alg.shared_mask(fed.layout)
    assert torch.allclose(model[mask], w[mask], atol=1e-5)
    assert torch.allclose(model[~mask], state["private"], atol=1e-5)


@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_mlp_norm_has_normalization_layers_fedbn_finds(norm):
    model = kn.build_model("mlp_norm", {"hidden": [16, 8], "norm": norm}, (1, 8, 8), 10, seed=0)
    assert model(torch.randn(5, 1, 8, 8)).shape == (5, 10) and not list(model.buffers())
    layout = Layout.from_module(model)
    found = [e.name for e in layout.entries if norm_mask(layout)[e.offset]]
    assert found == ["2.weight", "2.bias", "5.weight", "5.bias"]
    with pytest.raises(kn.ConfigError, match="model.norm"):
        kn.build_model("mlp_norm", {"norm": "group"}, (1, 8, 8), 10, seed=0)


def test_clustered_meta_members_keep_their_cluster_and_newcomers_pick_by_loss():
    data = _digits()
    alg = ClusteredMeta(clusters=2)
    trainer, w = _trainer(alg, data)
    good = w.clone()
    for _ in range(30):  # a model trained on client 0's data
        ix = data.client_indices[0]
        good -= 0.5 * _grad(trainer.module, trainer.layout, good, trainer.x_train[ix], trainer.y_train[ix])
    membership = torch.zeros_like(w)
    membership[3], membership[4] = 1.0, 2.0  # client 3 in cluster 0, client 4 in cluster 1
    state = {"cluster_0": torch.zeros_like(w), "cluster_1": good - w, "membership": membership}
    # 3 and 4 keep theirs; 0 (unassigned) picks cluster 1, the better one on its data
    assert alg.choose(trainer, [3, 4, 0], w, state, [{}] * 3).tolist() == [0, 1, 1]


@pytest.mark.parametrize("make", [lambda: FedRep(head_steps=2), lambda: IFCA(clusters=2),
                                  lambda: ClusteredMeta(clusters=2, cluster_round=2), lambda: FedCAC()],
                         ids=["fedrep", "ifca", "clustered_meta", "fedcac"])
def test_resume_continues_a_personalized_run_exactly(tmp_path, make):
    def fed():
        return kn.Federation(_model(), _digits(8, "dirichlet"), local=LocalTraining(lr=0.1), clients_per_round=4,
                             seed=2, algorithm=make(), runtime="inprocess")

    whole = fed()
    whole.fit(4)
    first = fed()
    first.fit(2, out=tmp_path / "run")
    again = fed()
    again.fit(4, out=tmp_path / "run", resume=True)
    assert torch.equal(again.params, whole.params)
    assert again.client_states.keys() == whole.client_states.keys()
    for c, st in whole.client_states.items():
        assert all(torch.equal(v, again.client_states[c][k]) for k, v in st.items())
    for key, v in whole.server.server_state.items():
        assert torch.equal(v, again.server.server_state[key]), key
