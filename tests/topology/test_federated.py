import torch
from torch import nn

import koinon as kn
from koinon.runtime import RUNTIMES


def _federation(**kw):
    ds = kn.DATASETS.get("digits")(seed=0, test_fraction=0.2, num_clients=20)
    data = kn.partition_dataset(ds, "dirichlet", 20, seed=0, options={"alpha": 0.5})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    args = {"local": kn.LocalTraining(lr=0.05, epochs=2, momentum=0.9), "clients_per_round": 5, "seed": 3}
    args.update(kw)
    return kn.Federation(model, data, **args)


def test_python_api_learns_with_a_plain_module():
    fed = _federation()
    results = fed.fit(rounds=15, eval_every=5)
    assert [r.test_accuracy is not None for r in results].count(True) == 3
    assert results[-1].test_accuracy > 0.75  # chance is 0.1
    assert results[-1].train_loss < results[0].train_loss


def test_same_seed_same_numbers_different_seed_different():
    a, b, c = _federation(), _federation(), _federation(seed=4)
    for fed in (a, b, c):
        fed.fit(rounds=3)
    assert torch.equal(a.params, b.params)
    assert not torch.equal(a.params, c.params)


def test_bytes_are_the_real_payload_sizes():
    fed = _federation(codec="fp16")
    p = fed.layout.numel
    r = fed.run_round(evaluate=False)
    assert r.uplink_bytes == 5 * 2 * p  # five clients, two bytes per parameter
    assert r.downlink_bytes == 5 * 4 * p  # identity downlink
    scaffold = _federation(algorithm="scaffold")
    r = scaffold.run_round(evaluate=False)
    assert r.uplink_bytes == 5 * 2 * 4 * p  # delta + control variate update
    assert r.downlink_bytes == 5 * 2 * 4 * p  # model + server control variate


class _PoisonOne:
    """A runtime that corrupts one client's update with NaN (a diverged or broken client)."""

    name = "poison"

    def __init__(self):
        self.inner = RUNTIMES.get("inprocess")()

    def setup(self, trainer):
        self.inner.setup(trainer)

    def train(self, *args):
        *head, encoder = args  # corrupt the update before the client encodes it
        result = self.inner.train(*head)
        self.corrupt(result.deltas)
        return encoder.encode(result)

    def corrupt(self, deltas):
        deltas[0, 0] = float("nan")

    def close(self):
        pass


def test_non_finite_updates_are_rejected_not_applied(capsys):
    fed = _federation(runtime=_PoisonOne())
    r = fed.run_round(evaluate=True)
    assert len(r.rejected) == 1 and r.rejected[0] in fed.sample_cohort(0)
    assert torch.isfinite(fed.params).all()
    assert "rejected updates" in capsys.readouterr().err


class _Huge(_PoisonOne):
    """Finite values whose row sum overflows float32: large, but not a reason to reject."""

    def corrupt(self, deltas):
        deltas[1, :4] = 3e38
        deltas[2, 0] = float("inf")


def test_only_truly_non_finite_rows_are_rejected():
    fed = _federation(runtime=_Huge(), aggregator="median", clients_per_round=5)
    cohort = fed.sample_cohort(0)
    r = fed.run_round(evaluate=False)
    assert r.rejected == [cohort[2]]  # the overflowing-but-finite row 1 is kept


def test_state_dict_round_trip_continues_identically():
    a = _federation(algorithm="scaffold", server_optimizer="fedadam")
    a.fit(rounds=2)
    saved = {k: v.clone() for k, v in a.state_dict().items()}
    a.fit(rounds=2)
    b = _federation(algorithm="scaffold", server_optimizer="fedadam")
    b.load_state_dict(saved)
    b.round_index = 2
    b.fit(rounds=2)
    assert torch.equal(a.params, b.params)


def test_delta_downlink_sends_missed_payloads_or_the_full_model():
    full = _federation(clients_per_round=20)  # everyone every round: the delta path always applies
    delta = _federation(clients_per_round=20, downlink_delta=True, downlink="int8")
    p = delta.layout.numel
    first = delta.run_round(evaluate=False)
    assert first.downlink_bytes == 20 * 4 * p  # new clients get the full fp32 model
    second = delta.run_round(evaluate=False)
    assert second.downlink_bytes == 20 * len(delta.server.broadcast.history[1]) < 20 * p + 20 * 16
    full.fit(rounds=2)
    assert torch.allclose(full.params, delta.params, atol=0.05)  # int8 downlink: close, not equal
    partial = _federation(downlink_delta=True, downlink="int8")
    partial.fit(rounds=4)
    assert partial.downlink_total < 4 * 5 * 4 * p  # returning clients replay small deltas


def test_identity_delta_downlink_matches_full_downlink():
    a = _federation()
    b = _federation(downlink_delta=True)
    a.fit(rounds=3)
    b.fit(rounds=3)
    assert torch.allclose(a.params, b.params, atol=1e-6)


def test_increment_codecs_and_delta_downlink_resume_identically():
    kwargs = {"codec": kn.compress.CODECS.get("ef21")(layout=_federation().layout, inner="topk"),
              "downlink_delta": True, "downlink": "int8"}
    a = _federation(**kwargs)
    a.fit(rounds=2)
    saved = {k: v.clone() for k, v in a.state_dict().items()}
    assert any(k.startswith("server/receiver/") for k in saved) and "server/broadcast/reference" in saved
    a.fit(rounds=2)
    b = _federation(**{**kwargs, "codec": kn.compress.CODECS.get("ef21")(layout=a.layout, inner="topk")})
    b.load_state_dict(saved)
    b.round_index = 2
    b.fit(rounds=2)
    assert torch.equal(a.params, b.params)
    assert a.fit(rounds=1)[0].uplink_bytes < 5 * 4 * a.layout.numel / 20  # top-1% inside EF21


class _Scaled(_PoisonOne):
    """Client 0 of every cohort sends a finite but huge update (refused by a norm bound)."""

    def corrupt(self, deltas):
        deltas[0] *= 1e6


def test_a_refused_client_keeps_its_codec_state_and_its_loss_is_not_averaged():
    fed = _federation(runtime=_Scaled(), codec={"name": "ef", "inner": {"name": "topk", "ratio": 0.1}})
    fed.server.bound_update_norm(100.0)
    cohort = fed.sample_cohort(0)
    r = fed.run_round(evaluate=False)
    assert r.rejected == [cohort[0]] and r.accepted == cohort[1:] == r.included
    # The refused client goes on with the state it had (none yet); the others keep their residual.
    assert cohort[0] not in fed.sender.states and all(c in fed.sender.states for c in cohort[1:])
    assert "norm" in r.reasons[cohort[0]]
    # Its bytes crossed the wire all the same.
    assert r.uplink_bytes == fed.uplink_total > 0


def test_signguard_resumes_bit_identically():
    straight = _federation(aggregator="signguard")
    straight.fit(rounds=4)
    first = _federation(aggregator="signguard")
    first.fit(rounds=2)
    saved = {k: v.clone() for k, v in first.state_dict().items()}
    resumed = _federation(aggregator="signguard")
    resumed.load_state_dict(saved)
    resumed.fit(rounds=2)
    assert torch.equal(resumed.params, straight.params)


def test_delta_downlink_sends_no_model_to_a_client_that_holds_this_rounds_model():
    fed = _federation(downlink_delta=True, downlink="int8")
    fed.run_round(evaluate=False)
    server = fed.server
    rnd = server.open_round(1, [0, 1])
    server.held_model(0, 0)  # the client says it holds round 0's model
    first, _ = server.task_for(0)
    assert [name for name, _ in first] == ["delta@1"]  # it held round 0's model: one change
    server.held_model(0, 1)  # it asks again within the round (a refused upload, a restart)
    again, nbytes = server.task_for(0)
    assert again == [] and nbytes == 0
    server.held_model(1, -1)  # a client that lost its copy gets the full model in float32
    full, nbytes = server.task_for(1)
    assert [name for name, _ in full] == ["model"] and nbytes == 4 * fed.layout.numel
    assert rnd.downlink_bytes == len(first[0][1]) + nbytes


def test_a_client_whose_update_cannot_be_encoded_is_rejected_and_the_run_goes_on():
    # A diverged client (NaN) with a codec that refuses to encode NaN (error feedback's top-k).
    fed = _federation(runtime=_PoisonOne(), codec={"name": "ef", "inner": {"name": "topk", "ratio": 0.1}})
    cohort = fed.sample_cohort(0)
    r = fed.run_round(evaluate=False)
    assert r.rejected == [cohort[0]] and "could not encode" in r.reasons[cohort[0]]
    assert cohort[0] not in fed.sender.states and r.num_clients == 4
    assert torch.isfinite(fed.params).all()
