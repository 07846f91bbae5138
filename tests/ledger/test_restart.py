"""A run with a [ledger] continues after a crash: its round log is reopened, its last signed head
checked, cut back to the committed rounds, and the rounds redone are logged once; the finished
log verifies and pays what the uninterrupted run pays."""

from __future__ import annotations

import json
import shutil

import pytest

from koinon.config import Config
from koinon.errors import KoinonError
from koinon.experiment import resume_experiment, run_experiment
from koinon.ledger.roundlog import RoundLog, load_server_key, new_server_key, read_log
from koinon.ledger.verify import verify_run
from koinon.records import folder

BASE = {
    "seed": 0,
    "data": {"name": "digits", "partition": "iid", "num_clients": 6},
    "model": {"name": "mlp", "hidden": [16]},
    "client": {"epochs": 1, "batch_size": 32, "lr": 0.1},
    "server": {"rounds": 4, "clients_per_round": 5},
    "ledger": {"contribution": "gtg", "payout_cents": 10_000, "max_permutations": 10},
}


def cfg() -> Config:
    return Config.from_dict(json.loads(json.dumps(BASE)))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_experiment(cfg(), out, progress=False)
    return out


def entries(run):
    return [json.loads(x) for x in (run / "ledger" / "log.jsonl").read_text().splitlines()]


def crash_before_checkpoint(monkeypatch, at_round: int):
    """The process dies after round `at_round` was logged, before its checkpoint."""
    real = folder.checkpoint

    def checkpoint(topology, out, wall):
        if topology.round_index == at_round:
            raise SystemExit("killed")
        real(topology, out, wall)

    monkeypatch.setattr(folder, "checkpoint", checkpoint)


def test_resume_cuts_the_log_back_and_pays_what_the_uninterrupted_run_pays(tmp_path, monkeypatch, reference):
    out = tmp_path / "run"
    crash_before_checkpoint(monkeypatch, 3)
    with pytest.raises(SystemExit):
        run_experiment(cfg(), out, progress=False)
    monkeypatch.undo()
    logged = entries(out)
    assert max(e.get("round", 0) for e in logged) == 3  # round 3 is in the log, not in the checkpoint
    with (out / "ledger" / "log.jsonl").open("ab") as f:  # and a torn line after it
        f.write(b'{"type":"rec')
    key = (out / "ledger" / "server_key.pem").read_bytes()
    resume_experiment(out, progress=False)
    assert (out / "ledger" / "server_key.pem").read_bytes() == key  # the signing key persists
    report = verify_run(out)
    assert report.ok, report.failure
    got, want = entries(out), entries(reference)
    assert [e["type"] for e in got] == [e["type"] for e in want]  # nothing logged twice or lost
    signed = ("server_signature", "server_key")
    assert ([{k: v for k, v in e.items() if k not in signed} for e in got]
            == [{k: v for k, v in e.items() if k not in signed} for e in want])
    assert (out / "payouts.csv").read_text() == (reference / "payouts.csv").read_text()
    assert json.loads((out / "summary.json").read_text())["model_sha256"] == \
        json.loads((reference / "summary.json").read_text())["model_sha256"]


def test_a_resumed_run_must_keep_its_committed_config(tmp_path, monkeypatch):
    out = tmp_path / "run"
    crash_before_checkpoint(monkeypatch, 2)
    with pytest.raises(SystemExit):
        run_experiment(cfg(), out, progress=False)
    monkeypatch.undo()
    before = (out / "ledger" / "log.jsonl").read_bytes()
    with pytest.raises(KoinonError, match="continues only with the config it committed to"):
        resume_experiment(out, ["server.rounds=6"], progress=False)
    # A refused resume leaves the committed rounds in place (it may drop the uncommitted one).
    assert before.startswith((out / "ledger" / "log.jsonl").read_bytes())
    resume_experiment(out, progress=False)
    assert verify_run(out).ok


def test_a_finished_run_resumed_again_does_not_log_its_payout_twice(tmp_path, reference):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "summary.json").unlink()
    before = (out / "ledger" / "log.jsonl").read_bytes()
    resume_experiment(out, progress=False)
    assert (out / "ledger" / "log.jsonl").read_bytes() == before
    assert verify_run(out).ok


def log_of(tmp_path, count):
    key = new_server_key(tmp_path)
    log = RoundLog(tmp_path, key)
    for i in range(count):
        log.append({"type": "round" if i else "open", "round": i})
    return log


def test_reopen_checks_the_last_kept_head_and_rewrites_the_prefix(tmp_path):
    log_of(tmp_path, 6)
    key = load_server_key(tmp_path)
    reopened = RoundLog.reopen(tmp_path, key, lambda entries: 4)
    lines, heads = read_log(tmp_path)
    assert len(lines) == len(heads) == 4 and reopened.heads[-1] == heads[-1]
    reopened.append({"type": "round", "round": 4})
    lines, heads = read_log(tmp_path)
    assert len(lines) == len(heads) == 5 and json.loads(lines[-1])["seq"] == 4
    # A head that does not verify (another key signed it, or the log changed) stops the restart.
    with pytest.raises(KoinonError, match="signed tree head"):
        RoundLog.reopen(tmp_path, new_server_key(tmp_path / "other"), lambda entries: len(entries))
    text = (tmp_path / "log.jsonl").read_bytes().replace(b'"round":2', b'"round":7')
    (tmp_path / "log.jsonl").write_bytes(text)
    with pytest.raises(KoinonError, match="signed tree head"):
        RoundLog.reopen(tmp_path, key, lambda entries: len(entries))
    assert RoundLog.reopen(tmp_path, key, lambda entries: 2).heads[-1].size == 2  # an earlier prefix still stands


def test_a_state_folder_that_lost_committed_rounds_is_refused(tmp_path, reference):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "summary.json").unlink()
    lines = (out / "ledger" / "log.jsonl").read_bytes().split(b"\n")
    first_round = next(i for i, x in enumerate(lines) if b'"type":"round"' in x and b'"round":2' in x)
    (out / "ledger" / "log.jsonl").write_bytes(b"\n".join(lines[:first_round]) + b"\n")
    with pytest.raises(KoinonError, match="holds 1 rounds but 4 are committed"):
        resume_experiment(out, progress=False)



@pytest.mark.slow
def test_a_simulation_sigkilled_mid_run_resumes_to_the_uninterrupted_ledger(tmp_path):
    """`koinon run` as a real process, SIGKILLed once a few rounds are checkpointed, then
    `koinon run --resume`: the log verifies and pays what the uninterrupted run pays."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import tomli_w

    config = tmp_path / "run.toml"
    config.write_text(tomli_w.dumps({**BASE, "server": {**BASE["server"], "rounds": 40}}))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "koinon.cli", "run", str(config), "--quiet"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run([*run, "--out", str(full)], check=True, env=env, timeout=600)
    proc = subprocess.Popen([*run, "--out", str(killed)], env=env)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill once a few rounds are committed
        ckpt = killed / "checkpoint.json"
        if ckpt.exists() and json.loads(ckpt.read_text())["round"] >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    subprocess.run([sys.executable, "-m", "koinon.cli", "run", "--resume", str(killed), "--quiet"],
                   check=True, env=env, timeout=600)
    assert verify_run(killed).ok
    signed = ("server_signature", "server_key")
    assert ([{k: v for k, v in e.items() if k not in signed} for e in entries(killed)]
            == [{k: v for k, v in e.items() if k not in signed} for e in entries(full)])
    assert (killed / "payouts.csv").read_text() == (full / "payouts.csv").read_text()
