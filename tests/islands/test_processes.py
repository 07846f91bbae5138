"""Real worker processes on 127.0.0.1 (ephemeral ports): equivalence with the simulation, a
worker killed mid-run, a worker that joins. Every wait in the launcher and the workers has a
timeout, and `max_wall_s` bounds each launch, so a bug fails these tests instead of hanging."""

import json

import pytest
import torch

from koinon.experiment.config import load_config
from koinon.islands import DiLoCo, build_parts
from koinon.islands.cli import launch, launch_main

TINY = """
seed = 3
[data]
name = "shakespeare"
partition = "natural"
num_clients = 3
seq_len = 16
options = {}
[model]
name = "char_transformer"
dim = 8
layers = 1
heads = 2
[codec]
name = "int8"
[server]
rounds = 4
eval_every = 2
[topology]
name = "diloco"
[diloco]
workers = 2
inner_steps = 4
batch_size = 4
vectorized = false
eval_batches = 1
"""


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY.replace("options = {}\n", "plays = 6\n"))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("overrides, syncs", [
    (["diloco.fragments=2", "diloco.overlap=1", "diloco.alpha=0.5"], 8),  # Streaming DiLoCo
    (["diloco.mode=co2", "diloco.co2_penalty=0.5", "diloco.co2_clip=1.0"], 4),
], ids=["streaming", "co2"])
def test_worker_processes_compute_what_the_simulation_computes(config, tmp_path, overrides, syncs):
    cfg = load_config(config, overrides)
    sim = DiLoCo(build_parts(cfg), cfg.seed)
    for _ in range(cfg.server.rounds):
        sim.run_round(evaluate=False)
    summary = launch(load_config(config, overrides), 2, tmp_path / "run", timeout_s=30,
                     max_wall_s=240)
    assert summary["survivors"] == [0, 1] and summary["identical_params"]
    assert summary["sync_events"] == syncs and summary["hash_mismatches"] == []
    real = torch.load(tmp_path / "run" / "params-0.pt")
    torch.testing.assert_close(real, sim.params, rtol=1e-6, atol=1e-7)
    assert summary["uplink_bytes_total"] == sim.uplink_total  # the same codec bytes


@pytest.mark.slow
def test_a_killed_worker_is_dropped_the_rest_finish_identical_and_a_joiner_catches_up(
    config, tmp_path
):
    cfg = load_config(config, ["diloco.workers=3"])
    out = tmp_path / "run"
    # worker 1 dies at inner step 7, in the middle of round 2; a new worker joins at sync 2
    summary = launch(cfg, 3, out, timeout_s=30, crashes={1: 7}, join_at=[2], max_wall_s=240)
    assert summary["exit_codes"]["1"] != 0 and summary["dropped"] == [1]
    assert summary["joined"] == [3]
    assert summary["survivors"] == [0, 2, 3]
    assert summary["identical_params"] and len(summary["params_sha256"]) == 1
    assert summary["hash_checks"] >= 4 and summary["hash_mismatches"] == []
    assert summary["inner_steps"] == 16 and summary["sync_events"] == 4
    finals = [json.loads((out / f"final-{w}.json").read_text()) for w in (0, 2, 3)]
    assert {f["inner_steps"] for f in finals} == {16}
    rounds = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["members"] for r in rounds] == [[0, 1, 2], [0, 2], [0, 2, 3], [0, 2, 3]]


def test_launch_errors_are_one_line(config, tmp_path, capsys):
    assert launch_main([str(config), "--workers", "0", "--out", str(tmp_path / "a")]) == 2
    assert launch_main([str(config), "--workers", "2", "--set", "codec.name=int3",
                        "--out", str(tmp_path / "b")]) == 2
    assert launch_main([str(config), "--workers", "2", "--crash", "x",
                        "--out", str(tmp_path / "c")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(ln.startswith("koinon: error: ") for ln in lines)
    assert "--workers = 0" in lines[0] and "int3" in lines[1] and "--crash" in lines[2]
