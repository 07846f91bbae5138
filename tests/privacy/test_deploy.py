"""DP in the real deployment: `koinon server` and three `koinon client` processes give the
simulation's model bit for bit (noise seeded with `privacy.noise_seed`, which is what makes the
comparison possible; a private run leaves it at -1), and record the same epsilon."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from koinon.errors import ConfigError
from koinon.experiment import load_config

_spec = importlib.util.spec_from_file_location(
    "deploy_helpers", Path(__file__).resolve().parents[1] / "deploy" / "helpers.py")
assert _spec and _spec.loader
h = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(h)


@pytest.mark.slow
@pytest.mark.parametrize("privacy", [
    {"dp": "central", "noise_multiplier": 0.5, "noise_seed": 3, "target_quantile": 0.5, "clip_count_stddev": 1.0},
    {"dp": "local", "noise_multiplier": 0.05, "clip": 2.0, "noise_seed": 3},
    {"dp": "sample", "noise_multiplier": 0.5, "noise_seed": 3},
], ids=["central", "local", "sample"])
def test_deployment_gives_the_simulated_private_model(tmp_path, certs, privacy):
    config = h.write_config(tmp_path / "fed.toml", server={"rounds": 3, "clients_per_round": 3}, privacy=privacy)
    state = h.run_deployment(tmp_path, config, certs, server_s=120)
    records = h.metrics(state)
    sim = h.simulate(tmp_path, config, state)
    assert [r["dp_epsilon"] for r in records] == [r["dp_epsilon"] for r in sim]
    assert records[-1]["dp_epsilon"] > 0


@pytest.mark.parametrize("section, values, message", [
    ("privacy", {"secagg_dropout": 0.1}, "simulates dropouts"),
    ("deploy", {"max_update_norm": 5.0}, "secure aggregation hides"),
])
def test_koinon_server_refuses_what_secure_aggregation_cannot_run(tmp_path, section, values, message) -> None:
    from koinon.deploy.server import check_deployable
    from koinon.experiment.runner import build_federation

    sections = {section: dict(values)}
    sections.setdefault("privacy", {})["secagg"] = True
    config = h.write_config(tmp_path / "fed.toml", **sections)
    cfg = load_config(config)
    with pytest.raises(ConfigError, match=message):
        check_deployable(build_federation(cfg), cfg)
