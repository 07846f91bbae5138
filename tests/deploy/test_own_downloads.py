"""Per-client downloads in `koinon server` (`TaskHeader.own`): a task carries, after the model and
the downloads, what the algorithm's `downlink_for` makes for that client alone (FedCAC's
customized model), encoded as the simulation encodes it and counted in the round's bytes; no
client receives another's. The EVALUATE task after the last round carries them in float32."""

import time

import pytest
import torch

from koinon.config import Config
from koinon.deploy.asynchronous import build_for_deployment
from koinon.deploy.personal import evaluation_task, split_own
from koinon.deploy.server import FederationServer, Member, check_deployable
from koinon.deploy.store import Store
from koinon.personal import personal_payloads
from koinon.wire import MODEL, Rejected


def server(tmp_path, clients: int = 3) -> FederationServer:
    cfg = Config.from_dict({"seed": 3, "data": {"name": "digits", "num_clients": clients, "client_test_fraction": 0.25},
                            "model": {"name": "mlp", "hidden": [8]}, "runtime": {"name": "inprocess"},
                            "client": {"algorithm": "fedcac", "steps": 1}, "deploy": {"round_timeout_s": 30},
                            "server": {"clients_per_round": clients, "rounds": 2}})
    topology, _ = build_for_deployment(cfg)
    fed = check_deployable(topology, cfg)
    srv = FederationServer(cfg, fed, Store(tmp_path), tmp_path)
    for i in range(clients):
        srv.members[f"c{i}"] = Member(f"c{i}", i, len(fed.data.client_indices[i]), f"partition:{i}",
                                      last_seen=time.monotonic())
    # Each client's customized model, as FedCAC's server keeps them after a round (distinct values).
    p = fed.layout.numel
    for i in range(clients):
        fed.server.server_state[f"customized_{i}"] = torch.full((p,), float(i + 1)) + torch.arange(p) * 1e-3
    return srv


def test_each_task_carries_its_clients_own_download_alone_and_counts_it(tmp_path):
    srv = server(tmp_path)
    fed = srv.fed
    srv._open(0, [0, 1, 2])
    rnd = srv.server.open
    before = rnd.downlink_bytes
    sent = 0
    for i in range(3):
        header, payloads = srv._task_for(srv.members[f"c{i}"], -1)
        assert header.own == 1 and list(header.streams) == [MODEL, "customized"]
        own = payloads[-1]
        # The simulation's bytes for this client (same codec, seed, round, stream), and its values.
        assert own == personal_payloads(fed.algorithm, fed.server.server_state, i, fed.downlink, fed.seed, 0)[0][1]
        assert torch.equal(fed.downlink.decode(own), fed.server.server_state[f"customized_{i}"])
        for j in range(3):  # no other client's model is in this task
            if j != i:
                other = fed.server.server_state[f"customized_{j}"]
                assert all(not torch.equal(fed.downlink.decode(q), other) for q in payloads)
        sent += sum(len(q) for q in payloads)
    assert rnd.downlink_bytes - before == sent  # the model and the own download, per client
    assert sent == 3 * 2 * 4 * fed.layout.numel


def test_the_evaluate_task_carries_the_clients_own_model_in_float32(tmp_path):
    srv = server(tmp_path)
    srv.evaluating, srv.eval_clients = 2, {0, 1, 2}
    header, payloads = evaluation_task(srv, srv.members["c1"])
    assert header.own == 1 and list(header.streams) == ["model", "customized"] and header.codec == "float32"
    own = torch.frombuffer(bytearray(payloads[-1]), dtype=torch.float32)
    assert torch.equal(own, srv.fed.server.server_state["customized_1"])
    assert torch.equal(torch.frombuffer(bytearray(payloads[0]), dtype=torch.float32), srv.fed.params.float())


def test_a_task_that_claims_more_own_streams_than_it_has_is_a_bad_answer():
    named = [("cluster_0", 0), ("customized", 1)]
    assert split_own(named, 1) == ({"cluster_0": 0}, {"customized": 1})
    assert split_own(named, 0) == ({"cluster_0": 0, "customized": 1}, {})
    for bad in (-1, 3):
        with pytest.raises(Rejected, match="streams of this client's own"):
            split_own(named, bad)


class _Abort(Exception):
    pass


class _Context:
    def abort(self, code, details):
        raise _Abort(code, details)


def test_a_client_that_does_not_read_own_downloads_is_refused_at_join(tmp_path):
    """A client from before `TaskHeader.own` would take its own stream for a shared download and
    train another model: it is refused at Join with the reason; a current client joins."""
    import grpc

    from koinon.deploy.wire import PROTOCOL, pb

    srv = server(tmp_path)
    n = len(srv.fed.data.client_indices[0])
    old = pb.JoinRequest(data_spec="partition:0", partition=0, num_samples=n)  # protocol 0
    with pytest.raises(_Abort, match="sends each client its own download .* protocol 0: update koinon") as err:
        srv._join(old, _Context(), "c0")
    assert err.value.args[0] == grpc.StatusCode.FAILED_PRECONDITION
    reply = srv._join(pb.JoinRequest(data_spec="partition:0", partition=0, num_samples=n, protocol=PROTOCOL),
                      _Context(), "c0")
    assert reply.client_index == 0
