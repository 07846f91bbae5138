"""Real worker processes on 127.0.0.1 (ephemeral ports): equivalence with the simulation (with
the exchanges really overlapping training), a worker killed mid-run, a worker that joins. Every wait in the launcher and the workers has a
timeout, and `max_wall_s` bounds each launch, so a bug fails these tests instead of hanging."""

import json

import pytest
import torch

from koinon.cli import main
from koinon.config import load_config
from koinon.islands.cli import launch
from koinon.topology.diloco import DiLoCo, build_parts


@pytest.fixture
def config(tiny_toml):
    return tiny_toml


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
    final = json.loads((tmp_path / "run" / "final-0.json").read_text())
    assert final["background_exchanges"] == syncs  # every exchange overlapped training


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
    assert main(["launch", str(config), "--workers", "0", "--out", str(tmp_path / "a")]) == 2
    assert main(["launch", str(config), "--workers", "2", "--set", "codec.name=int3",
                        "--out", str(tmp_path / "b")]) == 2
    assert main(["launch", str(config), "--workers", "2", "--crash", "x",
                        "--out", str(tmp_path / "c")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(ln.startswith("koinon: error: ") for ln in lines)
    assert "--workers = 0" in lines[0] and "int3" in lines[1] and "--crash" in lines[2]


@pytest.mark.slow
def test_co2_worker_killed_while_its_background_exchange_is_in_flight(config, tmp_path):
    # A 2.5 s emulated link keeps sync event 0's exchange (after inner step 4) in flight while the
    # workers train on: worker 1 dies at inner step 7, inside that exchange (its all-gather done,
    # its `done` not yet sent). Not at step 5: the exchange runs in a background thread, and on a
    # loaded machine one inner step could end before that thread had said it was ready, so the
    # worker was dropped before the attempt instead of inside it (no retry). The survivors' background threads must retry without it, as the blocking
    # exchange does, and a new worker joins at sync event 2 from a peer whose own exchange is
    # in flight (it is served the state of the sync event, not of the peer's training since).
    cfg = load_config(config, ["diloco.workers=3", "diloco.mode=co2", "diloco.co2_clip=1.0"])
    out = tmp_path / "run"
    summary = launch(cfg, 3, out, timeout_s=30, crashes={1: 7}, join_at=[2],
                     link_latency_ms=2500, max_wall_s=240)
    assert summary["exit_codes"]["1"] != 0 and summary["dropped"] == [1]
    assert summary["retries"] >= 1  # the broken attempt of sync event 0 was retried
    assert summary["joined"] == [3] and summary["survivors"] == [0, 2, 3]
    assert summary["identical_params"] and summary["hash_mismatches"] == []
    assert summary["sync_events"] == 4 and summary["inner_steps"] == 16
    finals = [json.loads((out / f"final-{w}.json").read_text()) for w in (0, 2, 3)]
    assert finals[0]["background_exchanges"] == 4 and finals[2]["background_exchanges"] == 1
    rounds = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    # CO2 logs the members of the average applied in the round: the one of the round before
    assert [r["members"] for r in rounds][1:] == [[0, 2], [0, 2], [0, 2, 3]]


@pytest.mark.slow
def test_a_worker_joining_from_another_shell_says_so_and_is_counted_among_the_survivors(config, tmp_path):
    import subprocess
    import sys

    joiner: list[subprocess.Popen] = []

    def start_joiner(address: str) -> None:  # as soon as the store is up: it joins at an early sync
        joiner.append(subprocess.Popen(
            [sys.executable, "-c", "import sys; from koinon.cli import main; sys.exit(main())",
             "launch", "--join", address, "--out", str(tmp_path / "joiner"), "--timeout", "30"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))

    # A 300 ms link keeps the run going for a few seconds, longer than the joiner's start-up.
    summary = launch(load_config(config), 2, tmp_path / "run", timeout_s=30, on_start=start_joiner,
                     link_latency_ms=300, max_wall_s=240)
    out, _ = joiner[0].communicate(timeout=60)
    assert joiner[0].returncode == 0, out
    assert "worker 2: joining the launch at " in out and "worker 2: done after 16 inner steps" in out
    assert summary["joined"] == [2] and summary["survivors"] == [0, 1, 2]
    assert summary["identical_params"] and len(summary["params_sha256"]) == 1
    assert json.loads((tmp_path / "joiner" / "final-2.json").read_text())["params_sha256"] == summary["params_sha256"][0]
