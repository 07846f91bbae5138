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


def test_codec_state_survives_a_restart_and_not_a_model_change(tmp_path):
    state = ClientState(tmp_path, "hash-a")
    state.codec = {"delta": {"residual": torch.arange(4.0)}}
    state.algorithm = {"control": torch.ones(2)}
    state.save("hash-a", 7)
    again = ClientState(tmp_path, "hash-a")
    assert torch.equal(again.codec["delta"]["residual"], torch.arange(4.0))
    assert torch.equal(again.algorithm["control"], torch.ones(2)) and again.last_round == 7
    other = ClientState(tmp_path, "hash-b")
    assert other.codec == {} and other.last_round == -1


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


def test_an_upload_whose_reply_was_lost_keeps_its_state_only_if_the_server_holds_it(tmp_path):
    from types import SimpleNamespace

    from koinon.deploy.client import _settle

    for held, expected in ((4, 1.0), (3, 0.0)):
        state = ClientState(tmp_path / str(held), "h")
        state.codec = {"delta": {"residual": torch.zeros(2)}}
        worker = SimpleNamespace(unconfirmed=(4, {"delta": {"residual": torch.ones(2)}}, {}))
        _settle(worker, state, held, "h")
        assert worker.unconfirmed is None
        assert float(ClientState(tmp_path / str(held), "h").codec.get("delta", {"residual": torch.zeros(2)})
                     ["residual"][0]) == expected
