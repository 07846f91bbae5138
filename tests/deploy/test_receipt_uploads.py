"""A live `koinon server` with a [ledger] refuses uploads whose receipt is not signed with the
caller's certificate key, records why, and logs the signed ones."""

import hashlib
import importlib.util
import sqlite3
from pathlib import Path

import grpc
import numpy as np
import pytest

from koinon.deploy import federation_pb2_grpc
from koinon.deploy.certs import client_credentials, create_certs
from koinon.deploy.wire import pb, read_task, upload_messages
from koinon.experiment import load_config
from koinon.experiment.runner import build_federation
from koinon.ledger.certsign import receipt_statement, sign_receipt
from koinon.ledger.verify import verify_run
from koinon.topology.server import digest

_spec = importlib.util.spec_from_file_location("deploy_helpers", Path(__file__).with_name("helpers.py"))
assert _spec and _spec.loader
h = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(h)

pytestmark = pytest.mark.slow


def test_uploads_without_a_valid_certificate_signature_are_rejected_with_the_reason(tmp_path):
    certs = tmp_path / "certs"
    create_certs(certs, 2, ["127.0.0.1"])
    config = h.write_config(tmp_path / "fed.toml", data={"num_clients": 2},
                            server={"rounds": 1, "clients_per_round": 2}, ledger={"contribution": "loo"})
    fed = build_federation(load_config(config))
    model = hashlib.sha256(fed.params.detach().contiguous().numpy().tobytes()).hexdigest()
    payload = np.full(fed.layout.numel, 1e-3, dtype=np.float32).tobytes()
    state = tmp_path / "state"
    server, address = h.start_server(tmp_path, config, certs, state)
    try:
        def client(name, partition):
            c = client_credentials(certs, name)
            tls = grpc.ssl_channel_credentials(root_certificates=c.ca, private_key=c.key, certificate_chain=c.cert)
            stub = federation_pb2_grpc.FederationStub(grpc.secure_channel(address, tls))
            samples = len(fed.data.client_indices[partition])
            reply = stub.Join(pb.JoinRequest(data_spec=f"partition:{partition}", partition=partition,
                                             num_samples=samples), timeout=10)
            return stub, reply, samples

        def upload(stub, reply, samples, rnd, signing_key):
            header = pb.UploadHeader(round=rnd, layout_hash=reply.layout_hash, codec="identity", streams=["delta"],
                                     sizes=[len(payload)], num_samples=samples, num_steps=1, train_loss=0.1,
                                     client_index=reply.client_index, model_sha256=model)
            if signing_key is not None:
                header.receipt_signature = sign_receipt(signing_key, receipt_statement(
                    rnd + 1, model, digest([payload]), samples))
            answer = stub.Upload(upload_messages(header, [payload]), timeout=30)
            return "accepted" if answer.accepted else answer.reason

        def task(stub, reply):
            for _ in range(20):
                header, _ = read_task(stub.Poll(pb.PollRequest(client_index=reply.client_index), timeout=30), 1 << 30)
                if header.status == pb.TaskHeader.TRAIN:
                    return header.round
            raise AssertionError("never sampled")

        a, b = client("client-0", 0), client("client-1", 1)
        key_a, key_b = client_credentials(certs, "client-0").key, client_credentials(certs, "client-1").key
        r = task(a[0], a[1])
        assert "no receipt signature" in upload(*a, r, None)
        assert "bad receipt signature" in upload(*a, r, key_b)  # signed with another client's key
        assert upload(*a, r, key_a) == "accepted"
        assert task(b[0], b[1]) == r and upload(*b, r, key_b) == "accepted"
        assert server.wait(60) == 0, server.text()[-3000:]
    finally:
        server.kill()
    reasons = [x for (x,) in sqlite3.connect(state / "state.db").execute(
        "SELECT reason FROM updates WHERE status = 'rejected'").fetchall()]
    assert any("no receipt signature" in x for x in reasons) and any("bad receipt signature" in x for x in reasons)
    report = verify_run(state, ca=(certs / "ca.crt").read_bytes())
    assert report.ok, report.failure
