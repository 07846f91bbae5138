"""The faults of a hostile run of `koinon server` (issue 23), each reproduced with real processes.

Kill points are injected (`KOINON_CRASH_AT`, koinon.deploy.faults), never found by timing: the
process exits exactly between the two steps the fault lives between.
"""

import importlib.util
import json
import shutil
import socket
import sqlite3
import subprocess
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from koinon.deploy.certs import create_certs
from koinon.deploy.faults import CRASH_EXIT
from koinon.deploy.server import MAX_OPEN_CALLS
from koinon.deploy.store import REFUSALS_KEPT
from koinon.deploy.wire import pb, read_task
from koinon.experiment import load_config, run_experiment
from koinon.experiment.runner import build_federation

_here = Path(__file__).parent


def _load(name):
    spec = importlib.util.spec_from_file_location(f"deploy_{name}", _here / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


h = _load("helpers")
sec = _load("test_security")

pytestmark = pytest.mark.slow


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The single `koinon: error:` line of a refused start (no traceback)."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("koinon: error:")
    return last


def run_koinon(tmp: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*h.KOINON, *args], capture_output=True, text=True, timeout=timeout, env=h.ENV, cwd=tmp)


def test_a_client_killed_after_the_servers_acceptance_keeps_its_error_feedback(tmp_path, certs):
    """Fault 1: killed between "accepted" and its own save, a client used to go on with the
    previous round's residual while the server held its new update."""
    config = h.write_config(tmp_path / "fed.toml", server={"rounds": 4, "clients_per_round": 3},
                            codec={"name": "ef", "inner": {"name": "topk", "ratio": 0.1}})
    state = tmp_path / "state"
    server, address = h.start_server(tmp_path, config, certs, state)
    clients = [h.start_client(tmp_path, address, certs, f"client-{i}", f"partition:{i}",
                              env={"KOINON_CRASH_AT": "client.accepted@1"} if i == 1 else None)
               for i in range(3)]
    assert clients[1].wait(90) == CRASH_EXIT, clients[1].text()[-3000:]
    assert "exiting at client.accepted (round 1)" in clients[1].text()
    clients[1] = h.start_client(tmp_path, address, certs, "client-1", "partition:1")
    assert server.wait(120) == 0, server.text()[-3000:]
    for c in clients:
        assert c.wait(30) == 0, c.text()[-3000:]
    assert "the upload of round 2 was sent" in clients[1].text()  # crash points count from 0
    summary = json.loads((state / "summary.json").read_text())
    reference = run_experiment(load_config(config), tmp_path / "sim", progress=False)
    assert summary["model_sha256"] == reference["model_sha256"]
    assert all(r["num_clients"] == 3 for r in h.metrics(state))


def test_damaged_state_is_refused_in_one_line_and_a_port_is_one_servers(tmp_path, certs):
    """Faults 2, 3 and 4, the pending file left by a kill between commit and clean-up, and a
    partition bound to its certificate across a restart (fault 7)."""
    config = h.write_config(tmp_path / "fed.toml", data={"num_clients": 2},
                            server={"rounds": 3, "clients_per_round": 2})
    state = tmp_path / "state"
    server, address = h.start_server(tmp_path, config, certs, state,
                                     env={"KOINON_CRASH_AT": "server.committed@2"})
    clients = [h.start_client(tmp_path, address, certs, f"client-{i}", f"partition:{i}") for i in range(2)]
    assert server.wait(90) == CRASH_EXIT, server.text()[-3000:]
    assert sorted(p.name for p in (state / "pending").glob("r000001-*")), "the kill left no pending file"
    port = address.rsplit(":", 1)[1]
    # The clients wait outside until the fault 7 check below is done: with them connected, the
    # restarted server could finish its last round and stop before that check's Join arrives.
    for c in clients:
        c.kill()

    def copy(name: str) -> Path:
        out = tmp_path / name
        shutil.copytree(state, out, ignore=shutil.ignore_patterns("server.lock"))
        db = sqlite3.connect(out / "state.db")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.close()
        return out

    damaged = {name: copy(name) for name in ("deleted", "empty", "page", "flipped", "truncated", "missing")}
    (damaged["deleted"] / "state.db").unlink()
    (damaged["empty"] / "state.db").write_bytes(b"")
    page = damaged["page"] / "state.db"
    data = bytearray(page.read_bytes())
    data[4096 : 2 * 4096] = b"\xa5" * 4096
    page.write_bytes(bytes(data))
    ckpt = "ckpt-000002.safetensors"
    blob = bytearray((damaged["flipped"] / ckpt).read_bytes())
    blob[-9] ^= 0x10  # a tensor value: the file still parses
    (damaged["flipped"] / ckpt).write_bytes(bytes(blob))
    (damaged["truncated"] / ckpt).write_bytes(bytes(blob[: len(blob) // 3]))
    (damaged["missing"] / ckpt).unlink()
    before = {name: sorted(p.name for p in folder.rglob("*")) for name, folder in damaged.items()}
    procs = {name: subprocess.Popen([*h.KOINON, "server", str(config), "--listen", "127.0.0.1:0", "--certs",
                                     str(certs), "--state", str(folder)], stderr=subprocess.PIPE, text=True,
                                    env=h.ENV, cwd=tmp_path)
             for name, folder in damaged.items()}
    lines = {}
    for name, p in procs.items():
        _, err = p.communicate(timeout=90)
        lines[name] = one_line_error(subprocess.CompletedProcess(p.args, p.returncode, "", err))
    for name in ("deleted", "empty"):
        assert "refusing to start over" in lines[name] and ckpt in lines[name]
        assert sorted(p.name for p in damaged[name].rglob("*") if p.name != "server.lock") == \
            [n for n in before[name] if n != "server.lock"] or name == "empty"
        assert (damaged[name] / ckpt).is_file() and (damaged[name] / "metrics.jsonl").is_file()
    assert "state.db is damaged" in lines["page"]
    for name in ("flipped", "truncated", "missing"):
        assert ckpt in lines[name] and ("damaged" in lines[name] or "missing" in lines[name])

    # The real folder resumes: the leftover pending file goes, the run ends as the simulation's.
    server, _ = h.start_server(tmp_path, config, certs, state, "server-2", port=int(port))
    assert not list((state / "pending").glob("r000001-*"))
    # Fault 4: a second server on the same port (another state folder) is refused in one line.
    second = run_koinon(tmp_path, "server", str(config), "--listen", f"127.0.0.1:{port}", "--certs", str(certs),
                        "--state", str(tmp_path / "other"))
    assert "cannot listen there" in one_line_error(second)
    # Fault 7: client-1's partition stays its own after the restart, for any other certificate.
    fed = build_federation(load_config(config))
    creds = sec.client_credentials(certs, "client-3")
    stub, channel = sec.stub_for(address, creds.ca, creds.cert, creds.key)
    with pytest.raises(grpc.RpcError) as err:
        stub.Join(pb.JoinRequest(partition=1, num_samples=len(fed.data.client_indices[1])), timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "belongs to another client certificate" in err.value.details()
    channel.close()
    clients = [h.start_client(tmp_path, address, certs, f"client-{i}", f"partition:{i}") for i in range(2)]
    assert server.wait(90) == 0, server.text()[-3000:]
    for c in clients:
        assert c.wait(30) == 0, c.text()[-3000:]
    summary = json.loads((state / "summary.json").read_text())
    assert summary["model_sha256"] == run_experiment(load_config(config), tmp_path / "sim",
                                                     progress=False)["model_sha256"]


def test_hostile_clients_cannot_fill_the_disk_stall_polls_take_partitions_or_end_training(tmp_path):
    """Faults 5, 6, 7, 8, wrong-round uploads not counted as late, and a client that cannot reach
    the server says why when it gives up."""
    certs = tmp_path / "certs"
    create_certs(certs, 4, ["127.0.0.1"])
    foreign = tmp_path / "foreign"
    create_certs(foreign, 1, ["127.0.0.1"])
    config = h.write_config(tmp_path / "fed.toml", data={"num_clients": 3},
                            server={"rounds": 2, "clients_per_round": 2},
                            deploy={"min_clients": 2, "max_update_norm": 1e25})
    fed = build_federation(load_config(config))
    state = tmp_path / "state"
    server, address = h.start_server(tmp_path, config, certs, state)
    try:
        # Minor: the give-up line names the cause (here: a CA that did not sign the server).
        tls = run_koinon(tmp_path, "client", "--server", address, "--certs", str(foreign), "--id", "client-0",
                         "--data", "partition:0", "--state", str(tmp_path / "cs"), "--give-up", "1")
        assert tls.returncode == 1 and "TLS failed" in tls.stderr.strip().splitlines()[-1]

        a = sec.Adversary(address, certs, "client-0", 0, fed)
        b = sec.Adversary(address, certs, "client-1", 1, fed)
        # Fault 7: another certificate cannot take partition 0, even while client-0 is away,
        # and the refusal leaks nothing about the partition.
        c = sec.client_credentials(certs, "client-3")
        stub3, _ = sec.stub_for(address, c.ca, c.cert, c.key)
        size0 = len(fed.data.client_indices[0])
        for partition, samples in ((0, size0), (0, 1), (2, 1)):
            with pytest.raises(grpc.RpcError) as err:
                stub3.Join(pb.JoinRequest(partition=partition, num_samples=samples), timeout=10)
            assert str(size0) not in err.value.details() and str(len(fed.data.client_indices[2])) not in \
                err.value.details()
            expected = grpc.StatusCode.PERMISSION_DENIED if partition == 0 else grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.code() == expected

        r = a.task()
        assert b.task() == r
        # Minor: an upload for a round that never opened is rejected, not counted as late.
        assert "not open" in a.upload(r + 5, a.valid())
        # Fault 5: refusals quoting a 512 KiB header string, in a loop.
        huge = "h" * (512 << 10)
        reasons = [a.upload(r, a.valid(), layout_hash=huge) for _ in range(60)]
        assert all("layout hash" in x and len(x) < 400 for x in reasons)
        # Fault 8: finite but huge values (1e20, under the norm bound of 1e25) are accepted,
        # and the model they would make is refused at the round's close.
        huge_update = np.full(fed.layout.numel, 1e20, dtype=np.float32).tobytes()
        assert a.upload(r, huge_update) == "accepted"
        # Fault 6: 50 concurrent polls with one certificate hold at most MAX_OPEN_CALLS calls.
        polls = futures.ThreadPoolExecutor(50)

        def poll():
            try:
                read_task(a.stub.Poll(pb.PollRequest(client_index=a.idx), timeout=30), 1 << 30)
                return "answered"
            except grpc.RpcError as exc:
                return exc.details() or exc.code().name

        flood = [polls.submit(poll) for _ in range(50)]
        assert b.upload(r, b.valid()) == "accepted"  # an honest client goes through meanwhile
        outcomes = [f.result(timeout=60) for f in flood]
        assert outcomes.count("answered") <= MAX_OPEN_CALLS, outcomes
        assert sum("calls open" in o for o in outcomes) >= 50 - MAX_OPEN_CALLS - 40  # the rest: gRPC's own cap
        # Round 2: an update over deploy.max_update_norm is refused; the honest ones count.
        r2 = a.task()
        assert r2 == r + 1
        over = a.upload(r2, np.full(fed.layout.numel, 3e38, dtype=np.float32).tobytes())
        assert "deploy.max_update_norm" in over
        assert a.upload(r2, a.valid()) == "accepted"
        assert b.task() == r2 and b.upload(r2, b.valid()) == "accepted"
        assert server.wait(60) == 0, server.text()[-3000:]
    finally:
        server.kill()
    records = h.metrics(state)
    assert "non-finite" in records[0]["update_refused"] and records[0]["num_clients"] == 0
    assert "update_refused" not in records[1] and records[1]["num_clients"] == 2
    assert sorted(records[0]["cohort"]) == [0, 1] and records[0]["rejected"] == []
    start = fed.params
    tensors = load_file(str(state / "model.safetensors"))
    final = torch.cat([tensors[name].flatten() for name in fed.layout.names])
    assert torch.allclose(final, start + 1e-3, atol=1e-6)  # round 1 refused, round 2 applied
    db = sqlite3.connect(state / "state.db")
    statuses = dict(db.execute("SELECT status, COUNT(*) FROM updates GROUP BY status").fetchall())
    assert statuses.get("late", 0) == 0
    kept = db.execute("SELECT COUNT(*), MAX(LENGTH(reason)) FROM updates WHERE client = 'client-0' "
                      "AND status = 'rejected'").fetchone()
    assert kept[0] <= REFUSALS_KEPT + 2 and kept[1] <= 300
    suppressed = db.execute("SELECT SUM(count) FROM refusals_suppressed WHERE client = 'client-0'").fetchone()[0]
    assert suppressed >= 60 - REFUSALS_KEPT
    assert (state / "state.db").stat().st_size < (1 << 20)
    assert len(server.text()) < 100_000 and "counted, not stored or logged" in server.text()


def test_a_client_that_cannot_reach_the_server_says_why(tmp_path, certs):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Nothing listens on `port` now.
    refused = run_koinon(tmp_path, "client", "--server", f"127.0.0.1:{port}", "--certs", str(certs), "--id",
                         "client-0", "--data", "partition:0", "--state", str(tmp_path / "cs"), "--give-up", "1")
    last = refused.stderr.strip().splitlines()[-1]
    assert refused.returncode == 1 and "giving up" in last and "connection refused" in last
    no_port = run_koinon(tmp_path, "client", "--server", "127.0.0.1", "--certs", str(certs), "--id", "client-0",
                         "--data", "partition:0")
    assert "expected HOST:PORT" in one_line_error(no_port)
