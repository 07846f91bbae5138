"""FLTrust in a federation: the server's root dataset, its update each round, and the refusals."""

import pytest
import torch

import koinon as kn
from koinon.config import Config
from koinon.data import DATASETS
from koinon.errors import ConfigError
from koinon.experiment.runner import build_federation
from koinon.server.root import reserve_root


def small(**overrides):
    base = {"data.num_clients": 10, "server.clients_per_round": 6, "aggregator.name": "fltrust"}
    return Config().with_overrides({**base, **overrides})


def test_root_samples_are_set_aside_from_every_client():
    fed = build_federation(small(**{"aggregator.root_samples": 40}))
    root = fed.root.indices
    assert len(root) == 40 and len(set(root.tolist())) == 40
    owned = torch.cat(fed.data.client_indices)
    assert not set(root.tolist()) & set(owned.tolist())  # no client owns a root sample
    assert len(owned) + 40 == len(fed.data.dataset.y_train)  # nothing else was lost
    assert min(len(ix) for ix in fed.data.client_indices) >= 1


def test_root_steps_sets_the_servers_local_steps():
    assert build_federation(small()).root.trainer.local.steps == 0  # the clients' own (1 epoch)
    fed = build_federation(small(**{"aggregator.root_steps": 7, "client.steps": 3}))
    assert fed.root.trainer.local.steps == 7 and fed.local.steps == 3
    assert fed.root.trainer.schedule([0], 0, 0)[1].tolist() == [7]


def test_reserve_root_keeps_one_sample_per_client_and_refuses_too_many():
    ds = DATASETS.build("digits", {}, "data", seed=0, test_fraction=0.2, num_clients=5)
    data = kn.partition_dataset(ds, "iid", num_clients=5, seed=0, options={})
    total = len(ds.y_train)
    kept, root = reserve_root(data, total - 5, seed=0)
    assert [len(ix) for ix in kept.client_indices] == [1] * 5 and len(root) == total - 5
    with pytest.raises(ValueError, match=f"between 1 and {total - 5}"):
        reserve_root(data, total - 4, seed=0)


def test_server_computes_a_reference_update_every_round(monkeypatch):
    fed = build_federation(small(**{"attack.name": "sign_flip", "attack.fraction": 0.3}))
    calls = []
    compute = fed.root.compute

    def spy(params, server_state, round_index):
        update = compute(params, server_state, round_index)
        calls.append((round_index, params.clone(), update))
        return update

    monkeypatch.setattr(fed.root, "compute", spy)
    fed.fit(3, eval_every=3)
    assert [c[0] for c in calls] == [0, 1, 2]
    for _, _, update in calls:
        assert update.shape == fed.params.shape and update.abs().sum() > 0
    assert not torch.equal(calls[0][2], calls[1][2])  # a fresh update from each round's model
    assert torch.equal(fed.aggregator.reference, calls[-1][2])
    # It is the server's training from the round's model: the same call gives the same update.
    assert torch.equal(compute(calls[1][1], {}, 1), calls[1][2])


def test_compositions_ending_in_fltrust_run_and_others_are_refused():
    fed = build_federation(small(**{"aggregator.name": "nnm+fltrust", "attack.name": "sign_flip",
                                    "attack.fraction": 0.3, "aggregator.root_samples": 50}))
    assert len(fed.root.indices) == 50
    assert fed.run_round().test_accuracy is not None
    with pytest.raises(ConfigError, match="fltrust"):  # FLTrust is a final rule, not a step
        build_federation(small(**{"aggregator.name": "fltrust+mean"}))


@pytest.mark.parametrize(("overrides", "message"), [
    ({"aggregator.root_samples": 0}, "root_samples must be an integer >= 1"),
    ({"aggregator.root_samples": -3}, "root_samples must be an integer >= 1"),
    ({"aggregator.root_samples": 1.5}, "expected int"),
    ({"aggregator.root_samples": 10_000}, "root_samples = 10000: must be between 1 and"),
    ({"aggregator.name": "mean", "aggregator.root_samples": 100},
     r"only fltrust \(or a composition ending in it, e.g. nnm\+fltrust\) takes it, not aggregator.name = 'mean'"),
    ({"aggregator.name": "nnm+trimmed_mean", "aggregator.root_samples": 100},
     r"only fltrust .* not aggregator.name = 'nnm\+trimmed_mean'"),
    ({"aggregator.root_steps": -1}, "root_steps must be an integer >= 0"),
    ({"aggregator.name": "median", "aggregator.root_steps": 5}, "only fltrust .* not aggregator.name = 'median'"),
    ({"topology.name": "gossip"}, "needs a server with a root dataset"),
])
def test_config_errors_are_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        build_federation(small(**overrides))
    assert "\n" not in str(info.value)


def test_resume_continues_the_servers_momentum_exactly():
    cfg = small(**{"client.algorithm": "worker_momentum"})
    straight = build_federation(cfg)
    straight.fit(3)
    first = build_federation(cfg)
    first.fit(2)
    assert any(k.startswith("server/root/") for k in first.state_dict())
    resumed = build_federation(cfg)
    resumed.load_state_dict(first.state_dict())
    resumed.round_index = 2
    resumed.fit(1)
    assert torch.equal(resumed.params, straight.params)


def test_deploy_server_accepts_fltrust():
    # koinon server computes the root update too (tests/deploy: bit for bit the simulation).
    pytest.importorskip("grpc")
    from koinon.deploy.server import check_deployable

    cfg = small()
    check_deployable(build_federation(cfg), cfg)
