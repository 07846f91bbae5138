"""Client pieces without a server: data specs, persisted codec state, custom datasets."""

import pytest
import torch

from koinon.config import Config
from koinon.data.datasets import Dataset
from koinon.deploy.client import ClientState, DataSpec, Worker
from koinon.errors import KoinonError


def test_data_specs():
    assert DataSpec.parse("partition:3") == DataSpec(3, "")
    assert DataSpec.parse("mypkg.data:load") == DataSpec(-1, "mypkg.data:load")
    for bad in ("partition:x", "nonsense", "a b:c", ":f"):
        with pytest.raises(KoinonError):
            DataSpec.parse(bad)


def test_staged_state_becomes_current_only_when_the_server_holds_its_upload(tmp_path):
    state = ClientState(tmp_path, "hash-a")
    state.stage(7, {"delta": {"residual": torch.arange(4.0)}}, {"control": torch.ones(2)})
    # A restart before the server's word: the staged states are kept aside, not current.
    again = ClientState(tmp_path, "hash-a")
    assert again.codec == {} and again.staged_round == 7
    again.settle(7)  # the server holds round 7's upload
    assert torch.equal(again.codec["delta"]["residual"], torch.arange(4.0))
    assert torch.equal(again.algorithm["control"], torch.ones(2)) and again.last_round == 7
    third = ClientState(tmp_path, "hash-a")
    assert third.last_round == 7 and third.staged_round == -1
    # Round 8 staged, but the server's last accepted upload is round 7's: dropped.
    third.stage(8, {"delta": {"residual": torch.zeros(4)}}, {})
    ClientState(tmp_path, "hash-a").settle(7)
    fourth = ClientState(tmp_path, "hash-a")
    assert fourth.last_round == 7 and fourth.staged_round == -1
    assert torch.equal(fourth.codec["delta"]["residual"], torch.arange(4.0))
    other = ClientState(tmp_path, "hash-b")  # another model: the old residuals mean nothing
    assert other.codec == {} and other.last_round == -1


def test_clients_back_off_after_refusals():
    import random

    from koinon.deploy.client import refusal_backoff

    rng = random.Random(0)
    waits = [refusal_backoff(n, rng) for n in range(1, 12)]
    assert all(0.25 <= w <= 30.0 for w in waits)
    assert waits[0] <= 0.5 and waits[-1] >= 15.0  # doubles up to the cap of 30 s
    # Jitter only halves at most, so the n-th wait is at least half the nominal 0.5 * 2**(n-1).
    assert all(w >= min(0.25 * 2 ** n, 15.0) for n, w in enumerate(waits))


def custom_digits() -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 64, generator=g)
    return Dataset.from_tensors(x, torch.arange(40) % 10, x[:10], torch.arange(10), num_classes=10)


def test_a_custom_dataset_trains_under_its_global_index(monkeypatch):
    import sys
    import types

    module = types.ModuleType("deploy_custom_data")
    module.load = custom_digits  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "deploy_custom_data", module)
    cfg = Config.from_dict({"data": {"name": "digits", "num_clients": 3}, "model": {"name": "mlp", "hidden": [8]},
                            "runtime": {"name": "inprocess"}, "server": {"clients_per_round": 1}})
    worker = Worker(cfg, DataSpec.parse("deploy_custom_data:load"))
    assert worker.num_samples == 40
    worker.bind(1005)
    payload, _ = worker.fed.downlink.encode(worker.fed.params, {}, torch.Generator())
    state = ClientState.__new__(ClientState)
    state.codec, state.algorithm = {}, {}
    uploads, _, result = worker.train(1005, 0, [payload], ["delta"], state)
    delta = worker.fed.codec.decode(uploads[0])
    assert int(result.num_samples[0]) == 40 and delta.abs().sum() > 0


@pytest.mark.parametrize("model, x_shape, num_classes, match", [
    ("mlp", (40, 65), 10, r"samples have shape \[65\] but the model is built for 'digits' samples of shape \[1, 8, 8\]"),
    ("cnn", (40, 64), 10, r"the model cannot take the data's inputs \(samples of shape \[64\]"),
    ("mlp", (40, 64), 12, r"labels go up to 11 but the model is built for 'digits' with 10 classes"),
])
def test_a_custom_dataset_that_does_not_fit_the_servers_model_is_refused(monkeypatch, model, x_shape, num_classes,
                                                                           match):
    import sys
    import types

    def load() -> Dataset:
        x = torch.randn(*x_shape, generator=torch.Generator().manual_seed(0))
        y = torch.arange(40) % num_classes
        return Dataset.from_tensors(x, y, x[:0], y[:0], num_classes=num_classes)

    module = types.ModuleType("deploy_misfit_data")
    module.load = load  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "deploy_misfit_data", module)
    cfg = Config.from_dict({"data": {"name": "digits", "num_clients": 3}, "model": {"name": model},
                            "runtime": {"name": "inprocess"}, "server": {"clients_per_round": 1}})
    with pytest.raises(KoinonError, match=match) as info:
        Worker(cfg, DataSpec.parse("deploy_misfit_data:load"))
    assert str(info.value).startswith("--data deploy_misfit_data:load: ") and "\n" not in str(info.value)
