"""A live server against bad actors: unknown, foreign and revoked credentials, and malicious uploads.

The adversary speaks raw gRPC with valid credentials, so it can send what `koinon client` never
would; every bad upload must be refused with its reason, logged, and leave the run going.
"""

import importlib.util
import json
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from koinon.deploy import federation_pb2_grpc
from koinon.deploy.certs import client_credentials, create_certs
from koinon.deploy.wire import CHUNK, pb, read_task, upload_messages
from koinon.experiment import load_config
from koinon.experiment.runner import build_federation

_spec = importlib.util.spec_from_file_location("deploy_helpers", Path(__file__).with_name("helpers.py"))
assert _spec and _spec.loader
h = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(h)

pytestmark = pytest.mark.slow


def stub_for(address: str, ca: bytes, cert: bytes | None, key: bytes | None):
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    channel = grpc.secure_channel(address, creds, options=[("grpc.max_send_message_length", 8 << 20)])
    return federation_pb2_grpc.FederationStub(channel), channel


class Adversary:
    """A registered client (partition `p`) that uploads whatever the test hands it."""

    def __init__(self, address, certs, name, partition, fed):
        c = client_credentials(certs, name)
        self.stub, self.channel = stub_for(address, c.ca, c.cert, c.key)
        self.fed = fed
        self.samples = len(fed.data.client_indices[partition])
        reply = self.stub.Join(pb.JoinRequest(data_spec=f"partition:{partition}", partition=partition,
                                              num_samples=self.samples), timeout=10)
        self.idx, self.layout_hash = reply.client_index, reply.layout_hash

    def task(self):
        for _ in range(20):
            header, payloads = read_task(self.stub.Poll(pb.PollRequest(client_index=self.idx), timeout=30),
                                         1 << 30)
            if header.status == pb.TaskHeader.TRAIN:
                return header.round
        raise AssertionError("never sampled")

    def upload(self, round_index, payload: bytes, *, size=None, layout_hash=None, data=None) -> str:
        header = pb.UploadHeader(
            round=round_index, layout_hash=layout_hash or self.layout_hash, codec="identity",
            streams=["delta"], sizes=[len(payload) if size is None else size], num_samples=self.samples,
            num_steps=1, train_loss=0.1, client_index=self.idx)
        messages = upload_messages(header, [payload]) if data is None else iter(data(header))
        reply = self.stub.Upload(messages, timeout=30)
        return "accepted" if reply.accepted else reply.reason

    def valid(self) -> bytes:
        return np.full(self.fed.layout.numel, 1e-3, dtype=np.float32).tobytes()


def test_bad_credentials_and_bad_uploads_are_refused_and_the_run_goes_on(tmp_path):
    certs = tmp_path / "certs"
    create_certs(certs, 4, ["127.0.0.1"])
    foreign = tmp_path / "foreign"
    create_certs(foreign, 1, ["127.0.0.1"])
    config = h.write_config(tmp_path / "fed.toml", data={"num_clients": 2},
                            server={"rounds": 2, "clients_per_round": 2})
    fed = build_federation(load_config(config))
    state = tmp_path / "state"
    server, address = h.start_server(tmp_path, config, certs, state)
    try:
        # Revoked: refused on its first call, and `koinon client` says so in one line.
        (certs / "revoked.txt").write_text("client-3\n")
        c = client_credentials(certs, "client-3")
        stub, _ = stub_for(address, c.ca, c.cert, c.key)
        with pytest.raises(grpc.RpcError) as err:
            stub.Join(pb.JoinRequest(partition=0, num_samples=1), timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "revoked" in err.value.details()
        cli = subprocess.run([*h.KOINON, "client", "--server", address, "--certs", str(certs), "--id",
                              "client-3", "--data", "partition:0", "--state", str(tmp_path / "cs")],
                             capture_output=True, text=True, timeout=60, env=h.ENV)
        assert cli.returncode == 2 and cli.stderr.strip().splitlines()[-1].startswith("koinon: error:")
        assert "revoked" in cli.stderr
        # A certificate from another CA, and no certificate: the TLS handshake fails.
        f = client_credentials(foreign, "client-0")
        for cert, key in ((f.cert, f.key), (None, None)):
            stub, _ = stub_for(address, c.ca, cert, key)
            with pytest.raises(grpc.RpcError) as err:
                stub.Join(pb.JoinRequest(partition=0, num_samples=1), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE

        a = Adversary(address, certs, "client-0", 0, fed)
        b = Adversary(address, certs, "client-1", 1, fed)
        r = a.task()
        numel = fed.layout.numel
        nan = np.zeros(numel, dtype=np.float32)
        nan[7] = np.nan
        with pytest.raises(grpc.RpcError) as err:  # one message far over gRPC's own ceiling
            a.upload(r, b"", size=8, data=lambda hd: [
                pb.UploadChunk(header=hd), pb.UploadChunk(data=b"y" * (3 * CHUNK))])
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        reasons = {
            "garbage": a.upload(r, b"\x00garbage\xff" * 10),
            "nan": a.upload(r, nan.tobytes()),
            "shape": a.upload(r, np.zeros(numel - 3, dtype=np.float32).tobytes()),
            "huge_declared": a.upload(r, b"", size=10**12),
            "more_than_declared": a.upload(r, b"", size=8, data=lambda hd: [
                pb.UploadChunk(header=hd), pb.UploadChunk(data=b"x" * 64)]),
            "wrong_round": a.upload(r + 5, a.valid()),
            "wrong_layout": a.upload(r, a.valid(), layout_hash="0123456789abcdef"),
            "valid": a.upload(r, a.valid()),
            "duplicate": a.upload(r, a.valid()),
        }
        assert "undecodable" in reasons["garbage"]
        assert "NaN" in reasons["nan"]
        assert "expected exactly" in reasons["shape"]
        assert "oversized" in reasons["huge_declared"] and "oversized" in reasons["more_than_declared"]
        assert "not open" in reasons["wrong_round"]
        assert "layout hash" in reasons["wrong_layout"]
        assert reasons["valid"] == "accepted"
        assert "duplicate" in reasons["duplicate"]
        # Stalled uploads (a stream that never sends its header) hold no receive slot, one
        # client may keep only two open, and an honest upload still goes through at once.
        release = threading.Event()

        def stalled():
            release.wait(60)
            return
            yield

        try:
            pending = [a.stub.Upload.future(stalled(), timeout=60) for _ in range(2)]
            time.sleep(0.5)
            with pytest.raises(grpc.RpcError) as err:
                a.stub.Upload(stalled(), timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert b.task() == r
            started = time.monotonic()
            assert b.upload(r, b.valid()) == "accepted" and time.monotonic() - started < 5
        finally:
            release.set()
        assert all("header" in f.result(timeout=30).reason for f in pending)
        # The run goes on: round 2 with two valid updates, then the server finishes.
        r2 = a.task()
        assert r2 == r + 1 and a.upload(r2, a.valid()) == "accepted"
        assert b.task() == r2 and b.upload(r2, b.valid()) == "accepted"
        assert server.wait(60) == 0, server.text()[-3000:]
    finally:
        server.kill()
    log = server.text()
    assert "rejected update from client-0: undecodable" in log and "holds NaN or Inf" in log
    db = sqlite3.connect(state / "state.db")
    statuses = dict(db.execute("SELECT status, COUNT(*) FROM updates GROUP BY status").fetchall())
    # (+1 if gRPC let the handler see the cut stream); the wrong-round upload is rejected, not late
    assert statuses["accepted"] == 4 and statuses["rejected"] in (10, 11) and "late" not in statuses
    record = h.metrics(state)[0]
    assert record["num_clients"] == 2 and "0" in record["rejected_reasons"]
    # Only the two valid updates of each round moved the model: FedAvg of constant 1e-3 deltas.
    start = fed.params
    tensors = load_file(str(state / "model.safetensors"))
    final = torch.cat([tensors[name].flatten() for name in fed.layout.names])
    assert torch.allclose(final, start + 2e-3, atol=1e-6)
    assert json.loads((state / "summary.json").read_text())["rounds"] == 2
