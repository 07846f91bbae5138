"""What the client-algorithm interface and the server state machine carry beyond FedAvg.

Each test writes the smallest algorithm that needs one hook (a personal head, several global
models, its own objective) and checks what the hook promises, on both local runtimes; the last
tests step the server one update at a time and read the round records a ledger would keep.
"""

import hashlib

import pytest
import torch
from torch import nn

import koinon as kn
from koinon.clients import LocalSGD
from koinon.wire import MODEL, Rejected


def _federation(algorithm, runtime="inprocess", **kw):
    ds = kn.DATASETS.get("digits")(seed=0, test_fraction=0.2, num_clients=12)
    data = kn.partition_dataset(ds, "dirichlet", 12, seed=0, options={"alpha": 0.5})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    args = {"local": kn.LocalTraining(lr=0.05, epochs=1), "clients_per_round": 4, "seed": 1,
            "algorithm": algorithm, "runtime": runtime}
    args.update(kw)
    return kn.Federation(model, data, **args)


class PersonalHead(LocalSGD):
    """FedRep/FedPer-style: the output layer stays on the client; only the body is shared."""

    name = "personal_head"

    def shared_mask(self, layout):
        mask = torch.ones(layout.numel, dtype=torch.bool)
        for e in layout.entries:
            if e.name.startswith("3."):  # the last Linear
                mask[e.offset : e.offset + e.numel] = False
        return mask


@pytest.mark.parametrize("runtime", ["inprocess", "vectorized"])
def test_shared_mask_keeps_a_personal_head_on_each_client(runtime):
    fed = _federation(PersonalHead(), runtime)
    mask = PersonalHead().shared_mask(fed.layout)
    start = fed.params.clone()
    fed.fit(rounds=6)
    # The server never moves the unshared coordinates: every upload is zero there.
    assert torch.equal(fed.params[~mask], start[~mask])
    assert not torch.equal(fed.params[mask], start[mask])
    # Each client that trained keeps its own head, and the heads differ between clients.
    heads = {c: s["private"] for c, s in fed.client_states.items()}
    assert len(heads) >= 4 and all(h.shape == (int((~mask).sum()),) for h in heads.values())
    first, second = list(heads.values())[:2]
    assert not torch.equal(first, second) and not torch.equal(first, start[~mask])


def test_shared_mask_gives_the_same_parameters_on_both_runtimes():
    a, b = _federation(PersonalHead(), "inprocess"), _federation(PersonalHead(), "vectorized")
    a.fit(rounds=4)
    b.fit(rounds=4)
    assert torch.allclose(a.params, b.params, atol=1e-5)
    assert a.client_states.keys() == b.client_states.keys()
    for c in a.client_states:
        assert torch.allclose(a.client_states[c]["private"], b.client_states[c]["private"], atol=1e-5)


class TwoClusters(LocalSGD):
    """IFCA-style: the server keeps two models, every client receives both and starts from the
    one with the lower loss on its data."""

    name = "two_clusters"
    downloads = ("cluster_0", "cluster_1")

    def __init__(self):
        self.choices = {}  # client -> the cluster it picked last

    def init_server_state(self, numel):
        gen = torch.Generator().manual_seed(5)
        return {"cluster_0": torch.zeros(numel), "cluster_1": 0.1 * torch.randn(numel, generator=gen)}

    def start(self, trainer, client_ids, global_params, server_state, client_states):
        models = torch.stack([server_state["cluster_0"], server_state["cluster_1"]])
        picks = []
        for c in client_ids:
            ix = trainer.data.client_indices[c]
            x, y = trainer.x_train[ix], trainer.y_train[ix]
            losses = [kn.local.evaluate(trainer.module, trainer.layout, m, x, y)[1] for m in models]
            picks.append(int(torch.tensor(losses).argmin()))
        self.choices.update(zip(client_ids, picks))
        return models[torch.tensor(picks)]


def test_several_global_models_reach_the_client_and_it_starts_from_its_pick():
    alg = TwoClusters()
    fed = _federation(alg)
    p = fed.layout.numel
    r = fed.run_round(evaluate=False)
    assert r.downlink_bytes == 4 * 3 * 4 * p  # the model and both cluster models, fp32, four clients
    cohort = fed.sample_cohort(0)
    assert sorted(alg.choices) == cohort and set(alg.choices.values()) <= {0, 1}
    # The update each client sent is relative to the model it started from, not the global one.
    trainer = fed.runtime.trainer
    result = trainer.train(cohort, fed.params, fed.server.server_state, [{}] * 4, fed.seed, 0)
    starts = torch.stack([fed.server.server_state[f"cluster_{alg.choices[c]}"] for c in cohort])
    plain = trainer.run_steps(cohort, starts, {}, [{}] * 4, *trainer.schedule(cohort, fed.seed, 0),
                              algorithm=LocalSGD())
    assert torch.allclose(result.deltas, plain.deltas)


class DittoLike(LocalSGD):
    """Ditto-style own objective: the global part is plain local SGD; a personal model trains on
    the same batches with a proximal pull towards the received model and stays on the client."""

    name = "ditto_like"

    def __init__(self, lam=0.5):
        self.prox = kn.clients.FedProx(mu=lam)

    def train_cohort(self, trainer, client_ids, global_params, server_state, client_states, idx,
                     steps, seed, round_index):
        shared = trainer.run_steps(client_ids, global_params, server_state, client_states, idx, steps,
                                   algorithm=LocalSGD())
        personal_start = torch.stack([s.get("personal", global_params) for s in client_states])
        personal = trainer.run_steps(client_ids, personal_start, server_state, client_states, idx, steps,
                                     algorithm=self.prox)
        assert personal.deltas is not None
        shared.client_states = [{"personal": personal_start[i] + personal.deltas[i]}
                                for i in range(len(client_ids))]
        return shared


def test_own_local_objective_keeps_a_personal_model_and_sends_the_plain_update():
    ditto = _federation(DittoLike())
    plain = _federation("fedavg")
    ditto.fit(rounds=3)
    plain.fit(rounds=3)
    assert torch.equal(ditto.params, plain.params)  # the global part is exactly local SGD
    personal = {c: s["personal"] for c, s in ditto.client_states.items()}
    assert personal and all(not torch.equal(v, ditto.params) for v in personal.values())


def test_server_applies_one_update_at_a_time():
    fed = _federation("fedavg")
    server = fed.server
    before = server.params.clone()
    update = 0.01 * torch.ones(fed.layout.numel)
    payload = fed.codec.encode(update, {}, torch.Generator())[0]
    server.apply_update(3, [payload], weight=0.5)
    assert torch.allclose(server.params, before + 0.5 * update)  # FedAvg, server lr 1
    bad = fed.codec.encode(torch.full_like(update, float("nan")), {}, torch.Generator())[0]
    with pytest.raises(Rejected, match="NaN"):
        server.apply_update(4, [bad])
    assert torch.allclose(server.params, before + 0.5 * update)  # unchanged by the refusal
    assert server.uplink_total == len(payload)


class _BreakOne:
    """Runtime wrapper: client 0 of every cohort sends NaN."""

    name = "break_one"

    def __init__(self):
        self.inner = kn.runtime.RUNTIMES.get("inprocess")()

    def setup(self, trainer):
        self.inner.setup(trainer)

    def train(self, *args):
        *head, encoder = args
        result = self.inner.train(*head)
        result.deltas[0, 0] = float("nan")
        return encoder.encode(result)

    def close(self):
        pass


def test_round_records_keep_what_a_ledger_needs():
    fed = _federation("fedavg", runtime=_BreakOne())
    fed.server.record_digests = True
    cohort = fed.sample_cohort(0)
    seen = {}
    encode = kn.wire.CohortEncoder.encode

    def spy(self, result):
        out = encode(self, result)
        seen.update({c: p for c, p in zip(out.client_ids, out.payloads)})
        return out

    kn.wire.CohortEncoder.encode = spy
    try:
        record = fed.run_round(evaluate=False)
    finally:
        kn.wire.CohortEncoder.encode = encode
    assert record.cohort == cohort and record.rejected == [cohort[0]]
    assert record.included == cohort[1:] and record.num_clients == 3
    assert "NaN" in record.reasons[cohort[0]]
    for c in cohort:  # SHA-256 over each client's payloads, length-prefixed
        h = hashlib.sha256()
        for p in seen[c]:
            h.update(len(p).to_bytes(8, "little"))
            h.update(p)
        assert record.digests[c] == h.hexdigest()
    row = record.as_dict()
    assert row["digests"][str(cohort[1])] == record.digests[cohort[1]] and MODEL == "delta"
