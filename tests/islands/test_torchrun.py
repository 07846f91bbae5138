"""The workers under torchrun: really started by torchrun (2 processes on 127.0.0.1), they
compute what `koinon launch` computes, bit for bit; with the variables set by hand (no torchrun
agent store) rank 0 hosts the store itself; a missing or inconsistent variable is a one-line
error."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from koinon.cli import main
from koinon.config import load_config
from koinon.errors import KoinonError
from koinon.islands.cli import launch
from koinon.islands.torchrun import TorchrunEnv
from koinon.topology.diloco import DiLoCo, build_parts

STREAMING = ["diloco.fragments=2", "diloco.overlap=1", "diloco.alpha=0.5"]
TORCHRUN = Path(sys.executable).parent / "torchrun"
ENV = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
       "MASTER_PORT": "29500"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict[str, str]:
    """This environment without anything a torchrun around pytest may have set."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "GROUP_RANK", "ROLE_RANK")
    return {k: v for k, v in os.environ.items()
            if k not in drop and not k.startswith("TORCHELASTIC")}


def worker_args(config: Path, out: Path) -> list[str]:
    sets = [a for o in STREAMING for a in ("--set", o)]
    return ["-m", "koinon.islands.worker", str(config), "--out", str(out), "--timeout", "30", *sets]


@pytest.mark.slow
def test_torchrun_workers_compute_what_koinon_launch_computes(tiny_toml, tmp_path):
    out = tmp_path / "torchrun"
    cmd = [str(TORCHRUN), "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), *worker_args(tiny_toml, out)]
    done = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "identical parameters: True" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["survivors"] == [0, 1] and summary["identical_params"]
    assert summary["sync_events"] == 8 and summary["hash_checks"] == 8
    assert summary["hash_mismatches"] == [] and summary["coordinator_error"] == ""
    assert json.loads((out / "final-1.json").read_text())["background_exchanges"] == 8

    reference = launch(load_config(tiny_toml, STREAMING), 2, tmp_path / "launch", timeout_s=30,
                       max_wall_s=180)
    assert summary["params_sha256"] == reference["params_sha256"]  # bit for bit
    assert summary["uplink_bytes_total"] == reference["uplink_bytes_total"]

    cfg = load_config(tiny_toml, STREAMING)
    sim = DiLoCo(build_parts(cfg), cfg.seed)
    for _ in range(cfg.server.rounds):
        sim.run_round(evaluate=False)
    real = torch.load(out / "params-0.pt")
    torch.testing.assert_close(real, sim.params, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_without_a_torchrun_agent_rank_0_hosts_the_store(tiny_toml, tmp_path):
    # the variables torchrun sets, set by another launcher: no agent store at MASTER_PORT
    out = tmp_path / "by-hand"
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = {**clean_env(), "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, *worker_args(tiny_toml, out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    logs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    summary = json.loads((out / "summary.json").read_text())
    assert summary["survivors"] == [0, 1] and summary["identical_params"]
    assert summary["sync_events"] == 8 and summary["hash_mismatches"] == []


@pytest.mark.parametrize("change, message", [
    ({"RANK": None}, "RANK not set"),
    ({"MASTER_ADDR": None, "MASTER_PORT": ""}, "MASTER_ADDR, MASTER_PORT not set"),
    ({"RANK": "2"}, "RANK = 2: must be in [0, WORLD_SIZE = 2)"),
    ({"RANK": "one"}, "RANK = 'one': must be an integer"),
    ({"WORLD_SIZE": "0", "RANK": "0", "LOCAL_RANK": "0"}, "WORLD_SIZE = 0: must be >= 1"),
    ({"MASTER_PORT": "70000"}, "MASTER_PORT = 70000: must be in [1, 65535]"),
    ({"LOCAL_RANK": "3"}, "LOCAL_RANK = 3: must be in [0, RANK = 1]"),
    ({"LOCAL_WORLD_SIZE": "1"}, "LOCAL_WORLD_SIZE = 1: must be in (LOCAL_RANK = 1"),
])
def test_missing_or_inconsistent_torchrun_variables_are_one_line_errors(change, message):
    env = {k: v for k, v in {**ENV, **change}.items() if v is not None}
    with pytest.raises(KoinonError) as info:
        TorchrunEnv.from_environ(env)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_torchrun_variables_are_read():
    env = TorchrunEnv.from_environ({**ENV, "TORCHELASTIC_USE_AGENT_STORE": "True",
                                    "TORCHELASTIC_RUN_ID": "abc", "TORCHELASTIC_RESTART_COUNT": "2"})
    assert (env.rank, env.world_size, env.local_rank, env.master_port) == (1, 2, 1, 29500)
    assert env.agent_store and (env.run_id, env.restart) == ("abc", 2)


def test_a_worker_started_outside_torchrun_says_how_to_start_it(tiny_toml, monkeypatch, capsys):
    for key in ENV:
        monkeypatch.delenv(key, raising=False)
    assert main(["worker", str(tiny_toml)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("koinon worker: error: no --store and no torchrun")
    assert "torchrun --nproc-per-node M -m koinon.islands.worker" in err[0]
