"""SecAgg+ over the deployment: `koinon server` and `koinon client` run the protocol of
`koinon.privacy.secagg` (the same client and server state machines, the same signed message
bytes) on the run's gRPC server, over its mutual-TLS connections.

A secure round: the round opens and its cohort polls and trains as usual; then, instead of
uploading its update, each client calls `SecureAggregation/Step` (a second gRPC service on the
same port, raw bytes in and out: nothing is parsed but the fixed layout below, nothing unpickled):

    request = MAGIC "KSD1" | round u32 | op u8 | body
    reply   = status u8 (0 ok, 1 refused) | body (refused: the reason, UTF-8)

    HELLO  body: train loss f64 | the client's Ed25519 protocol key (32 bytes), fresh per round |
           certificate length u32 | its client certificate (DER) | the binding signature (ECDSA
           P-256 / SHA-256, DER: the rest of the body)
           reply: session 32 | the server's Ed25519 key 32 | the clip bound f64 (central DP; 0: none)
    STEP   body: one protocol message (advertise, share keys, masked input, [check,] unmask)
           reply: the server's protocol message for the next step; after advertise followed by
           the directory of the client's neighbours (count u32, then per neighbour: id u32 |
           Ed25519 key 32 | certificate length u32 | certificate (DER) | signature length u32 |
           signature); after unmask an empty body once the server has unmasked.

Key binding. Each client signs, with the private key of its client certificate (ECDSA P-256, as
receipts are signed: `koinon.ledger.certsign`), the statement

    "koinon secagg key v1" 0x00 | round u32 | its client index u32 | its Ed25519 protocol key 32

and sends it with its certificate at HELLO. The server refuses a HELLO whose certificate is not
the one that authenticated the call (mutual TLS) or whose signature does not verify, and forwards
(certificate, signature) with every key in the neighbour directory. A client checks each
neighbour's entry before it shares anything: the certificate was issued by the run's CA (its
`ca.crt`), is a client certificate valid now (not the server's, which the same CA issued), is
neither the client's own nor one that another neighbour also shows, and its signature covers
that neighbour's index, this round and the key listed. Any failure aborts the client's round:
it has sent only its HELLO and its advertised public keys, so nothing of its update (not even a
share) leaves it. What this defends: a server without the CA's private key cannot put a key of
its own in place of a client's (nor pass its own certificate off as a client's), so it cannot
impersonate a neighbour, and the consistency check's signatures (`privacy.secagg_consistency`)
are the clients' own (the PKI Bell et al. assume). The session is not in the statement (the server picks it after HELLO);
freshness comes from the key, new every round, whose private half never leaves its client, and
every protocol message it signs names the session. What it does not defend: whoever holds the
CA's key can mint client certificates, so a server that also runs the CA can fill a cohort with
clients of its own (Sybils); operators should keep the CA (`ca.key`) away from the server. A
revoked client's certificate still verifies here (revocation is the server's list).

Each step is a barrier: a call blocks until every client still in the session has sent that
step's message, or the step's deadline passes (`privacy.secagg_step_timeout_s`; advertise waits
for the round's deadline, as training comes first); the server then runs its side of the step
and answers all at once. A client that is gone by then drops out exactly as in the simulation:
before its masked input its pairwise masks are removed from its neighbours' shares of its mask
key; after it, its input counts and its self-mask is removed from the survivors' shares of its
seed. A message that fails its checks (signature, session, step, sender) or repeats one already
received is refused, and its client is out of the session.

Personalized metrics (`data.client_test_fraction`, `koinon.deploy.personal`) are not reported
under SecAgg+: a client's (correct, total) counts would be plaintext metadata of one client
beside its masked update, and its personal accuracy tells the server how well a model fits that
client's data (the worst and 10th-percentile figures single out clients), which is what the
protocol keeps from the server; so a secure client does not score, and no EVALUATE task follows
the last round. The train loss in HELLO is the one per-client figure the server still sees (the
round's mean loss needs it). Summing the counts through the masked vector would give the
weighted mean only; it is not done.
"""

from __future__ import annotations

import datetime
import hashlib
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import torch
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from koinon.deploy.certs import Credentials
from koinon.ledger.certsign import (
    CertificateKey,
    issued_by,
    sign_receipt,
    verify_certificate_signature,
)
from koinon.privacy.secagg import ProtocolError, SecAggClient, SecAggServer, default_degree
from koinon.privacy.secagg.fixedpoint import NUM_EXTRAS
from koinon.privacy.secagg.messages import (
    ADVERTISE,
    CHECK,
    HEADER,
    MAGIC,
    MASKED,
    SHARES,
    STEP_NAMES,
    UNMASK,
    Reader,
    u32,
)
from koinon.privacy.secure import SecureAggregation, SecureSum

__all__ = ["SERVICE", "Binding", "SecureRounds", "secure_upload"]

SERVICE = "koinon.deploy.SecureAggregation"
METHOD = f"/{SERVICE}/Step"
REQUEST = struct.Struct("<4sIB")
REQUEST_MAGIC = b"KSD1"
HELLO, STEP = 0, 1
OK, REFUSED = 0, 1
HELLO_WAIT_S = 10.0  # a HELLO that comes before the server opened the round's session waits this long


KEY_STATEMENT = b"koinon secagg key v1\x00"
"""Names what the certificate key signs, so the signature cannot pass for anything else."""


def key_statement(round_index: int, client: int, key: bytes) -> bytes:
    """The bytes a client signs with its certificate key to bind its protocol key of a round."""
    return KEY_STATEMENT + struct.pack("<II", round_index, client) + key


@dataclass(frozen=True)
class Binding:
    """A client's Ed25519 protocol key of one round, its certificate (DER) and the certificate
    key's signature over `key_statement`."""

    key: bytes
    cert: bytes
    signature: bytes

    def pack(self) -> bytes:
        return self.key + u32(len(self.cert)) + self.cert + u32(len(self.signature)) + self.signature

    @staticmethod
    def read(r: Reader) -> Binding:
        return Binding(r.take(32), r.take(r.u32()), r.take(r.u32()))

    def check(self, round_index: int, client: int) -> str:
        """"" when the signature is the certificate key's over (round, client, key); else why not."""
        try:
            cert = CertificateKey.from_pem(_pem(self.cert))
        except ValueError as exc:
            return f"client {client}'s certificate is unusable: {exc}"
        if not verify_certificate_signature(cert.public_key, self.signature.hex(),
                                            key_statement(round_index, client, self.key)):
            return (f"client {client}'s protocol key is not signed by its certificate {cert.sha256[:16]}... "
                    f"for round {round_index + 1}")
        return ""


def _pem(der: bytes) -> bytes:
    return x509.load_der_x509_certificate(der).public_bytes(Encoding.PEM)


def _der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


def _client_certificate(der: bytes) -> str:
    """"" when the certificate is a client's, valid now; else why not. The server's own certificate
    comes from the same CA and its key is the server's: it must not pass for a client's."""
    cert = x509.load_der_x509_certificate(der)
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usage = x509.ExtendedKeyUsage([])
    if ExtendedKeyUsageOID.CLIENT_AUTH not in usage or ExtendedKeyUsageOID.SERVER_AUTH in usage:
        return f"the certificate of {cert.subject.rfc4514_string()} is not a client certificate"
    now = datetime.datetime.now(datetime.timezone.utc)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        return f"the certificate of {cert.subject.rfc4514_string()} is not valid now"
    return ""


def bind_key(creds: Credentials, round_index: int, client: int, key: bytes) -> Binding:
    """A client's binding of its protocol key, signed with its certificate's key."""
    return Binding(key, _der(creds.cert), sign_receipt(creds.key, key_statement(round_index, client, key)))


def check_directory(entries: dict[int, Binding], creds: Credentials, round_index: int, me: int) -> None:
    """A client's check of its neighbours' keys: each certificate issued by the run's CA, none the
    client's own or shown twice, each signature over (round, that neighbour, its key).
    `ProtocolError` (the client then aborts the round) otherwise."""
    seen = {hashlib.sha256(_der(creds.cert)).digest(): me}
    for v, binding in entries.items():
        if v == me:
            raise ProtocolError(f"the server lists this client ({me}) among its own neighbours")
        try:
            pem = _pem(binding.cert)
        except ValueError as exc:
            raise ProtocolError(f"neighbour {v}'s certificate is unreadable: {exc}") from None
        why = issued_by(pem.decode(), creds.ca) or _client_certificate(binding.cert)
        if why:
            raise ProtocolError(f"neighbour {v}: {why}")
        fingerprint = hashlib.sha256(binding.cert).digest()
        if fingerprint in seen:
            other = seen[fingerprint]
            raise ProtocolError(f"neighbour {v} shows the certificate of "
                                f"{'this client' if other == me else f'neighbour {other}'}")
        seen[fingerprint] = v
        why = binding.check(round_index, v)
        if why:
            raise ProtocolError(f"key binding: {why}")


def _refused(reason: str) -> bytes:
    return bytes([REFUSED]) + reason.encode()[:1000]


@dataclass
class _Session:
    """The server's side of one deployed round's protocol run."""

    round_index: int
    cohort: set[int]
    samples: dict[int, int]
    clip: float
    server: SecAggServer
    losses: dict[int, float] = field(default_factory=dict)  # HELLO: client -> train loss
    bindings: dict[int, Binding] = field(default_factory=dict)  # HELLO: client -> its signed key
    open_step: int = ADVERTISE  # the client message accepted now (-1: none)
    expected: set[int] = field(default_factory=set)
    inbox: dict[int, dict[int, bytes]] = field(default_factory=dict)
    outbox: dict[int, dict[int, bytes]] = field(default_factory=dict)
    up: dict[int, int] = field(default_factory=dict)
    down: dict[int, int] = field(default_factory=dict)
    finished: bool = False
    error: str = ""


class SecureRounds:
    """`koinon server`'s secure aggregation: serves `Step` calls and drives one session per round."""

    def __init__(self, secure: SecureAggregation, length: int, step_timeout_s: float,
                 log: Callable[[str], None]) -> None:
        self.secure = secure
        self.length = length + NUM_EXTRAS
        self.step_timeout_s = step_timeout_s
        self.log = log
        self.identity = Ed25519PrivateKey.generate()
        self.cond = threading.Condition()
        self.session: _Session | None = None

    @staticmethod
    def handler(step: Callable[[bytes, grpc.ServicerContext], bytes]) -> grpc.GenericRpcHandler:
        """The gRPC service; `step(request, context)` identifies the caller and calls `handle`."""
        return grpc.method_handlers_generic_handler(SERVICE, {"Step": grpc.unary_unary_rpc_method_handler(step)})

    def started(self, idx: int, round_index: int) -> bool:
        """Whether `idx` has joined the session of `round_index` (it trained: no new task)."""
        s = self.session
        return s is not None and s.round_index == round_index and idx in s.losses

    # ------------------------------------------------------------- calls

    def handle(self, data: bytes, idx: int, cert_pem: bytes | None) -> bytes:
        """One request of client `idx`, whose call was authenticated by the certificate `cert_pem`."""
        if len(data) < REQUEST.size:
            return _refused("truncated secure-aggregation request")
        magic, round_index, op = REQUEST.unpack_from(data)
        body = data[REQUEST.size:]
        if magic != REQUEST_MAGIC or op not in (HELLO, STEP):
            return _refused("not a secure-aggregation request")
        with self.cond:
            give_up = time.monotonic() + HELLO_WAIT_S
            while (self.session is None or self.session.round_index < round_index) and time.monotonic() < give_up:
                self.cond.wait(0.5)
            s = self.session
            if s is None or s.round_index != round_index or s.finished:
                return _refused(f"no secure session of round {round_index + 1} is open")
            if idx not in s.cohort:
                return _refused(f"client {idx} is not in round {round_index + 1}'s cohort")
            if op == HELLO:
                return self._hello(s, idx, body, len(data), cert_pem)
            return self._step(s, idx, body, len(data))

    def _hello(self, s: _Session, idx: int, body: bytes, size: int, cert_pem: bytes | None) -> bytes:
        if idx in s.losses:
            return _refused(f"client {idx} already joined round {s.round_index + 1}'s session")
        if s.open_step != ADVERTISE:
            return _refused("the session no longer takes clients")
        try:
            r = Reader(body, "hello")
            (loss,) = struct.unpack("<d", r.take(8))
            key, cert = r.take(32), r.take(r.u32())
            binding = Binding(key, cert, body[r.pos:])
        except ProtocolError:
            return _refused("malformed hello")
        if cert_pem is None:
            return _refused("no client certificate on this connection to bind the protocol key to")
        try:
            calling = _der(cert_pem)
        except ValueError:
            return _refused("the connection's client certificate is unreadable")
        if cert != calling:
            return _refused("the hello's certificate is not the one that authenticated this call")
        why = binding.check(s.round_index, idx)
        if why:
            return _refused(why)
        s.server.directory[idx] = Ed25519PublicKey.from_public_bytes(key)
        s.bindings[idx] = binding
        s.losses[idx] = float(loss)
        reply = (bytes([OK]) + s.server.session + self.identity.public_key().public_bytes_raw()
                 + struct.pack("<d", s.clip))
        s.up[idx] = s.up.get(idx, 0) + size
        s.down[idx] = s.down.get(idx, 0) + len(reply)
        self.cond.notify_all()
        return reply

    def _step(self, s: _Session, idx: int, body: bytes, size: int) -> bytes:
        if len(body) < HEADER.size or body[:4] != MAGIC:
            return _refused("not a SecAgg message")
        step = body[4]
        name = STEP_NAMES.get(step, str(step))
        if idx not in s.losses:
            return _refused(f"client {idx} sent {name} without joining the session")
        if idx in s.inbox.get(step, {}):
            return _refused(f"{name} of client {idx} already received (replayed or repeated)")
        if step != s.open_step:
            return _refused(f"{name} is not the step the session is at ({STEP_NAMES.get(s.open_step, 'closed')})")
        if idx not in s.expected:
            return _refused(f"client {idx} is no longer in the session "
                            f"({s.server.rejected.get(idx, 'it missed an earlier step')})")
        s.inbox.setdefault(step, {})[idx] = body
        s.up[idx] = s.up.get(idx, 0) + size
        self.cond.notify_all()
        # The driver answers every step within its deadline; the margin covers its own work.
        give_up = time.monotonic() + 2 * self.step_timeout_s + 60.0
        while step not in s.outbox and not s.finished and time.monotonic() < give_up:
            self.cond.wait(1.0)
        reply = s.outbox.get(step, {}).get(idx)
        if reply is None:
            return _refused(s.server.rejected.get(idx) or s.error or f"client {idx} dropped from the session")
        out = bytes([OK]) + reply
        s.down[idx] = s.down.get(idx, 0) + len(out)
        return out

    # ------------------------------------------------------------ driver

    def run_round(self, round_index: int, cohort: list[int], samples: dict[int, int], clip: float,
                  deadline: float) -> tuple[SecureSum, dict[int, float]]:
        """Run the round's session (main thread) until the sum is unmasked or the run fails;
        returns the secure sum and the clients' train losses. `deadline` bounds the first step."""
        secure = self.secure
        server = SecAggServer(self.identity, {}, _session_bytes(), secure.fp, secure.degree,
                              secure.threshold_fraction, self.length, consistency=secure.consistency)
        s = _Session(round_index, set(cohort), dict(samples), clip, server, expected=set(cohort))
        with self.cond:
            self.session = s
            self.cond.notify_all()
        steps: list[tuple[int, Callable[[dict[int, bytes]], Any]]] = [
            (ADVERTISE, server.receive_adverts), (SHARES, server.receive_shares), (MASKED, server.receive_masked)]
        if secure.consistency:
            steps.append((CHECK, server.receive_checks))
        steps.append((UNMASK, server.receive_unmask))
        total: np.ndarray | None = None
        server_s = unmask_s = 0.0
        for step, receive in steps:
            with self.cond:
                s.open_step = step
                self.cond.notify_all()
                while not set(s.inbox.get(step, {})) >= s.expected and time.monotonic() < deadline:
                    self.cond.wait(min(1.0, max(deadline - time.monotonic(), 0.01)))
                s.open_step = -1  # from here on this step's messages are late
                messages = dict(s.inbox.get(step, {}))
            if step == ADVERTISE:
                server.degree = secure.degree or default_degree(len(messages), max(0.1, secure.dropout))
            start = time.perf_counter()
            try:
                out = receive(messages)
            except ProtocolError as exc:
                s.error = str(exc)
                break
            finally:
                server_s += time.perf_counter() - start
            if step == UNMASK:
                total, unmask_s = out, time.perf_counter() - start
                out = {c: b"" for c in messages if c not in server.rejected}
            elif step == ADVERTISE:
                out = {u: u32(len(msg)) + msg + _directory(server, s.bindings, u) for u, msg in out.items()}
            with self.cond:
                s.outbox[step] = out
                s.expected = set(out)
                self.cond.notify_all()
            deadline = time.monotonic() + self.step_timeout_s
        with self.cond:
            s.finished = True
            self.cond.notify_all()
        metrics = {"secagg_survivors": float(len(server.survivors)), "secagg_dropped": float(len(server.dropped)),
                   "secagg_server_s": server_s, "secagg_unmask_s": unmask_s}
        rejected = dict(server.rejected)
        rejected.update({c: "joined no secure session (no update)" for c in cohort
                         if c not in s.losses and c not in rejected})
        if total is None:
            error = s.error or "the session ended early"
            self.log(f"round {round_index + 1}: secure aggregation failed: {error}")
            return SecureSum(list(server.survivors), None, 0, 0, clip, error, dict(s.up), dict(s.down), rejected,
                             metrics), dict(s.losses)
        values, weight, count = secure.fp.decode_sum(total, len(server.survivors))
        return SecureSum(list(server.survivors), values, weight, count, clip, "", dict(s.up), dict(s.down),
                         rejected, metrics), dict(s.losses)


def check_secure_deployable(cfg: Any) -> None:
    """Refuse what a deployed SecAgg+ run cannot do, with a one-line reason."""
    from koinon.errors import ConfigError

    if cfg.privacy.secagg_dropout > 0:
        raise ConfigError(f"privacy.secagg_dropout = {cfg.privacy.secagg_dropout:g} simulates dropouts; "
                          "deployed clients drop out for real: set it to 0 for koinon server")
    if cfg.deploy.max_update_norm > 0:
        raise ConfigError(f"deploy.max_update_norm = {cfg.deploy.max_update_norm:g} checks each update, which "
                          "secure aggregation hides (the server sees only the sum): set it to 0")


def _session_bytes() -> bytes:
    from koinon.privacy.secagg.protocol import new_session

    return new_session()


def _directory(server: SecAggServer, bindings: dict[int, Binding], u: int) -> bytes:
    """The protocol keys of `u`'s neighbours, each with its certificate and binding signature."""
    neighbours = server.graph.get(u, [])
    return u32(len(neighbours)) + b"".join(u32(v) + bindings[v].pack() for v in neighbours)


# ---------------------------------------------------------------- client


class SecureRefused(Exception):
    """The server refused a step (the reason), or answered with bytes that fail their checks."""


def secure_upload(channel: grpc.Channel, secure: SecureAggregation, creds: Credentials, idx: int,
                  round_index: int, update: torch.Tensor, num_samples: int, train_loss: float, timeout_s: float,
                  crash: Callable[[str, int], None] | None = None) -> dict[str, float]:
    """A client's side of one deployed round: join the session, run the protocol steps with the
    update `update` [P] (decoded from the payload it would have uploaded). Returns the bytes it
    sent and received and its protocol compute seconds; `SecureRefused` or `ProtocolError` when
    the session refused it or it aborted (nothing of its update is then revealed beyond the
    protocol). `creds`: the client's certificate and key (they sign its protocol key) and the run's
    CA (its neighbours' certificates must come from it). `crash(point, round)`: the fault tests'
    kill points."""
    call = channel.unary_unary(METHOD)
    up = down = 0
    spent = 0.0

    def ask(op: int, body: bytes) -> bytes:
        nonlocal up, down
        request = REQUEST.pack(REQUEST_MAGIC, round_index, op) + body
        up += len(request)
        reply = call(request, timeout=timeout_s)
        down += len(reply)
        if not reply or reply[0] != OK:
            raise SecureRefused(reply[1:].decode(errors="replace") if reply else "empty answer")
        return bytes(reply[1:])

    identity = Ed25519PrivateKey.generate()
    binding = bind_key(creds, round_index, idx, identity.public_key().public_bytes_raw())
    hello = ask(HELLO, struct.pack("<d", train_loss) + binding.key + u32(len(binding.cert)) + binding.cert
                + binding.signature)
    if len(hello) != 32 + 32 + 8:
        raise SecureRefused("malformed hello answer")
    session, server_key = hello[:32], Ed25519PublicKey.from_public_bytes(hello[32:64])
    (clip,) = struct.unpack_from("<d", hello, 64)
    start = time.perf_counter()
    encoded = secure.encode_input(idx, update, num_samples, round_index, clip)
    party = SecAggClient(idx, identity, server_key, {}, session, secure.fp, secure.threshold_fraction,
                         consistency=secure.consistency)
    advert = party.advertise()
    spent += time.perf_counter() - start
    answer = ask(STEP, advert)
    start = time.perf_counter()
    r = Reader(answer, "neighbours answer")
    neighbours = r.take(r.u32())
    entries: dict[int, Binding] = {}
    for _ in range(r.u32()):
        v = r.u32()
        if v in entries:
            raise ProtocolError(f"the directory lists neighbour {v} twice")
        entries[v] = Binding.read(r)
    r.end()
    check_directory(entries, creds, round_index, idx)  # before anything of this client's is shared
    for v, entry in entries.items():
        party.directory[v] = Ed25519PublicKey.from_public_bytes(entry.key)
    shares = party.share_keys(neighbours)
    spent += time.perf_counter() - start
    forwarded = ask(STEP, shares)
    start = time.perf_counter()
    masked = party.masked_input(forwarded, encoded)
    spent += time.perf_counter() - start
    survivors = ask(STEP, masked)
    if crash is not None:
        crash("client.secagg_masked", round_index)
    if secure.consistency:
        start = time.perf_counter()
        checked = party.check(survivors)
        spent += time.perf_counter() - start
        survivors = ask(STEP, checked)
    start = time.perf_counter()
    unmask = party.unmask(survivors)
    spent += time.perf_counter() - start
    ask(STEP, unmask)
    return {"uplink": float(up), "downlink": float(down), "compute_s": spent}


def client_round(channel: grpc.Channel, fed: Any, name: str, idx: int, round_index: int, uploads: list[bytes],
                 codec_states: Any, result: Any, num_samples: int, state: Any, timeout_s: float,
                 log: Callable[[str, str], None], creds: Credentials) -> bool:
    """`koinon client`'s secure round: the update it would have uploaded goes through SecAgg+;
    its states go on when the server has unmasked (as "accepted" does for a plain upload).
    A refusal or an abort is logged; the client polls on (the next round is a new session)."""
    from koinon.deploy.faults import crash_point

    start = time.perf_counter()
    update = fed.codec.decode(uploads[0])
    try:
        spent = secure_upload(channel, fed.server.privacy.secure, creds, idx, round_index, update, num_samples,
                              float(result.train_loss[0]), timeout_s, crash_point)
    except (SecureRefused, ProtocolError) as exc:
        log(name, f"round {round_index + 1}: secure aggregation without this client: {exc}")
        return False
    state.stage(round_index, codec_states, result.client_states[0])
    state.settle(round_index)
    log(name, f"round {round_index + 1}: update summed securely ({int(spent['uplink'])} bytes up, "
        f"{int(spent['downlink'])} down, {time.perf_counter() - start:.2f} s)")
    return True
