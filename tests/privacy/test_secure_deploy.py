"""SecAgg+ in the deployment: the server's session driver and the client's steps over the real
message bytes (in-process, through the same `handle` the gRPC service calls), then `koinon
server` and `koinon client` processes on 127.0.0.1: the deployed secure model is the simulated
one bit for bit, and a client killed after its masked input is unmasked from the survivors'
shares."""

from __future__ import annotations

import importlib.util
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from koinon.deploy.certs import Credentials, client_credentials, create_certs
from koinon.deploy.secure import Binding, SecureRefused, SecureRounds, bind_key, secure_upload
from koinon.privacy.secagg import FixedPoint
from koinon.privacy.secagg.messages import ADVERTISE, MASKED, SHARES, ProtocolError, Reader, u32
from koinon.privacy.secure import SecureAggregation

_spec = importlib.util.spec_from_file_location(
    "deploy_helpers", Path(__file__).resolve().parents[1] / "deploy" / "helpers.py")
assert _spec and _spec.loader
h = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(h)

P = 40
SERVER = -1  # CREDS[SERVER]: the server's certificate and key (the same CA's)


@pytest.fixture(scope="module")
def creds(tmp_path_factory) -> dict[int, Credentials]:
    """Client c's credentials from the run's CA (`client-c`), as mutual TLS would present them."""
    out = tmp_path_factory.mktemp("secure-certs")
    create_certs(out, 4, ["127.0.0.1"])
    creds = {c: client_credentials(out, f"client-{c}") for c in range(4)}
    creds[SERVER] = Credentials((out / "ca.crt").read_bytes(), (out / "server.crt").read_bytes(),
                                (out / "server.key").read_bytes())
    return creds


class Channel:
    """Stands for a client's gRPC channel: calls go to the server's `handle` as that client (with
    its certificate, as mutual TLS authenticates it), through `edit(request)` (tests: tamper,
    record) and `answer(request, reply)` (tests: a server that changes its replies)."""

    def __init__(self, rounds: SecureRounds, idx: int, cert: bytes, edit=None, answer=None) -> None:
        self.rounds, self.idx, self.cert, self.edit, self.answer = rounds, idx, cert, edit, answer

    def unary_unary(self, method: str):
        def call(request: bytes, timeout: float) -> bytes:
            reply = self.rounds.handle(self.edit(request) if self.edit else request, self.idx, self.cert)
            return self.answer(request, reply) if self.answer else reply
        return call


CREDS: dict[int, Credentials] = {}


@pytest.fixture(autouse=True)
def _creds(creds) -> None:
    CREDS.update(creds)


def session(rounds: SecureRounds, updates: dict[int, torch.Tensor], round_index: int = 0, edits=None,
            clients=None, answers=None, first_step_s: float = 30.0):
    """One round: the driver in this thread, each client in its own; (secure sum, client outcomes).
    `first_step_s`: the advertise step's deadline (a client refused at HELLO never advertises, so
    the driver waits it out)."""
    edits, answers = edits or {}, answers or {}
    outcome: dict[int, object] = {}

    def client(c: int) -> None:
        try:
            channel = Channel(rounds, c, CREDS[c].cert, edits.get(c), answers.get(c))
            outcome[c] = secure_upload(channel, rounds.secure, CREDS[c], c, round_index, updates[c], 10 + c,
                                       0.5, 30.0)
        except Exception as exc:  # noqa: BLE001 - the outcome is what the test checks
            outcome[c] = exc

    threads = [threading.Thread(target=client, args=(c,)) for c in (clients or updates)]
    for t in threads:
        t.start()
    import time

    secure, losses = rounds.run_round(round_index, sorted(updates), {c: 10 + c for c in updates}, 0.0,
                                      time.monotonic() + first_step_s)
    for t in threads:
        t.join(30)
    return secure, outcome


def setup(consistency: bool = False) -> tuple[SecureRounds, dict[int, torch.Tensor]]:
    secure = SecureAggregation(FixedPoint(32, 8.0, 1000, 4), consistency=consistency)
    rounds = SecureRounds(secure, P, step_timeout_s=2.0, log=lambda m: None)
    gen = torch.Generator().manual_seed(0)
    return rounds, {c: torch.randn(P, generator=gen) for c in range(4)}


def plain(rounds: SecureRounds, updates: dict[int, torch.Tensor], clients: list[int], round_index: int = 0):
    total = sum(rounds.secure.encode_input(c, updates[c], 10 + c, round_index).astype(np.uint64) for c in clients)
    return rounds.secure.fp.decode_sum((total & np.uint64(0xFFFFFFFF)).astype(np.uint32), len(clients))


@pytest.mark.parametrize("consistency", [False, True])
def test_deployed_steps_give_the_exact_sum(consistency: bool) -> None:
    rounds, updates = setup(consistency)
    secure, outcome = session(rounds, updates)
    assert secure.error == "" and secure.survivors == [0, 1, 2, 3]
    values, weight, _ = plain(rounds, updates, [0, 1, 2, 3])
    assert torch.equal(secure.total, values) and secure.weight == weight == 10 + 11 + 12 + 13
    assert all(isinstance(o, dict) for o in outcome.values())
    assert secure.uplink[0] == outcome[0]["uplink"]  # the server counts the bytes the client sent


def test_a_tampered_masked_input_is_refused_and_the_others_sum_exactly() -> None:
    rounds, updates = setup()

    def flip(request: bytes) -> bytes:
        if len(request) > 9 + 4 and request[9 + 4] == MASKED:  # after the 9-byte request header
            return request[:-70] + bytes([request[-70] ^ 1]) + request[-69:]
        return request

    secure, outcome = session(rounds, updates, edits={2: flip})
    assert "bad signature" in secure.rejected[2]
    assert isinstance(outcome[2], SecureRefused)
    assert secure.survivors == [0, 1, 3] and secure.error == ""
    assert torch.equal(secure.total, plain(rounds, updates, [0, 1, 3])[0])


def test_a_replayed_message_is_refused() -> None:
    rounds, updates = setup()
    recorded: list[bytes] = []
    session(rounds, updates, edits={1: lambda r: recorded.append(r) or r})
    advert = recorded[1]  # client 1's advertise message of round 1 (after its hello)
    replay = advert[:4] + (1).to_bytes(4, "little") + advert[8:]  # sent again, for round 2

    def replayed(request: bytes) -> bytes:
        return replay if request[8] == 1 and request[9 + 4] == 1 else request

    secure, outcome = session(rounds, updates, round_index=1, edits={1: replayed})
    # Refused: signed by the key client 1 used in round 1, not the one it joined round 2 with
    # (and of round 1's session, which the signature covers).
    assert "bad signature" in secure.rejected[1]
    assert secure.survivors == [0, 2, 3]
    assert torch.equal(secure.total, plain(rounds, updates, [0, 2, 3], round_index=1)[0])
    # A message repeated within its own step is refused at once.
    assert rounds.handle(recorded[1], 1, CREDS[1].cert)[0] == 1


def _directory_reply(reply: bytes) -> tuple[bytes, dict[int, Binding]]:
    """Splits the answer to an advertise into (status, message) and the neighbour directory."""
    r = Reader(reply[1:], "answer")
    message = r.take(r.u32())
    entries = {}
    for _ in range(r.u32()):
        v = r.u32()
        entries[v] = Binding.read(r)
    r.end()
    return reply[:1] + u32(len(message)) + message, entries


def _with_directory(head: bytes, entries: dict[int, Binding]) -> bytes:
    return head + u32(len(entries)) + b"".join(u32(v) + b.pack() for v, b in entries.items())


def _other_ca(tmp_path: Path) -> Credentials:
    """A CA of the server's own (not the run's), with a certificate named like a real client."""
    create_certs(tmp_path / "rogue", 2, ["127.0.0.1"])
    return client_credentials(tmp_path / "rogue", "client-1")


@pytest.mark.parametrize("forgery", ["substituted key", "another CA", "server certificate", "own certificate",
                                     "duplicated certificate"])
def test_a_server_that_forges_a_neighbours_key_is_detected_and_the_client_reveals_nothing(
        tmp_path, forgery: str) -> None:
    rounds, updates = setup(consistency=True)
    rogue = _other_ca(tmp_path) if forgery == "another CA" else None
    sent: list[bytes] = []

    def forge(request: bytes, reply: bytes) -> bytes:
        """Client 0's directory as a malicious server shows it: neighbour v's key is the server's."""
        if request[8] != 1 or request[9 + 4] != ADVERTISE or reply[0] != 0:
            return reply
        head, entries = _directory_reply(reply)
        v, w = sorted(entries)[:2]
        fake = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
        if forgery == "substituted key":  # v's certificate and signature, the server's key
            entries[v] = Binding(fake, entries[v].cert, entries[v].signature)
        elif forgery == "another CA":  # a certificate the server minted, a valid signature with it
            assert rogue is not None
            entries[v] = bind_key(rogue, 0, v, fake)
        elif forgery == "server certificate":  # signed with the server's own key, the run's CA's certificate
            entries[v] = bind_key(CREDS[SERVER], 0, v, fake)
        elif forgery == "own certificate":  # client 0's own binding shown as v's
            entries[v] = bind_key(CREDS[0], 0, v, fake)
        else:  # v's certificate (and key, signature) shown for w too
            entries[w] = entries[v]
        return _with_directory(head, entries)

    secure, outcome = session(rounds, updates, edits={0: lambda r: sent.append(r) or r}, answers={0: forge})
    assert isinstance(outcome[0], ProtocolError)
    reason = str(outcome[0])
    assert {"substituted key": "is not signed by its certificate", "another CA": "was not issued by the CA",
            "server certificate": "is not a client certificate",
            "own certificate": "shows the certificate of this client",
            "duplicated certificate": "shows the certificate of neighbour"}[forgery] in reason, reason
    # Client 0 sent its hello and its advertised public keys, nothing after: no share, no input.
    assert [r[9 + 4] for r in sent[1:]] == [ADVERTISE]
    assert all(r[9 + 4] not in (SHARES, MASKED) for r in sent[1:])
    # For the server it dropped before sharing: the others' sum comes out exactly.
    assert 0 not in secure.survivors and secure.error == ""
    assert torch.equal(secure.total, plain(rounds, updates, secure.survivors)[0])


def _hello_fields(request: bytes) -> tuple[bytes, bytes, bytes]:
    body = request[9:]
    r = Reader(body, "hello")
    loss, key, cert = r.take(8), r.take(32), r.take(r.u32())
    return loss, key, cert


@pytest.mark.parametrize("tamper", ["another client's certificate", "another round", "another CA"])
def test_the_server_refuses_a_hello_whose_key_is_not_bound_to_the_calling_certificate(
        tmp_path, tamper: str) -> None:
    rounds, updates = setup()
    rogue = _other_ca(tmp_path) if tamper == "another CA" else None

    def rebind(request: bytes) -> bytes:
        if request[8] != 0:  # only the hello
            return request
        loss, key, _ = _hello_fields(request)
        binding = {"another client's certificate": lambda: bind_key(CREDS[1], 0, 0, key),
                   "another round": lambda: bind_key(CREDS[0], 1, 0, key),
                   "another CA": lambda: bind_key(rogue, 0, 0, key)}[tamper]()
        return request[:9] + loss + key + u32(len(binding.cert)) + binding.cert + binding.signature

    secure, outcome = session(rounds, updates, edits={0: rebind}, first_step_s=8.0)
    assert isinstance(outcome[0], SecureRefused)
    expected = "is not signed by its certificate" if tamper == "another round" else "not the one that authenticated"
    assert expected in str(outcome[0]), outcome[0]
    assert secure.survivors == [1, 2, 3] and torch.equal(secure.total, plain(rounds, updates, [1, 2, 3])[0])


def _model(folder: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return torch.cat([t.flatten().double() for _, t in sorted(load_file(str(folder / "model.safetensors")).items())])


@pytest.mark.slow
def test_deployed_secure_model_is_the_simulated_one(tmp_path, certs) -> None:
    config = h.write_config(tmp_path / "fed.toml", server={"rounds": 2, "clients_per_round": 3},
                            privacy={"secagg": True, "secagg_consistency": True})
    state = h.run_deployment(tmp_path, config, certs, server_s=120)
    records = h.metrics(state)
    assert [r["secagg_survivors"] for r in records] == [3.0, 3.0]
    h.simulate(tmp_path, config, state)  # the same model_sha256
    plain_config = h.write_config(tmp_path / "plain.toml", server={"rounds": 2, "clients_per_round": 3})
    from koinon.experiment import load_config, run_experiment

    run_experiment(load_config(plain_config), tmp_path / "plain", progress=False)
    deployed, reference = _model(state), _model(tmp_path / "plain")
    assert not torch.equal(deployed, reference)  # fixed point rounds...
    assert float((deployed - reference).abs().max()) < 1e-3  # ... by little


@pytest.mark.slow
def test_a_client_killed_after_its_masked_input_is_unmasked_from_the_survivors(tmp_path) -> None:
    # Five clients: each has 4 neighbours and needs 3 shares (a majority), so one may die; with
    # three, a client's 2 neighbours must both answer.
    certs = tmp_path / "certs"
    create_certs(certs, 5, ["127.0.0.1", "localhost"])
    config = h.write_config(tmp_path / "fed.toml", server={"rounds": 1, "clients_per_round": 5},
                            data={"num_clients": 5}, privacy={"secagg": True, "secagg_step_timeout_s": 3.0})
    state = tmp_path / "state"
    server, address = h.start_server(tmp_path, config, certs, state)
    clients = [h.start_client(tmp_path, address, certs, f"client-{i}", f"partition:{i}",
                              env={"KOINON_CRASH_AT": "client.secagg_masked@0"} if i == 2 else None)
               for i in range(5)]
    assert server.wait(180) == 0, server.text()[-3000:]
    assert clients[2].wait(30) == 86
    for i, c in enumerate(clients):
        if i != 2:
            assert c.wait(30) == 0, c.text()[-3000:]
    record = h.metrics(state)[0]
    assert "update_refused" not in record and record["secagg_survivors"] == 5.0 and record["secagg_dropped"] == 0.0
    # Its input is in the sum, its self-mask removed with the four others' shares: exactly the
    # simulated round, where all five took part.
    h.simulate(tmp_path, config, state)
    assert "client-2" not in json.loads((state / "summary.json").read_text()).get("missing", [])


@pytest.mark.slow
def test_deployed_secure_aggregation_under_central_dp_is_the_simulated_run(tmp_path, certs) -> None:
    # The clip bound (adaptive here) goes to the clients with the session; they clip and send their
    # clipping bit through the protocol, the server noises the sum (seeded noise: comparable).
    config = h.write_config(tmp_path / "fed.toml", server={"rounds": 2, "clients_per_round": 3}, privacy={
        "secagg": True, "dp": "central", "noise_multiplier": 0.5, "noise_seed": 3, "target_quantile": 0.5,
        "clip_count_stddev": 1.0})
    state = h.run_deployment(tmp_path, config, certs, server_s=120)
    sim = h.simulate(tmp_path, config, state)
    assert [r["dp_epsilon"] for r in h.metrics(state)] == [r["dp_epsilon"] for r in sim]
