"""Fine-tuning and the client algorithms with client or server state, as real processes: a
LoRA fine-tuning of a pretrained model (`model.init` on both ends) and FedDyn (its linear term
in each client's `--state`, its correction in the server) end with the simulation's model."""

import importlib.util
from pathlib import Path

import pytest

from koinon.models import build_model
from koinon.models.pretrained import save_weights

_spec = importlib.util.spec_from_file_location("deploy_helpers", Path(__file__).with_name("helpers.py"))
assert _spec and _spec.loader
h = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(h)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("kind", ["lora-pretrained", "feddyn", "fedspeed"])
def test_deployment_fine_tunes_to_the_simulation_model(tmp_path, certs, kind):
    sections: dict = {"server": {"rounds": 3, "clients_per_round": 3}}
    if kind == "lora-pretrained":
        base = save_weights(build_model("mlp", {"hidden": [32]}, (1, 8, 8), 10, 9), tmp_path / "base.safetensors")
        sections["model"] = {"init": str(base), "peft": {"name": "lora", "rank": 2, "targets": ["1"], "train": ["3"]}}
    else:
        sections["client"] = {"algorithm": kind, "momentum": 0.0}
    config = h.write_config(tmp_path / "fed.toml", **sections)
    state = h.run_deployment(tmp_path, config, certs, server_s=120)
    sim = h.simulate(tmp_path, config, state)
    assert [r["uplink_bytes"] for r in h.metrics(state)] == [r["uplink_bytes"] for r in sim]
    if kind == "lora-pretrained":  # only the adapters and the head cross the wire
        assert sim[0]["uplink_bytes"] == 3 * 4 * (2 * (64 + 32) + 10 * 32 + 10)
