"""Personalized metrics in a deployment (`koinon.deploy.personal`): each client scores its own
personalized model on its own held-out split and sends the counts with its next upload; the
server's records then carry the simulation's `personal_accuracy_*`, and bad counts are refused."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from koinon.deploy.personal import check_counts, drop_server_figures, summarize_counts
from koinon.personal.evaluate import summarize

_spec = importlib.util.spec_from_file_location(
    "deploy_helpers", Path(__file__).parents[1] / "deploy" / "helpers.py")
assert _spec and _spec.loader
h = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(h)

NAMES = ["personal_accuracy_mean", "personal_accuracy_weighted", "personal_accuracy_p10", "personal_accuracy_min"]


def test_summary_of_counts_is_the_simulations_summary_by_hand():
    # Three clients: 3/4, 1/2, 9/10 correct on their held-out splits.
    out = summarize_counts({2: (9, 10), 0: (3, 4), 1: (1, 2)})
    assert out["personal_accuracy_mean"] == pytest.approx((0.75 + 0.5 + 0.9) / 3)
    assert out["personal_accuracy_weighted"] == pytest.approx(13 / 16)
    assert out["personal_accuracy_p10"] == pytest.approx(0.5 + 0.2 * 0.25)  # numpy's linear percentile
    assert out["personal_accuracy_min"] == 0.5
    # Bit for bit the simulation's summary of the per-client float32 accuracies.
    acc = torch.tensor([3, 1, 9], dtype=torch.float32) / torch.tensor([4, 2, 10], dtype=torch.float32)
    assert out == summarize(acc, torch.tensor([4.0, 2.0, 10.0]), "personal_accuracy")
    assert summarize_counts({}) == {} and summarize_counts({0: (0, 0)}) == {}


@pytest.mark.parametrize("correct,total,expected,why", [
    (-1, 5, 5, "negative"), (2, -3, 5, "negative"), (6, 5, 5, "more correct"),
    (3, 4, 5, "has 5"), (1, 1, 0, "has 0"),
])
def test_bad_counts_are_refused_in_one_line(correct, total, expected, why):
    reason = check_counts(correct, total, expected)
    assert reason is not None and why in reason and "\n" not in reason


def test_good_counts_and_no_report_pass():
    assert check_counts(0, 0, 7) is None  # not evaluated this round
    assert check_counts(7, 7, 7) is None and check_counts(0, 7, 7) is None


def test_the_servers_own_figures_go():
    extra = {"personal_accuracy_mean": 0.1, "personal_accuracy_min": 0.0, "new_client_accuracy_mean": 0.5}
    drop_server_figures(extra)
    assert extra == {"new_client_accuracy_mean": 0.5}


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["fedrep", "finetune", "fedavg", "ifca", "fedcac", "pfedpg"])
def test_deployed_personal_metrics_equal_the_simulations(tmp_path, certs, algorithm):
    client = {"algorithm": algorithm, "momentum": 0.0}
    if algorithm == "fedrep":
        client["head_steps"] = 3
    if algorithm == "ifca":  # the cluster models are downloads, in the EVALUATE task too
        client["clusters"] = 2
    if algorithm in ("fedcac", "pfedpg"):  # per-client downloads, in the EVALUATE task too
        client["adapt_steps"] = 3
    config = h.write_config(tmp_path / "fed.toml", server={"rounds": 3, "clients_per_round": 3},
                            data={"client_test_fraction": 0.25}, client=client)
    state = h.run_deployment(tmp_path, config, certs, server_s=120)
    sim = h.simulate(tmp_path, config, state)
    deployed = h.metrics(state)
    assert len(deployed) == len(sim) == 3
    # Rounds 1 and 2: their figures came with the uploads of rounds 2 and 3; round 3's with the
    # reports to the EVALUATE task after the last round.
    for r in range(3):
        for name in NAMES:
            assert not math.isnan(sim[r][name])
            assert deployed[r][name] == sim[r][name], (r, name, deployed[r][name], sim[r][name])


@pytest.mark.slow
def test_deployed_fedbuff_personal_metrics_equal_the_simulations(tmp_path, certs):
    # A buffer of the whole cohort: each dispatch is a round's cohort and each step its close, so
    # every step's record carries the figures of the clients' reports on that model version.
    from koinon.experiment import load_config, run_experiment

    config = h.write_config(tmp_path / "fed.toml", server={"rounds": 3, "clients_per_round": 3},
                            data={"client_test_fraction": 0.25},
                            client={"algorithm": "fedrep", "head_steps": 3, "momentum": 0.0, "steps": 4},
                            schedule={"name": "fedbuff", "buffer": 3, "concurrency": 3})
    state = h.run_deployment(tmp_path, config, certs, server_s=120)
    cfg = load_config(config).with_overrides({"clock.speed": "constant"})
    reference = run_experiment(cfg, tmp_path / "sim", progress=False)
    assert h.metrics(state)[-1]["round"] == 3
    summary = json.loads((state / "summary.json").read_text())
    assert summary["model_sha256"] == reference["model_sha256"]
    sim, deployed = h.metrics(tmp_path / "sim"), h.metrics(state)
    for r in range(3):
        for name in NAMES:
            assert not math.isnan(sim[r][name])
            assert deployed[r][name] == sim[r][name], (r, name, deployed[r][name], sim[r][name])


@pytest.mark.slow
def test_a_live_server_refuses_bad_counts_with_the_reason(tmp_path, certs):
    import grpc

    from koinon.deploy import federation_pb2_grpc
    from koinon.deploy.certs import client_credentials
    from koinon.deploy.wire import pb, read_task, upload_messages
    from koinon.experiment import load_config
    from koinon.experiment.runner import build_federation

    config = h.write_config(tmp_path / "fed.toml", data={"num_clients": 2, "client_test_fraction": 0.25},
                            server={"rounds": 1, "clients_per_round": 2})
    fed = build_federation(load_config(config))
    payload = np.full(fed.layout.numel, 1e-3, dtype=np.float32).tobytes()
    server, address = h.start_server(tmp_path, config, certs, tmp_path / "state")
    try:
        def client(name, partition):
            c = client_credentials(certs, name)
            tls = grpc.ssl_channel_credentials(root_certificates=c.ca, private_key=c.key, certificate_chain=c.cert)
            stub = federation_pb2_grpc.FederationStub(grpc.secure_channel(address, tls))
            samples = len(fed.data.client_indices[partition])
            reply = stub.Join(pb.JoinRequest(data_spec=f"partition:{partition}", partition=partition,
                                             num_samples=samples), timeout=10)
            return stub, reply, samples

        def task(stub, reply, samples):
            for _ in range(20):
                header, _ = read_task(stub.Poll(pb.PollRequest(client_index=reply.client_index), timeout=30), 1 << 30)
                if header.status == pb.TaskHeader.TRAIN:
                    return stub, reply, samples, header.round
            raise AssertionError("never sampled")

        def upload(stub, reply, samples, rnd, correct, total):
            header = pb.UploadHeader(round=rnd, layout_hash=reply.layout_hash, codec="identity", streams=["delta"],
                                     sizes=[len(payload)], num_samples=samples, num_steps=1, train_loss=0.1,
                                     client_index=reply.client_index, personal_correct=correct,
                                     personal_total=total)
            answer = stub.Upload(upload_messages(header, [payload]), timeout=30)
            return "accepted" if answer.accepted else answer.reason

        a, b = client("client-0", 0), client("client-1", 1)
        a, b = task(*a), task(*b)
        held = len(fed.holdout[0])
        assert held > 0
        assert "negative" in upload(*a, -1, held)
        assert "more correct" in upload(*a, held + 1, held)
        assert f"has {held}" in upload(*a, 1, held - 1)
        assert upload(*a, 1, held) == "accepted"
        assert upload(*b, 0, 0) == "accepted"  # no report: nothing to check
        assert server.wait(60) == 0, server.text()[-3000:]
    finally:
        server.kill()


def test_counts_of_uploads_taken_back_after_a_restart_still_count(tmp_path):
    """Client 0 reports 0 / n and client 1 n / n for round 1; the server restarts between the two
    uploads; the record still summarizes both (mean 0.5, min 0)."""
    import time

    from koinon.config import Config
    from koinon.deploy.asynchronous import build_for_deployment
    from koinon.deploy.personal import split_size
    from koinon.deploy.server import FederationServer, Member, check_deployable, restore
    from koinon.deploy.store import Store
    from koinon.deploy.wire import pb, upload_messages

    cfg = Config.from_dict({"seed": 0, "data": {"name": "digits", "num_clients": 2, "client_test_fraction": 0.3},
                            "model": {"name": "mlp", "hidden": [8]}, "runtime": {"name": "inprocess"},
                            "client": {"steps": 1}, "deploy": {"round_timeout_s": 30},
                            "server": {"clients_per_round": 2, "rounds": 3, "eval_every": 1}})

    def start() -> FederationServer:
        topology, _ = build_for_deployment(cfg)
        fed = check_deployable(topology, cfg)
        store = Store(tmp_path)
        restore(fed, store)
        srv = FederationServer(cfg, fed, store, tmp_path)
        for i in range(2):
            name = f"c{i}"
            if name not in srv.members:
                srv.members[name] = Member(name, i, len(fed.data.client_indices[i]), f"partition:{i}")
                store.save_client(name, i, srv.members[name].num_samples, f"partition:{i}")
            srv.members[name].last_seen = time.monotonic()
        return srv

    def upload(srv: FederationServer, i: int, round_index: int) -> None:
        member, n = srv.members[f"c{i}"], split_size(srv.fed, i)
        data, _ = srv.fed.codec.encode(torch.full((srv.fed.layout.numel,), 1e-3), {}, torch.Generator())
        header = pb.UploadHeader(round=round_index, layout_hash=srv.layout_hash, codec=srv.fed.codec.name,
                                 streams=list(srv.streams), sizes=[len(data)], num_samples=member.num_samples,
                                 num_steps=1, train_loss=0.5, client_index=i,
                                 personal_correct=0 if i == 0 else n, personal_total=n)
        reply = srv._receive(upload_messages(header, [data]), member, [], [])
        member.uploading = False
        assert reply.accepted, reply.reason

    srv = start()
    srv._open(0, [0, 1])
    upload(srv, 0, 0)
    upload(srv, 1, 0)
    srv._wait()
    srv._close(time.perf_counter())
    srv._open(1, [0, 1])
    upload(srv, 0, 1)
    srv.store.close()  # the server dies: what it held in memory is gone
    srv = start()
    srv._open(1, [0, 1])  # client 0's upload comes back from the store, with its counts
    upload(srv, 1, 1)
    srv._wait()
    srv._close(time.perf_counter())
    record = srv.store.records()[0]
    assert record["personal_accuracy_mean"] == 0.5 and record["personal_accuracy_min"] == 0.0


def test_an_evaluate_task_without_the_model_is_refused_not_a_crash():
    """A malformed EVALUATE task (no streams, or not the model first) is a bad answer the client
    logs and reconnects after (`Rejected`), not an IndexError that ends the client process."""
    from types import SimpleNamespace

    from koinon.deploy.personal import report
    from koinon.deploy.wire import pb
    from koinon.wire import Rejected

    for streams, payloads in (([], []), (["centroids"], [bytes(4)])):
        with pytest.raises(Rejected, match="must bring the model first"):
            report(None, SimpleNamespace(fed=None), 0, pb.TaskHeader(streams=streams), payloads, None, "")
