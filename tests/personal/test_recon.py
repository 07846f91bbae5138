"""Federated reconnaissance: prototype averaging by hand, nearest-prototype prediction, one
client, both local runtimes."""

import torch
from torch import nn

import koinon as kn
from koinon.data import FederatedData
from koinon.local import LocalTraining
from koinon.personal import Reconnaissance
from koinon.personal.recon import class_sums, embed, merge, nearest_logits
from koinon.topology.evaluation import Evaluation


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 10))


def _digits(num_clients=6):
    ds = kn.DATASETS.get("digits")(seed=0, test_fraction=0.2, num_clients=num_clients)
    return kn.partition_dataset(ds, "shards", num_clients, seed=0, options={"classes_per_client": 2})


def test_prototypes_are_count_weighted_means_and_absent_classes_keep_theirs():
    # client A: class 0 at (1, 0) and (3, 0); client B: class 0 at (2, 2), class 1 at (0, 4)
    sa, na = class_sums(torch.tensor([[1.0, 0.0], [3.0, 0.0]]), torch.tensor([0, 0]), 3)
    sb, nb = class_sums(torch.tensor([[2.0, 2.0], [0.0, 4.0]]), torch.tensor([0, 1]), 3)
    old = torch.tensor([[9.0, 9.0], [9.0, 9.0], [5.0, 5.0]])
    protos, seen = merge(old, torch.tensor([0.0, 0.0, 1.0]), (sa + sb) / 2, (na + nb) / 2)  # the cohort means
    assert torch.allclose(protos, torch.tensor([[2.0, 2.0 / 3.0], [0.0, 4.0], [5.0, 5.0]]))
    assert seen.tolist() == [True, True, True]
    logits = nearest_logits(torch.tensor([[0.1, 3.0], [4.0, 4.0]]), protos, torch.tensor([1.0, 1.0, 0.0]))
    assert logits.argmax(dim=1).tolist() == [1, 0] and torch.isinf(logits[:, 2]).all()


def test_one_client_is_local_training_and_its_own_class_means():
    full = _digits()
    data = FederatedData(full.dataset, [full.client_indices[0]])
    fed = kn.Federation(_model(), data, local=LocalTraining(lr=0.1, batch_size=16, epochs=1), clients_per_round=1,
                        seed=0, algorithm=Reconnaissance(), runtime="inprocess")
    start = fed.params.clone()
    fed.fit(2)
    trainer = fed.runtime.trainer
    w = start
    for r in range(2):
        idx, steps = trainer.schedule([0], 0, r)
        w = w + trainer.run_steps([0], w, {}, [{}], idx, steps, algorithm=kn.clients.LocalSGD()).deltas[0]
    assert torch.allclose(fed.params, w, atol=1e-5)
    ix = full.client_indices[0]
    emb = embed(trainer.module, fed.layout.views(w), full.dataset.x_train[ix])
    y = full.dataset.y_train[ix]
    alg = fed.algorithm
    protos, seen = alg.unpack(fed.server.server_state["prototypes"], 10, 8)
    assert sorted(torch.nonzero(seen).flatten().tolist()) == sorted(set(y.tolist()))
    for c in set(y.tolist()):
        assert torch.allclose(protos[c], emb[y == c].mean(dim=0), atol=1e-5)


def test_both_local_runtimes_give_the_same_prototypes_and_merged_classes_reach_every_client():
    feds = []
    for runtime in ("inprocess", "vectorized"):
        fed = kn.Federation(_model(), _digits(8), local=LocalTraining(lr=0.1, epochs=1), clients_per_round=6,
                            seed=1, algorithm=Reconnaissance(), runtime=runtime,
                            evaluation=Evaluation(holdout=0.2, new_clients=2))
        fed.fit(3, eval_every=3)
        feds.append(fed)
    a, b = feds
    assert torch.allclose(a.params, b.params, atol=1e-5)
    pa, pb = a.server.server_state["prototypes"], b.server.server_state["prototypes"]
    assert torch.allclose(pa, pb, atol=1e-4)
    _, seen = a.algorithm.unpack(pa, 10, 8)
    assert int(seen.sum()) == len(set().union(*[set(a.data.dataset.y_train[ix].tolist())
                                               for ix in a.data.client_indices]))
    x = a.data.dataset.x_train[:40]
    fa = a.algorithm.personal_predictors(a.runtime.trainer, [0], a.params, a.server.server_state, [{}], 0, 3)[0]
    # a client that held two classes predicts classes it never saw
    assert len(set(fa(x).argmax(dim=1).tolist())) > 2


def test_a_weighted_single_update_merges_as_an_unweighted_one():
    """An asynchronous schedule applies one client's upload scaled by a staleness weight: the
    prototypes (sums / counts) and the shape markers are ratios, so the merge is the same."""
    from koinon.personal import FedIns, FRAug

    alg = Reconnaissance()
    numel = 100
    up = torch.zeros(numel)
    sums, counts = class_sums(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([1, 1]), 3)
    up[:6], up[6:9] = sums.reshape(-1), counts
    up[-3], up[-2], up[-1] = 3.0, 2.0, 1.0
    state = alg.init_server_state(numel)
    plain = alg.server_update(state, {"prototypes": up}, 0.1)["prototypes"]
    weighted = alg.server_update(state, {"prototypes": 0.25 * up}, 0.1)["prototypes"]
    assert torch.allclose(plain, weighted)
    assert torch.allclose(alg.unpack(plain, 3, 2)[0][1], torch.tensor([2.0, 3.0]))
    for other, key in ((FedIns(), "pool"), (FRAug(), "generator")):
        packed = torch.rand(numel)
        packed[-1] = 1.0
        a = other.server_update({}, {key: packed}, 0.1)[key]
        b = other.server_update({}, {key: 0.3 * packed}, 0.1)[key]
        assert torch.allclose(a, b) and torch.allclose(a, packed)
