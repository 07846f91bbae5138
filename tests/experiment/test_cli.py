"""End-to-end: the `koinon` command on small configs, resume, and every bad-input path."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from koinon.cli import main

SMALL = """
seed = 1
[data]
name = "digits"
partition = "dirichlet"
alpha = 0.5
num_clients = 20
[model]
name = "mlp"
[client]
epochs = 3
lr = 0.05
momentum = 0.9
[server]
rounds = 12
clients_per_round = 5
eval_every = 4
"""


@pytest.fixture()
def config(tmp_path) -> Path:
    p = tmp_path / "small.toml"
    p.write_text(SMALL)
    return p


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_run_learns_and_writes_every_artifact(config, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 0
    for name in ("config.toml", "metrics.jsonl", "summary.json", "accuracy.png", "model.safetensors", "checkpoint.json"):
        assert (out / name).is_file(), name
    metrics = _metrics(out)
    assert [m["round"] for m in metrics] == list(range(1, 13))
    keys = {"round", "test_accuracy", "test_loss", "train_loss", "num_clients", "uplink_bytes", "downlink_bytes", "wall_s"}
    assert keys <= metrics[0].keys()
    assert [m["round"] for m in metrics if m["test_accuracy"] is not None] == [4, 8, 12]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_accuracy"] > 0.7  # chance is 0.1
    assert summary["uplink_bytes_total"] == sum(m["uplink_bytes"] for m in metrics) == 12 * 5 * 4 * 4810
    resolved = (out / "config.toml").read_text()
    assert "lr = 1.0" in resolved and 'name = "vectorized"' in resolved  # defaults spelled out
    assert "final accuracy" in capsys.readouterr().out


def test_set_overrides_and_resume_reproduces_uninterrupted_run(config, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["run", str(config), "--out", str(full), "--quiet", "--set", "server.rounds=6",
                 "--set", "client.algorithm=scaffold", "--set", "server.optimizer=fedyogi"]) == 0
    assert main(["run", str(config), "--out", str(part), "--quiet", "--set", "server.rounds=3",
                 "--set", "client.algorithm=scaffold", "--set", "server.optimizer=fedyogi"]) == 0
    assert main(["run", "--resume", str(part), "--set", "server.rounds=6", "--quiet"]) == 0
    a = json.loads((full / "summary.json").read_text())
    b = json.loads((part / "summary.json").read_text())
    assert a["model_sha256"] == b["model_sha256"]
    assert a["uplink_bytes_total"] == b["uplink_bytes_total"]
    # The shorter run also evaluated at its last round (3); everything else matches line for line.
    drop = ("wall_s", "test_accuracy", "test_loss")
    strip = [{k: v for k, v in m.items() if k not in drop} for m in _metrics(full)]
    assert strip == [{k: v for k, v in m.items() if k not in drop} for m in _metrics(part)]
    assert _metrics(full)[-1]["test_accuracy"] == _metrics(part)[-1]["test_accuracy"]


@pytest.mark.slow
def test_sigkill_mid_run_then_resume(config, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "koinon.cli", "run", str(config), "--quiet", "--set", "server.rounds=150"]
    subprocess.run([*args, "--out", str(full)], check=True, env=env)
    proc = subprocess.Popen([*args, "--out", str(killed)], env=env)
    deadline = time.time() + 60
    while time.time() < deadline:  # kill once a few rounds are committed
        ckpt = killed / "checkpoint.json"
        if ckpt.exists() and json.loads(ckpt.read_text())["round"] >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "summary.json").exists()  # an unfinished run does not look finished
    subprocess.run([sys.executable, "-m", "koinon.cli", "run", "--resume", str(killed), "--quiet"],
                   check=True, env=env)
    a = json.loads((full / "summary.json").read_text())
    b = json.loads((killed / "summary.json").read_text())
    assert a["model_sha256"] == b["model_sha256"]
    assert len(_metrics(killed)) == 150


BAD = [
    (["--set", "server.roundz=3"], "server.roundz"),
    (["--set", "server.rounds=abc"], "server.rounds"),
    (["--set", "server.rounds=0"], "server.rounds"),
    (["--set", "client.lr=-1"], "client.lr"),
    (["--set", "codec.name=nope"], "allowed: "),
    (["--set", "model.name=resnet"], "model.name"),
    (["--set", "model.hidden=3"], "model.hidden"),
    (["--set", "data.partition=natural"], "natural"),
    (["--set", "data.name=cifar"], "data.name"),
    (["--set", "data.num_samples=5"], "data.num_samples"),
    (["--set", "server.clients_per_round=500"], "clients_per_round"),
    (["--set", "client.algorithm=fedsgd"], "client.algorithm"),
    (["--set", "client.epsilon=0.1"], "client.epsilon"),
    (["--set", "client.algorithm=spsa", "--set", "client.clip=-1"], "client.clip"),
    (["--set", "runtime.memory_mb=1"], "runtime"),
    (["--set", "nonsense"], "section.key=value"),
    (["--set", "bogus.key=1"], "bogus"),
    (["--set", "aggregator.name=bulyan", "--set", "aggregator.num_byzantine=2"], "4f + 3"),
    (["--set", "aggregator.name=krum", "--set", "aggregator.num_byzantine=-1"], "num_byzantine"),
    (["--set", "aggregator.name=nnm+nope"], "nope"),
    (["--set", "attack.fraction=0.2"], "attack.name"),
    (["--set", "attack.fraction=1.5", "--set", "attack.name=alie"], "attack.fraction"),
]


@pytest.mark.parametrize("extra,needle", BAD)
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(config, tmp_path, capsys, extra, needle):
    out = tmp_path / "never"
    assert main(["run", str(config), "--out", str(out), "--quiet", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("koinon: error:") and len(err.splitlines()) == 1 and needle in err, err
    assert not out.exists()


def test_bad_files_and_folders(config, tmp_path, capsys):
    assert main(["run", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken.toml"
    broken.write_text("[server\nrounds = 3")
    assert main(["run", str(broken)]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[servr]\nrounds = 3\n")
    assert main(["run", str(unknown)]) == 2
    assert "servr" in capsys.readouterr().err
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    assert main(["run", str(config), "--out", str(occupied)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["run", str(config), "--out", str(occupied), "--overwrite"]) == 2
    assert (occupied / "notes.txt").read_text() == "mine"  # never deletes what is not a run
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "not a koinon run" in capsys.readouterr().err


def test_resume_refuses_changes_that_alter_the_run(config, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["run", str(config), "--out", str(out), "--quiet", "--set", "server.rounds=2"]) == 0
    assert main(["run", "--resume", str(out), "--set", "client.lr=0.5"]) == 2
    assert "cannot change when resuming" in capsys.readouterr().err


def test_list_shows_every_family(capsys):
    assert main(["list"]) == 0
    text = capsys.readouterr().out
    for name in ("digits", "mnist1d", "synthetic", "dirichlet", "shards", "quantity", "natural", "mlp",
                 "cnn", "cnn1d", "fedavg", "fedprox", "scaffold", "fedadam", "fedyogi", "fedadagrad",
                 "fedavgm", "uniform", "proportional", "identity", "fp16", "mean", "inprocess", "vectorized"):
        assert f"  {name} " in text, name


def test_run_help_lists_every_key(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    for key in ("seed", "data.alpha", "data.test_fraction", "client.mu", "client.weight_decay",
                "server.clients_per_round", "server.eval_every", "codec.name", "aggregator.name", "runtime.name"):
        assert key in text, key


def test_gossip_topology_runs_and_resumes_identically(tmp_path):
    config = tmp_path / "gossip.toml"
    config.write_text(SMALL + '\n[topology]\nname = "gossip"\ngraph = "exponential"\n'
                      'final_merge_every = 3\nfailures = { 2 = 0.3 }\n')
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["run", str(config), "--out", str(full), "--quiet", "--set", "server.rounds=6"]) == 0
    assert main(["run", str(config), "--out", str(part), "--quiet", "--set", "server.rounds=4"]) == 0
    assert main(["run", "--resume", str(part), "--set", "server.rounds=6", "--quiet"]) == 0
    a = json.loads((full / "summary.json").read_text())
    b = json.loads((part / "summary.json").read_text())
    assert a["model_sha256"] == b["model_sha256"] and a["uplink_bytes_total"] == b["uplink_bytes_total"]
    last = _metrics(full)[-1]
    assert last["num_live"] == 14 and last["consensus_distance"] < 1e-8  # 30% of 20 crashed; merged
    assert a["final_accuracy"] > 0.5


def test_gossip_bad_keys(config, tmp_path, capsys):
    out = tmp_path / "g"
    assert main(["run", str(config), "--out", str(out), "--set", "topology.name=mesh"]) == 2
    assert "topology.name" in capsys.readouterr().err
    assert main(["run", str(config), "--out", str(out), "--set", "topology.name=gossip",
                 "--set", "topology.graph=hypercube"]) == 2
    assert "hypercube" in capsys.readouterr().err
    assert main(["run", str(config), "--out", str(out), "--set", "topology.name=gossip",
                 "--set", "topology.failures={x = 1}"]) == 2
    assert "topology.failures" in capsys.readouterr().err
    assert not out.exists()


def test_attack_section_makes_byzantine_gossip_peers(config, tmp_path, capsys):
    """[attack] applies to gossip as to a federation: sign-flipping peers wreck plain D-PSGD."""
    from koinon.experiment import load_config
    from koinon.experiment.runner import build_federation

    gossip = ["topology.name=gossip", "topology.graph=exponential", "server.rounds=4"]
    attacked = build_federation(load_config(config, [*gossip, "attack.name=sign_flip", "attack.fraction=0.3"]))
    assert int(attacked.byzantine.mask.sum()) == 6  # 30 % of 20 peers
    clean = build_federation(load_config(config, gossip))
    assert int(clean.byzantine.mask.sum()) == 0
    assert attacked.fit(4)[-1].test_accuracy < clean.fit(4)[-1].test_accuracy - 0.2
    out = tmp_path / "both"
    assert main(["run", str(config), "--out", str(out), *[a for s in gossip for a in ("--set", s)],
                 "--set", "attack.name=gaussian", "--set", "topology.byzantine_fraction=0.2"]) == 2
    assert "not both" in capsys.readouterr().err
