"""SecAgg+ secure aggregation: fixed-point encoding, Shamir sharing, signed binary messages,
the client and server state machines (`protocol.py`), and `run_protocol`, which runs one session
with every party in this process exchanging the real message bytes."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from koinon.privacy.secagg.fixedpoint import FixedPoint
from koinon.privacy.secagg.messages import ProtocolError
from koinon.privacy.secagg.protocol import SecAggClient, SecAggServer, harary_graph, new_session

__all__ = ["STEPS", "FixedPoint", "Identities", "ProtocolError", "SecAggClient", "SecAggServer",
           "SessionResult", "default_degree", "harary_graph", "run_protocol"]

STEPS = ("advertise", "share", "masked", "unmask")
"""The four client messages; a client that drops at a step sends neither it nor any later one.
With the consistency check a "check" message (the signed survivor list) comes before "unmask"."""


def default_degree(num_clients: int, dropout: float = 0.1, failure: float = 1e-4) -> int:
    """The larger of k = 2 ceil(3 log2 n) (O(log n), as Bell et al.) and the smallest even k for
    which, with a fraction `dropout` of the clients gone, some client keeping fewer than the
    majority threshold k/2 + 1 neighbours has probability <= `failure` (union bound over the n
    clients, binomial tails); capped at n - 1. Such a round cannot be unmasked and is refused
    (model unchanged): a liveness failure, not a privacy one. n = 1000: k = 60 up to 10%
    dropouts, 160 at 30%; at k = 60 a 30% dropout left a client one share short once in two runs."""
    if num_clients <= 2:
        return max(num_clients - 1, 0)
    k = 2 * math.ceil(3 * math.log2(num_clients))
    while k < num_clients - 1:
        t = k // 2 + 1
        keep = 1.0 - dropout
        short = sum(math.comb(k, i) * keep**i * dropout ** (k - i) for i in range(t))
        if num_clients * short <= failure:
            break
        k += 2
    return min(num_clients - 1, k)


class Identities:
    """Long-term Ed25519 identity keys (the PKI the protocol assumes): one per client, made on
    first use, and the server's."""

    def __init__(self) -> None:
        self.server = Ed25519PrivateKey.generate()
        self.clients: dict[int, Ed25519PrivateKey] = {}

    def of(self, client: int) -> Ed25519PrivateKey:
        if client not in self.clients:
            self.clients[client] = Ed25519PrivateKey.generate()
        return self.clients[client]


@dataclass
class SessionResult:
    total: np.ndarray | None  # the survivors' sum (words of Z_2^m); None when the run failed
    survivors: list[int]
    dropped: list[int]  # shared keys, then sent no masked input (their masks were removed)
    error: str  # why the run failed ("" when it did not)
    rejected: dict[int, str]  # client -> why the server refused one of its messages
    uplink: dict[int, int] = field(default_factory=dict)  # client -> bytes sent
    downlink: dict[int, int] = field(default_factory=dict)  # client -> bytes received
    client_s: dict[int, float] = field(default_factory=dict)  # client -> compute seconds
    server_s: float = 0.0  # server compute seconds (routing, checks, unmasking)
    unmask_s: float = 0.0  # of which the final unmasking


def run_protocol(inputs: dict[int, np.ndarray], fp: FixedPoint, *, degree: int = 0,
                 threshold_fraction: float = 0.5, drop: dict[str, set[int]] | None = None,
                 identities: Identities | None = None,
                 tamper: dict[tuple[str, int], bytes] | None = None,
                 transcript: list[tuple[str, int, bytes]] | None = None,
                 expected_dropout: float = 0.1, consistency: bool = False,
                 server_hook: Callable[[str, dict[int, bytes]], dict[int, bytes]] | None = None) -> SessionResult:
    """One SecAgg+ session over `inputs` (client -> encoded words). `drop[step]`: clients that
    go silent from that step on (`STEPS`); `tamper[(step, client)]`: bytes that replace the
    client's message of that step (tests); `expected_dropout` sizes the default degree
    (`default_degree`); `transcript` gets every client message as (step,
    client, bytes): what the server sees. Every message is real bytes through the parties'
    own checks; bytes and compute time are counted per party. `consistency`: the malicious-server
    consistency check (`protocol`); `server_hook(step, replies)` may replace what the server
    sends after a step (tests: an equivocating server)."""
    drop = drop or {}
    tamper = tamper or {}
    ids = identities or Identities()
    clients = sorted(inputs)
    length = len(next(iter(inputs.values()))) if inputs else 0
    session = new_session()
    directory = {c: ids.of(c).public_key() for c in clients}
    server_key = ids.server.public_key()
    party = {c: SecAggClient(c, ids.of(c), server_key, directory, session, fp, threshold_fraction,
                             consistency=consistency) for c in clients}
    server = SecAggServer(ids.server, directory, session, fp,
                          degree or default_degree(len(clients), expected_dropout),
                          threshold_fraction, length, consistency=consistency)
    up = dict.fromkeys(clients, 0)
    down = dict.fromkeys(clients, 0)
    spent = dict.fromkeys(clients, 0.0)
    gone: set[int] = set()
    server_s = 0.0
    out = SessionResult(None, [], [], "", server.rejected, up, down, spent)

    def client_step(step: str, replies: dict[int, bytes] | None, act) -> dict[int, bytes]:
        gone.update(drop.get(step, ()))
        sent = {}
        for c in clients:
            if c in gone or (replies is not None and c not in replies):
                continue
            if replies is not None:
                down[c] += len(replies[c])
            start = time.perf_counter()
            try:
                msg = act(party[c], None if replies is None else replies[c])
            except ProtocolError as exc:  # an honest client aborts on a bad message
                server.rejected.setdefault(c, f"client aborted: {exc}")
                gone.add(c)
                continue
            spent[c] += time.perf_counter() - start
            msg = tamper.get((step, c), msg)
            if transcript is not None:
                transcript.append((step, c, msg))
            up[c] += len(msg)
            sent[c] = msg
        return sent

    def serve(fn, msgs, step=""):
        nonlocal server_s
        start = time.perf_counter()
        result = fn(msgs)
        server_s += time.perf_counter() - start
        return server_hook(step, result) if server_hook is not None and step else result

    try:
        adverts = client_step("advertise", None, lambda p, _: p.advertise())
        neighbours = serve(server.receive_adverts, adverts, "advertise")
        shares = client_step("share", neighbours, lambda p, m: p.share_keys(m))
        forwarded = serve(server.receive_shares, shares, "share")
        masked = client_step("masked", forwarded, lambda p, m: p.masked_input(m, inputs[p.client_id]))
        survivors = serve(server.receive_masked, masked, "masked")
        if consistency:
            checks = client_step("check", survivors, lambda p, m: p.check(m))
            survivors = serve(server.receive_checks, checks, "check")
        unmasks = client_step("unmask", survivors, lambda p, m: p.unmask(m))
        start = time.perf_counter()
        out.total = serve(server.receive_unmask, unmasks)
        out.unmask_s = time.perf_counter() - start
    except ProtocolError as exc:
        out.error = str(exc)
    out.survivors, out.dropped, out.server_s = list(server.survivors), list(server.dropped), server_s
    return out
