"""Personalized methods in a real deployment: `koinon server` and three `koinon client`
processes on 127.0.0.1 end with the simulation's global model, bit for bit. FedRep's private
head lives in each client's `--state`; IFCA's cluster models travel as downloads and the
server moves them from each client's rows (`server_update_rows`). FedCAC's customized models and
pFedPG's prompt offsets are per-client downloads: each task carries its client's own, counted."""

import importlib.util
from pathlib import Path

import pytest
from safetensors.torch import load_file

_spec = importlib.util.spec_from_file_location(
    "deploy_helpers", Path(__file__).parents[1] / "deploy" / "helpers.py")
assert _spec and _spec.loader
h = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(h)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("client", [
    {"algorithm": "fedrep", "head_steps": 3, "momentum": 0.0},
    {"algorithm": "ifca", "clusters": 2, "momentum": 0.0},
    {"algorithm": "pfedgate", "budgets": [1.0, 0.5], "momentum": 0.0},
    {"algorithm": "fedconv", "budgets": [1.0, 0.5], "momentum": 0.0},
    {"algorithm": "fedconv", "budgets": [1.0, 0.5], "upload": "submodel", "momentum": 0.0},
    {"algorithm": "reconnaissance", "momentum": 0.0},
    {"algorithm": "fedka", "voters": 2, "momentum": 0.0},
    {"algorithm": "fedins", "pool_size": 4, "momentum": 0.0},
    {"algorithm": "fraug", "noise": 4, "gen_hidden": 8, "momentum": 0.0},
    {"algorithm": "fedossl", "momentum": 0.0},  # every label known: FedAvg with a zero centroid stream
    {"algorithm": "fedcac", "adapt_steps": 3, "momentum": 0.0},
    {"algorithm": "pfedpg", "adapt_steps": 3, "momentum": 0.0},
], ids=["fedrep", "ifca", "pfedgate", "fedconv", "fedconv-submodel", "reconnaissance", "fedka", "fedins", "fraug",
        "fedossl", "fedcac", "pfedpg"])
def test_deployment_trains_a_personalized_method_to_the_simulation_model(tmp_path, certs, client):
    config = h.write_config(tmp_path / "fed.toml", server={"rounds": 3, "clients_per_round": 3}, client=client)
    state = h.run_deployment(tmp_path, config, certs, server_s=90)
    sim = h.simulate(tmp_path, config, state)
    if client["algorithm"] in ("fedcac", "pfedpg"):
        # Each client's own download (FedCAC's customized model, pFedPG's prompt offset) was sent
        # to it alone and counted as the simulation counts it; its state stayed in its --state.
        deployed = h.metrics(state)
        assert [r["downlink_bytes"] for r in deployed] == [r["downlink_bytes"] for r in sim]
        assert [r["uplink_bytes"] for r in deployed] == [r["uplink_bytes"] for r in sim]
        key = "algorithm/critical" if client["algorithm"] == "fedcac" else "algorithm/personal"
        for i in range(3):
            files = list((tmp_path / "client-state" / f"client-{i}").rglob("state.safetensors"))
            assert files and key in load_file(files[0]), i
    if client["algorithm"] == "fedrep":  # each client's head stayed in its own --state
        for i in range(3):
            files = list((tmp_path / "client-state" / f"client-{i}").rglob("state.safetensors"))
            assert files and any(k.startswith("algorithm/private") for k in load_file(files[0])), i
    if client["algorithm"] == "pfedgate":  # each client's gating layer stayed in its own --state
        for i in range(3):
            files = list((tmp_path / "client-state" / f"client-{i}").rglob("state.safetensors"))
            assert files and any(k.startswith("algorithm/gate_weight") for k in load_file(files[0])), i
