"""pFedPG: the generator's update against a hand-computed case, the per-client prompt bytes,
both runtimes, one client, and that koinon server runs it."""

import torch
from torch import nn

import koinon as kn
from koinon.data import FederatedData
from koinon.local import LocalTraining
from koinon.personal import personal_models
from koinon.personal.pfedpg import PFedPG
from koinon.topology.evaluation import Evaluation


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def _digits(num_clients=6):
    ds = kn.DATASETS.get("digits")(seed=0, test_fraction=0.2, num_clients=num_clients)
    return kn.partition_dataset(ds, "dirichlet", num_clients, seed=0, options={"alpha": 0.5})


def test_generator_update_by_hand():
    alg = PFedPG(embed_dim=2, hidden=2, gen_lr=1.0)
    state = {"gen_w1": torch.eye(2), "gen_b1": torch.zeros(2), "gen_w2": torch.zeros(3, 2), "gen_b2": torch.zeros(3),
             "embeddings": torch.tensor([[1.0, 0.0], [0.0, 2.0]])}
    deltas = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    new = alg.server_update_rows(state, torch.zeros(3), torch.zeros(3), {"model": deltas}, torch.ones(2), [0, 1])
    # Directions: deltas minus their mean (0.5, 0.5, 0): (0.5, -0.5, 0) and (-0.5, 0.5, 0); hidden
    # h_0 = (1, 0), h_1 = (0, 2); W2 += 1/2 sum_c D_c h_c^T; b2 += mean D = 0; W1 and e get no
    # gradient through W2 = 0.
    expected = torch.tensor([[0.25, -0.5], [-0.25, 0.5], [0.0, 0.0]])
    assert torch.allclose(new["gen_w2"], expected)
    assert torch.allclose(new["gen_b2"], torch.zeros(3))
    assert torch.equal(new["gen_w1"], torch.eye(2)) and torch.equal(new["embeddings"], state["embeddings"])
    # Client 0's generated offset now points along its own direction.
    assert torch.allclose(alg.downlink_for(new, 0)["offset"], torch.tensor([0.25, -0.25, 0.0]))


def _federation(algorithm, runtime, data=None, k=3):
    return kn.Federation(_model(), data or _digits(), local=LocalTraining(lr=0.1, epochs=1), clients_per_round=k,
                         seed=1, algorithm=algorithm, runtime=runtime, evaluation=Evaluation(holdout=0.2))


def test_runtimes_agree_and_each_client_gets_its_own_prompt_bytes():
    feds = [_federation(PFedPG(gen_lr=0.1), rt) for rt in ("inprocess", "vectorized")]
    base = _federation("fedavg", "inprocess")
    for fed in (*feds, base):
        fed.fit(3, eval_every=3)
    a, b = feds
    assert torch.allclose(a.params, b.params, atol=1e-5)
    for key in a.server.server_state:
        assert torch.allclose(a.server.server_state[key], b.server.server_state[key], atol=1e-4)
    # Down: the global prompt and each client's generated offset; up: the change only.
    assert a.downlink_total == 2 * base.downlink_total and a.uplink_total == base.uplink_total
    ids = sorted(a.client_states)
    pa, pb = (personal_models(f.algorithm, f.runtime.trainer, ids, f.params, f.server.server_state,
                              [f.client_states[c] for c in ids], 0, 3) for f in feds)
    assert torch.allclose(pa, pb, atol=1e-4)
    assert not torch.allclose(pa[0], pa[1])


def test_one_client_is_local_training():
    full = _digits()
    data = FederatedData(full.dataset, [full.client_indices[0]])
    fed, ref = _federation(PFedPG(), "inprocess", data, 1), _federation("fedavg", "inprocess", data, 1)
    fed.fit(3), ref.fit(3)
    assert torch.allclose(fed.params, ref.params, atol=1e-6)  # its direction minus the mean is zero
    assert torch.allclose(fed.client_states[0]["personal"], fed.params, atol=1e-6)


def test_koinon_server_runs_it():  # its prompt offsets travel in each client's task (TaskHeader.own)
    from koinon.deploy.server import check_deployable
    from koinon.experiment.runner import build_federation

    cfg = kn.Config()
    cfg.data.num_clients, cfg.server.clients_per_round, cfg.client.algorithm = 6, 3, "pfedpg"
    check_deployable(build_federation(cfg), cfg)
