"""`koinon server` with FedBuff / FedAsync: real processes on 127.0.0.1 (koinon.deploy.asynchronous)."""

from __future__ import annotations

import importlib.util
import json
import sqlite3
from pathlib import Path

import pytest

from koinon.experiment import load_config, run_experiment

_spec = importlib.util.spec_from_file_location("deploy_helpers", Path(__file__).with_name("helpers.py"))
assert _spec is not None and _spec.loader is not None
h = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(h)

# Equal step counts (client.steps), so the simulated clients of equal speed arrive together.
BASE = {"client": {"steps": 4, "batch_size": 32, "lr": 0.1, "momentum": 0.9},
        "server": {"rounds": 5, "clients_per_round": 3}}


def _config(tmp: Path, name: str, schedule: dict, **sections: dict) -> Path:
    merged = {**BASE, **sections, "schedule": schedule}
    return h.write_config(tmp / name, **merged)


def _deploy(tmp: Path, config: Path, certs: Path, clients: int = 3) -> dict:
    state = h.run_deployment(tmp, config, certs, clients=clients)
    return json.loads((state / "summary.json").read_text())


def _simulate(tmp: Path, config: Path, out: str, **overrides) -> dict:
    cfg = load_config(config)
    if overrides:
        cfg = cfg.with_overrides(overrides)
    return run_experiment(cfg, tmp / out, progress=False)


@pytest.mark.slow
def test_deployed_fedbuff_with_a_full_cohort_buffer_is_the_simulation_bit_for_bit(tmp_path, certs):
    longer = {"client": {**BASE["client"], "steps": 10}, "server": {"rounds": 6, "clients_per_round": 3}}
    config = _config(tmp_path, "fed.toml", {"name": "fedbuff", "buffer": 3, "concurrency": 3}, **longer)
    summary = _deploy(tmp_path, config, certs)
    sim = _simulate(tmp_path, config, "sim", **{"clock.speed": "constant"})
    plain = _simulate(tmp_path, h.write_config(tmp_path / "plain.toml", **{**BASE, **longer}), "plain")
    assert summary["model_sha256"] == sim["model_sha256"] == plain["model_sha256"]
    assert summary["final_accuracy"] > 0.7


def _db(state: Path, sql: str) -> list[tuple]:
    db = sqlite3.connect(state / "state.db")
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


@pytest.mark.slow
def test_server_killed_during_fedbuff_training_loses_no_accepted_update_and_applies_none_twice(tmp_path, certs):
    # Killed twice: right after an update's acceptance committed (its client never hears
    # "accepted", the buffer is not full), and right after a step committed (before its buffer
    # files and old checkpoint go). Each restart goes on from state.db; the run must end with
    # the uninterrupted simulation's model, bit for bit, every accepted update applied once.
    rounds = 6
    config = _config(tmp_path, "fed.toml", {"name": "fedbuff", "buffer": 3, "concurrency": 3},
                     server={"rounds": rounds, "clients_per_round": 3})
    state = tmp_path / "state"
    server, address = h.start_server(tmp_path, config, certs, state, env={"KOINON_CRASH_AT": "server.async_accepted@2"})
    clients = [h.start_client(tmp_path, address, certs, f"client-{i}", f"partition:{i}", give_up=120)
               for i in range(3)]
    assert server.wait(120) == 86, server.text()[-3000:]
    assert _db(state, "SELECT COUNT(*) FROM async_buffer WHERE applied < 0") == [(1,)]  # accepted, waiting
    port = int(address.rsplit(":", 1)[1])
    server, _ = h.start_server(tmp_path, config, certs, state, name="server-2", port=port,
                               env={"KOINON_CRASH_AT": "server.stepped@4"})
    assert server.wait(120) == 86, server.text()[-3000:]
    assert "1 accepted updates waiting" in server.text()
    server, _ = h.start_server(tmp_path, config, certs, state, name="server-3", port=port)
    assert server.wait(120) == 0, server.text()[-3000:]
    for c in clients:
        assert c.wait(60) == 0, c.text()[-3000:]
    summary = json.loads((state / "summary.json").read_text())
    sim = _simulate(tmp_path, config, "sim", **{"clock.speed": "constant"})
    assert summary["model_sha256"] == sim["model_sha256"]
    # Every accepted update applied exactly once, three per step, none waiting or lost.
    applied = _db(state, "SELECT task, client, applied FROM async_buffer ORDER BY seq")
    assert len(applied) == 3 * rounds and all(step >= 1 for _, _, step in applied)
    assert sorted(step for _, _, step in applied) == sorted(list(range(1, rounds + 1)) * 3)
    accepted = _db(state, "SELECT round, client FROM updates WHERE status = 'accepted' ORDER BY round, client")
    assert accepted == sorted((t, c) for t, c, _ in applied)
    assert not list((state / "buffer").glob("*.bin"))
    assert [r["round"] for r in h.metrics(state)] == list(range(1, rounds + 1))


@pytest.mark.slow
def test_deployed_fedasync_one_client_at_a_time_is_the_simulation_and_with_three_it_mixes_stale_models(tmp_path, certs):
    # One client training at a time: every update is fresh, mixed in with weight 0.6 * s(0):
    # the simulation's FedAsync, bit for bit. Three at a time: updates arrive stale and are
    # mixed from the model their client started from (kept in the state folder).
    # deploy.min_connected = 3: the first dispatch samples from all three, as the simulation does.
    one = _config(tmp_path, "one.toml", {"name": "fedasync", "concurrency": 1},
                  server={"rounds": 6, "clients_per_round": 1},
                  deploy={"round_timeout_s": 20.0, "wait_clients_s": 60.0, "min_connected": 3})
    (tmp_path / "one").mkdir()
    summary = _deploy(tmp_path / "one", one, certs)
    sim = _simulate(tmp_path, one, "sim", **{"clock.speed": "constant"})
    assert summary["model_sha256"] == sim["model_sha256"]
    three = _config(tmp_path, "three.toml", {"name": "fedasync", "concurrency": 3},
                    server={"rounds": 12, "clients_per_round": 3})
    (tmp_path / "three").mkdir()
    summary = _deploy(tmp_path / "three", three, certs)
    records = h.metrics(tmp_path / "three" / "state")
    assert len(records) == 12 and all(r["num_clients"] == 1 for r in records)
    assert max(r["staleness_max"] for r in records) >= 1
    assert summary["final_accuracy"] > records[0]["test_accuracy"]


@pytest.mark.slow
def test_server_sigkilled_at_a_random_moment_of_fedasync_applies_every_accepted_update_once(tmp_path, certs):
    # Three clients at once, so updates arrive stale and are mixed from the model their client
    # got (kept in the state folder across the kill). The kill lands wherever training is.
    rounds = 90
    config = _config(tmp_path, "fed.toml", {"name": "fedasync", "concurrency": 3},
                     server={"rounds": rounds, "clients_per_round": 3})
    state = tmp_path / "state"
    server, address = h.start_server(tmp_path, config, certs, state)
    clients = [h.start_client(tmp_path, address, certs, f"client-{i}", f"partition:{i}", give_up=120)
               for i in range(3)]
    h.wait_for(lambda: h.committed_rounds(state) >= 5, 120, server, "5 steps")
    server.kill()  # SIGKILL
    killed_at = h.committed_rounds(state)
    assert killed_at < rounds, "the run ended before the kill; make it longer"
    server, _ = h.start_server(tmp_path, config, certs, state, name="server-2", port=int(address.rsplit(":", 1)[1]))
    assert server.wait(120) == 0, server.text()[-3000:]
    for c in clients:
        assert c.wait(60) == 0, c.text()[-3000:]
    applied = _db(state, "SELECT task, client, applied FROM async_buffer ORDER BY seq")
    assert sorted(step for _, _, step in applied) == list(range(1, rounds + 1))  # one update per step, each once
    accepted = _db(state, "SELECT round, client FROM updates WHERE status = 'accepted'")
    assert sorted(accepted) == sorted((t, c) for t, c, _ in applied)  # none lost, none twice
    records = h.metrics(state)
    assert [r["round"] for r in records] == list(range(1, rounds + 1))
    assert max(r["staleness_max"] for r in records) >= 1
    assert not list((state / "buffer").glob("*.bin"))
