"""SPSA ("Just One Byte"): one byte per step on the wire, and the server rebuilds the update."""

import pytest
import torch
from torch import nn

import koinon as kn
from koinon.clients.spsa import SPSA, spsa_direction
from koinon.errors import CodecError


def _federation(runtime="vectorized", **kw):
    ds = kn.DATASETS.get("digits")(seed=0, test_fraction=0.2, num_clients=20)
    data = kn.partition_dataset(ds, "quantity", 20, seed=0)  # unequal sizes: unequal step counts
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    args = {"local": kn.LocalTraining(lr=0.01, epochs=3, batch_size=16), "clients_per_round": 6,
            "seed": 2, "algorithm": SPSA(epsilon=1e-3, clip=5.0), "runtime": runtime}
    args.update(kw)
    return kn.Federation(model, data, **args)


def test_server_rebuilds_exactly_what_each_client_did():
    fed = _federation()
    cohort = fed.sample_cohort(0)
    result = fed.runtime.train(cohort, fed.params, {}, [{} for _ in cohort], fed.seed, 0)
    assert result.messages is not None
    for i, c in enumerate(cohort):
        payload = result.messages[i]
        assert len(payload) == int(result.num_steps[i])  # one byte per local step
        rebuilt = fed.algorithm.decode_update(payload, fed.seed, 0, c, fed.layout.numel, 0.01, 10_000)
        assert torch.allclose(rebuilt, result.deltas[i], atol=1e-6)
        assert result.deltas[i].abs().sum() > 0


def test_round_bytes_and_runtimes_agree():
    a, b = _federation("inprocess"), _federation("vectorized")
    for fed in (a, b):
        r = fed.run_round(evaluate=False)
        sizes = fed.data.sizes[fed.sample_cohort(0)]
        assert r.uplink_bytes == int((3 * ((sizes + 15) // 16)).sum())
    assert torch.allclose(a.params, b.params, atol=1e-5)


def test_spsa_learns_with_a_few_bytes():
    fed = _federation(clients_per_round=10, local=kn.LocalTraining(lr=0.01, epochs=5, batch_size=16))
    start, _ = fed.evaluate()
    results = fed.fit(rounds=40, eval_every=40)
    assert results[-1].test_accuracy > start + 0.2
    assert fed.uplink_total < 40 * 10 * 200  # bytes; fp32 would send 40 * 10 * 4 * 2410 * 4


def test_direction_is_shared_and_seeded():
    a = spsa_direction(1, 2, 3, 4, 10)
    assert torch.equal(a, spsa_direction(1, 2, 3, 4, 10))
    assert not torch.equal(a, spsa_direction(1, 2, 3, 5, 10))


def test_bad_payloads_and_options_are_refused():
    alg = SPSA()
    with pytest.raises(CodecError, match="at most 2"):
        alg.decode_update(b"\x01\x02\x03", 0, 0, 0, 5, 0.1, 2)
    with pytest.raises(CodecError, match="-128"):
        alg.decode_update(b"\x80", 0, 0, 0, 5, 0.1, 2)
    with pytest.raises(ValueError, match="epsilon"):
        SPSA(epsilon=0.0)
    assert alg.quantize(torch.tensor([100.0, -100.0, 0.0])).tolist() == [127.0, -127.0, 0.0]


def test_a_codec_with_spsa_is_refused_in_one_line():
    """SPSA's bytes are its own wire format: a codec would be named in the records, never applied."""
    from koinon.config import Config
    from koinon.experiment.runner import build_federation

    cfg = Config.from_dict({"data": {"name": "digits", "num_clients": 4}, "client": {"algorithm": "spsa"},
                            "server": {"clients_per_round": 2}, "codec": {"name": "topk"}})
    with pytest.raises(kn.ConfigError, match="codec.name = 'topk': client.algorithm = 'spsa' uploads in its own "
                                             "wire format, which no codec encodes; use codec.name = 'identity'$"):
        build_federation(cfg)
