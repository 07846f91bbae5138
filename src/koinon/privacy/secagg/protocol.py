"""SecAgg+ (Bell et al. 2020, https://arxiv.org/abs/2005.11296): the server learns the sum of
the survivors' inputs and nothing else, at a cost polylogarithmic in the cohort.

The semi-honest protocol of Bonawitz et al. 2017 (https://eprint.iacr.org/2017/281) run over a
sparse random graph: the server places the clients that advertised keys on a randomly permuted
ring and links each to its k/2 nearest on either side (a random Harary graph, Bell et al.'s
choice); a client exchanges masks and secret shares with its k neighbours only.

0. `advertise`: a client sends two fresh X25519 public keys (c: share transport, s: masks),
   signed with its long-term Ed25519 identity (the server and the clients know each other's
   identity keys: a PKI, in a deployment the client certificates).
1. `share_keys`: given its neighbours' signed keys (each signature checked), a client picks a
   self-mask seed b_u, splits b_u and its mask private key s_u t-of-k (Shamir over GF(2^521-1)),
   and encrypts each neighbour's pair of shares with AES-256-GCM under HKDF(X25519(c_u, c_v)),
   the session, sender and recipient bound as associated data. The server only routes them.
2. `masked_input`: y_u = x_u + PRG(b_u) + sum over neighbours v that shared of
   +-PRG(HKDF(X25519(s_u, s_v))) modulo 2^m (+ when u < v, - otherwise, so pairs cancel).
   PRG = AES-256-CTR key stream read as m-bit words: a cryptographic stream, 256-bit seeds.
3. `unmask`: the server says which neighbours survived (sent y) and which dropped (shared, no
   y). A client reveals its share of b_v for every survivor v and of s_v for every dropped v,
   and refuses a list that names one neighbour in both (it answers once per session): so the
   self-mask seed and the mask key of one client are never both revealed by honest clients.
   The server reconstructs, removes the self masks of the survivors and the dropped clients'
   pairwise masks, and holds sum over survivors of x_u.

Every message is signed by its sender and carries the session (fresh per run), the step, the
sender and the recipient (`messages.py`): a tampered, forged, replayed or misrouted message is
refused.

Consistency check (`consistency = True`; Bonawitz et al.'s fifth round, against a server that
shows clients different views): the survivors message also carries the whole survivor list U;
each client signs (session, U) with its identity key and sends the signature (`check`); the
server forwards to each client its surviving neighbours' signatures, and a client reveals shares
(`unmask`) only when at least its threshold of them verify over the U it was shown. A server that
tells one client a neighbour dropped and another that it survived is caught: the signatures do
not verify, and the honest clients abort before revealing anything. (With the majority threshold
t > k/2 honest clients can never give a server both secrets of one client, check or not; the
check turns an equivocation into a detected abort.)
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from koinon.privacy.secagg import shamir
from koinon.privacy.secagg.fixedpoint import FixedPoint
from koinon.privacy.secagg.messages import (
    ADVERTISE,
    CHECK,
    CHECKS,
    MASKED,
    NEIGHBOURS,
    SERVER,
    SHARES,
    SHARES_FOR,
    SURVIVORS,
    UNMASK,
    ProtocolError,
    Reader,
    header,
    open_message,
    seal,
    u32,
)

__all__ = ["SecAggClient", "SecAggServer", "expand_mask", "harary_graph", "threshold_for"]

KEY_BYTES = 32
ADVERT_ENTRY = 4 + 32 + 32 + 64  # id, c public key, s public key, the advert's signature
SELF_MASK, MASK_KEY = 0, 1


def threshold_for(num_neighbours: int, fraction: float) -> int:
    """Shamir threshold t = floor(fraction * k) + 1 (at most k)."""
    return min(num_neighbours, int(fraction * num_neighbours) + 1)


def harary_graph(clients: list[int], degree: int) -> dict[int, list[int]]:
    """Neighbours of each client on a randomly permuted ring, k/2 on each side (k rounded up to
    even; the complete graph when k >= n - 1). The permutation uses the system's secure source."""
    n = len(clients)
    order = list(clients)
    for i in range(n - 1, 0, -1):  # Fisher-Yates with secrets.randbelow
        j = secrets.randbelow(i + 1)
        order[i], order[j] = order[j], order[i]
    if degree >= n - 1:
        return {c: sorted(set(clients) - {c}) for c in clients}
    half = (degree + 1) // 2
    out = {}
    for pos, c in enumerate(order):
        out[c] = sorted({order[(pos + d) % n] for d in range(-half, half + 1) if d} - {c})
    return out


def _kdf(secret: bytes, session: bytes, label: bytes, a: int, b: int) -> bytes:
    lo, hi = min(a, b), max(a, b)
    return HKDF(hashes.SHA256(), KEY_BYTES, salt=session, info=label + u32(lo) + u32(hi)).derive(secret)


def expand_mask(seed: bytes, length: int, fp: FixedPoint) -> np.ndarray:
    """`length` words of Z_(2^m) from the AES-256-CTR key stream of `seed` (32 bytes)."""
    stream = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    return np.frombuffer(stream.update(bytes(length * fp.word_bytes)), dtype=fp.dtype)


def _nonce(sender: int, recipient: int) -> bytes:
    return u32(sender) + u32(recipient) + bytes(4)  # unique per direction; keys are per session


@dataclass
class SecAggClient:
    """One client's side of one protocol run (a session)."""

    client_id: int
    identity: Ed25519PrivateKey
    server_key: Ed25519PublicKey
    directory: dict[int, Ed25519PublicKey]  # the identity keys of the other clients
    session: bytes
    fp: FixedPoint
    threshold_fraction: float
    c_key: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    s_key: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    self_seed: bytes = field(default_factory=lambda: os.urandom(KEY_BYTES))
    neighbours: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # v -> (c_pk, s_pk)
    threshold: int = 0
    held: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # u -> (share of s_u, share of b_u)
    # new -> advertised -> shared -> masked -> unmasked, each step once and in order: a second
    # share_keys would re-encrypt under the same AES-GCM key and nonce. A step that fails midway
    # leaves the client aborted (unmask's checks come before anything is revealed: it may retry).
    state: str = "new"
    consistency: bool = False  # the malicious-server consistency check (module docstring)
    survivor_list: list[int] = field(default_factory=list)  # consistency: the U this client signed
    views: tuple[list[int], list[int]] = field(default_factory=lambda: ([], []))  # surviving, dropped neighbours

    def _enter(self, expected: str, step: str) -> None:
        if self.state != expected:
            raise ProtocolError(f"client {self.client_id}: {step} out of order or twice in one session "
                                f"(state {self.state}, needs {expected})")

    def _seal(self, step: int, body: bytes) -> bytes:
        return seal(self.identity, step, self.session, self.client_id, SERVER, body)

    def _open(self, data: bytes, step: int) -> Reader:
        msg = open_message(data, self.server_key, step=step, session=self.session, sender=SERVER,
                           recipient=self.client_id)
        return Reader(msg.body, f"step {step} message to client {self.client_id}")

    def advertise(self) -> bytes:
        self._enter("new", "advertise")
        self.state = "advertised"
        return self._seal(ADVERTISE, self.c_key.public_key().public_bytes_raw()
                          + self.s_key.public_key().public_bytes_raw())

    def share_keys(self, data: bytes) -> bytes:
        """Check the neighbours' signed keys; send each its encrypted shares of b_u and s_u."""
        self._enter("advertised", "share_keys")
        self.state = "aborted"  # until this step succeeds
        r = self._open(data, NEIGHBOURS)
        count = r.u32()
        for _ in range(count):
            v = r.u32()
            c_pk, s_pk, signature = r.take(32), r.take(32), r.take(64)
            identity = self.directory.get(v)
            if identity is None or v == self.client_id:
                raise ProtocolError(f"client {self.client_id}: neighbour {v} is not a known client")
            advert = seal_header_body(ADVERTISE, self.session, v, c_pk + s_pk)
            try:
                identity.verify(signature, advert)
            except InvalidSignature:
                raise ProtocolError(f"client {self.client_id}: neighbour {v}'s keys are not signed by "
                                    "it (tampered)") from None
            self.neighbours[v] = (c_pk, s_pk)
        r.end()
        self.threshold = threshold_for(len(self.neighbours), self.threshold_fraction)
        if len(self.neighbours) < max(self.threshold, 1):
            raise ProtocolError(f"client {self.client_id}: {len(self.neighbours)} neighbours, fewer than "
                                f"the threshold {self.threshold}")
        xs = [v + 1 for v in self.neighbours]
        key_shares = shamir.split(self.s_key.private_bytes_raw(), self.threshold, xs)
        seed_shares = shamir.split(self.self_seed, self.threshold, xs)
        body = [u32(len(self.neighbours))]
        for v, (c_pk, _) in self.neighbours.items():
            key = _kdf(self.c_key.exchange(X25519PublicKey.from_public_bytes(c_pk)), self.session,
                       b"koinon secagg shares", self.client_id, v)
            ct = AESGCM(key).encrypt(_nonce(self.client_id, v), key_shares[v + 1] + seed_shares[v + 1],
                                     self.session + u32(self.client_id) + u32(v))
            body += [u32(v), u32(len(ct)), ct]
        self.state = "shared"
        return self._seal(SHARES, b"".join(body))

    def masked_input(self, data: bytes, encoded: np.ndarray) -> bytes:
        """Decrypt the shares the neighbours sent; send the masked encoded input."""
        self._enter("shared", "masked_input")
        self.state = "aborted"  # until this step succeeds
        r = self._open(data, SHARES_FOR)
        count = r.u32()
        for _ in range(count):
            u = r.u32()
            ct = r.take(r.u32())
            if u not in self.neighbours or u in self.held:
                raise ProtocolError(f"client {self.client_id}: shares from {u}, not a neighbour or twice")
            key = _kdf(self.c_key.exchange(X25519PublicKey.from_public_bytes(self.neighbours[u][0])),
                       self.session, b"koinon secagg shares", u, self.client_id)
            try:
                pt = AESGCM(key).decrypt(_nonce(u, self.client_id), ct,
                                         self.session + u32(u) + u32(self.client_id))
            except InvalidTag:
                raise ProtocolError(f"client {self.client_id}: shares from {u} fail authentication "
                                    "(tampered or replayed)") from None
            if len(pt) != 2 * shamir.SHARE_BYTES:
                raise ProtocolError(f"client {self.client_id}: shares from {u} have the wrong length")
            self.held[u] = (pt[:shamir.SHARE_BYTES], pt[shamir.SHARE_BYTES:])
        r.end()
        if len(self.held) < self.threshold:
            raise ProtocolError(f"client {self.client_id}: {len(self.held)} neighbours shared keys, "
                                f"fewer than the threshold {self.threshold}")
        y = encoded.astype(self.fp.dtype, copy=True)
        y += expand_mask(self.self_seed, len(y), self.fp)
        for v in self.held:  # the neighbours that shared keys in this session
            seed = _kdf(self.s_key.exchange(X25519PublicKey.from_public_bytes(self.neighbours[v][1])),
                        self.session, b"koinon secagg mask", self.client_id, v)
            if self.client_id < v:
                y += expand_mask(seed, len(y), self.fp)
            else:
                y -= expand_mask(seed, len(y), self.fp)
        y &= self.fp.dtype(self.fp.mask)
        self.state = "masked"
        return self._seal(MASKED, y.astype(y.dtype.newbyteorder("<"), copy=False).tobytes())

    def _survivors(self, data: bytes) -> tuple[list[int], list[int]]:
        """The SURVIVORS message, checked: (surviving neighbours, dropped neighbours)."""
        r = self._open(data, SURVIVORS)
        survivors = [r.u32() for _ in range(r.u32())]
        dropped = [r.u32() for _ in range(r.u32())]
        if self.consistency:
            self.survivor_list = [r.u32() for _ in range(r.u32())]
        r.end()
        if self.consistency:
            shown = set(self.survivor_list)
            if (len(shown) != len(self.survivor_list) or self.client_id not in shown
                    or not set(survivors) <= shown or set(dropped) & shown):
                raise ProtocolError(f"client {self.client_id}: the survivor list does not match the "
                                    "neighbours named surviving and dropped")
        if set(survivors) & set(dropped):
            raise ProtocolError(f"client {self.client_id}: the server names a neighbour both survived and "
                                "dropped (would reveal both of its secrets)")
        if len(set(survivors)) != len(survivors) or len(set(dropped)) != len(dropped):
            raise ProtocolError(f"client {self.client_id}: the survivor list repeats a client")
        if self.client_id in survivors or self.client_id in dropped:
            raise ProtocolError(f"client {self.client_id}: the server lists the client itself among its "
                                "surviving or dropped neighbours")
        unknown = (set(survivors) | set(dropped)) - set(self.held)
        if unknown:
            raise ProtocolError(f"client {self.client_id}: survivors/dropped name clients that did not "
                                f"share keys with it ({sorted(unknown)[:3]})")
        if len(survivors) < self.threshold:
            raise ProtocolError(f"client {self.client_id}: {len(survivors)} surviving neighbours, fewer "
                                f"than the threshold {self.threshold}")
        return survivors, dropped

    def _statement(self, survivor_list: list[int]) -> bytes:
        return b"koinon secagg survivors" + self.session + b"".join(u32(u) for u in sorted(survivor_list))

    def check(self, data: bytes) -> bytes:
        """Consistency check: sign the survivor list the server showed (nothing is revealed)."""
        if not self.consistency:
            raise ProtocolError(f"client {self.client_id}: no consistency check in this session")
        self._enter("masked", "check")
        self.state = "aborted"  # until this step succeeds
        self.views = self._survivors(data)
        self.state = "checked"
        return self._seal(CHECK, self.identity.sign(self._statement(self.survivor_list)))

    def unmask(self, data: bytes) -> bytes:
        """Reveal b-shares of the survivors and s-shares of the dropped, never both for one.
        With the consistency check `data` holds the neighbours' signatures of the survivor list,
        each checked first; otherwise it is the survivors message."""
        if self.consistency:
            self._enter("checked", "unmask")
            survivors, dropped = self.views
            r = self._open(data, CHECKS)
            statement = self._statement(self.survivor_list)
            signed = set()
            for _ in range(r.u32()):
                u, signature = r.u32(), r.take(64)
                if u not in survivors:
                    raise ProtocolError(f"client {self.client_id}: a signature of {u}, not a surviving neighbour")
                try:
                    self.directory[u].verify(signature, statement)
                except InvalidSignature:
                    self.state = "aborted"
                    raise ProtocolError(f"client {self.client_id}: neighbour {u} signed another survivor list: "
                                        "the server shows clients different views (aborting, nothing "
                                        "revealed)") from None
                signed.add(u)
            r.end()
            if len(signed) < self.threshold:
                raise ProtocolError(f"client {self.client_id}: {len(signed)} neighbours confirmed the survivor "
                                    f"list, fewer than the threshold {self.threshold}")
        else:
            self._enter("masked", "unmask")
            survivors, dropped = self._survivors(data)
        self.state = "unmasked"
        body = [u32(len(survivors) + len(dropped))]
        body += [u32(v) + bytes([SELF_MASK]) + self.held[v][1] for v in survivors if v != self.client_id]
        body += [u32(v) + bytes([MASK_KEY]) + self.held[v][0] for v in dropped]
        body[0] = u32(len(body) - 1)
        return self._seal(UNMASK, b"".join(body))


def seal_header_body(step: int, session: bytes, sender: int, body: bytes) -> bytes:
    """What an advert's signature covers (header to the server, then the body)."""
    return header(step, session, sender, SERVER, len(body)) + body


@dataclass
class SecAggServer:
    """The server's side of one run: routes messages, then unmasks the survivors' sum."""

    identity: Ed25519PrivateKey
    directory: dict[int, Ed25519PublicKey]  # the clients' identity keys
    session: bytes
    fp: FixedPoint
    degree: int
    threshold_fraction: float
    length: int  # words per input
    rejected: dict[int, str] = field(default_factory=dict)  # client -> why its message was refused
    adverts: dict[int, tuple[bytes, bytes, bytes]] = field(default_factory=dict)
    graph: dict[int, list[int]] = field(default_factory=dict)
    shares: dict[int, dict[int, bytes]] = field(default_factory=dict)  # u -> v -> ciphertext
    masked: dict[int, np.ndarray] = field(default_factory=dict)
    survivors: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    consistency: bool = False  # the malicious-server consistency check (module docstring)
    checks: dict[int, bytes] = field(default_factory=dict)  # consistency: client -> its signature of U

    def _open(self, client: int, data: bytes, step: int) -> Reader | None:
        """The checked body, or None (the client is recorded as rejected: it counts as dropped)."""
        if client in self.rejected:
            return None
        try:
            msg = open_message(data, self.directory[client], step=step, session=self.session,
                               sender=client, recipient=SERVER)
        except (ProtocolError, KeyError) as exc:
            self.rejected[client] = str(exc) if isinstance(exc, ProtocolError) else "unknown client"
            return None
        return Reader(msg.body, f"step {step} message of client {client}")

    def _seal(self, step: int, client: int, body: bytes) -> bytes:
        return seal(self.identity, step, self.session, SERVER, client, body)

    def receive_adverts(self, messages: dict[int, bytes]) -> dict[int, bytes]:
        for client, data in messages.items():
            r = self._open(client, data, ADVERTISE)
            if r is None:
                continue
            try:  # a signed but malformed advert rejects its client, not the session
                c_pk, s_pk = r.take(32), r.take(32)
                r.end()
            except ProtocolError as exc:
                self.rejected[client] = str(exc)
                continue
            self.adverts[client] = (c_pk, s_pk, data[-64:])
        self.graph = harary_graph(sorted(self.adverts), self.degree)
        out = {}
        for u, neighbours in self.graph.items():
            body = [u32(len(neighbours))] + [u32(v) + b"".join(self.adverts[v]) for v in neighbours]
            out[u] = self._seal(NEIGHBOURS, u, b"".join(body))
        return out

    def receive_shares(self, messages: dict[int, bytes]) -> dict[int, bytes]:
        for client, data in messages.items():
            r = self._open(client, data, SHARES)
            if r is None or client not in self.graph:
                continue
            try:
                sent: dict[int, bytes] = {}
                for _ in range(r.u32()):
                    v = r.u32()
                    sent[v] = r.take(r.u32())
                r.end()
                if set(sent) != set(self.graph[client]):
                    raise ProtocolError(f"client {client} sent shares to {sorted(sent)[:4]}, not to its neighbours")
            except ProtocolError as exc:
                self.rejected[client] = str(exc)
                continue
            self.shares[client] = sent
        out = {}
        for v in self.shares:
            incoming = [(u, self.shares[u][v]) for u in self.graph[v] if u in self.shares]
            body = [u32(len(incoming))] + [u32(u) + u32(len(ct)) + ct for u, ct in incoming]
            out[v] = self._seal(SHARES_FOR, v, b"".join(body))
        return out

    def receive_masked(self, messages: dict[int, bytes]) -> dict[int, bytes]:
        for client, data in messages.items():
            r = self._open(client, data, MASKED)
            if r is None or client not in self.shares:
                continue
            try:  # a signed but malformed input rejects its client (it counts as dropped)
                raw = r.take(self.length * self.fp.word_bytes)
                r.end()
            except ProtocolError as exc:
                self.rejected[client] = str(exc)
                continue
            self.masked[client] = np.frombuffer(raw, dtype=np.dtype(self.fp.dtype).newbyteorder("<"))
        self.survivors = sorted(self.masked)
        self.dropped = sorted(set(self.shares) - set(self.masked))
        survived, dropped = set(self.survivors), set(self.dropped)
        out = {}
        for v in self.survivors:
            s = [u for u in self.graph[v] if u in survived]
            d = [u for u in self.graph[v] if u in dropped]
            body = [u32(len(s))] + [u32(u) for u in s] + [u32(len(d))] + [u32(u) for u in d]
            if self.consistency:
                body += [u32(len(self.survivors))] + [u32(u) for u in self.survivors]
            out[v] = self._seal(SURVIVORS, v, b"".join(body))
        return out

    def receive_checks(self, messages: dict[int, bytes]) -> dict[int, bytes]:
        """Consistency check: keep the signatures of the survivor list (an honest server checks
        them too) and forward each client its surviving neighbours'."""
        statement = b"koinon secagg survivors" + self.session + b"".join(u32(u) for u in self.survivors)
        for client, data in messages.items():
            r = self._open(client, data, CHECK)
            if r is None or client not in self.masked:
                continue
            try:
                signature = r.take(64)
                r.end()
                self.directory[client].verify(signature, statement)
            except ProtocolError as exc:
                self.rejected[client] = str(exc)
                continue
            except InvalidSignature:
                self.rejected[client] = f"client {client} signed another survivor list"
                continue
            self.checks[client] = signature
        out = {}
        for v in self.checks:
            signed = [u for u in self.graph[v] if u in self.checks]
            body = [u32(len(signed))] + [u32(u) + self.checks[u] for u in signed]
            out[v] = self._seal(CHECKS, v, b"".join(body))
        return out

    def receive_unmask(self, messages: dict[int, bytes]) -> np.ndarray:
        """The sum of the survivors' encoded inputs (words of Z_(2^m)), or `ProtocolError`."""
        seed_shares: dict[int, dict[int, bytes]] = {u: {} for u in self.survivors}
        key_shares: dict[int, dict[int, bytes]] = {u: {} for u in self.dropped}
        for client, data in messages.items():
            r = self._open(client, data, UNMASK)
            if r is None or client not in self.masked or (self.consistency and client not in self.checks):
                continue
            try:
                entries = []
                for _ in range(r.u32()):
                    u, kind, share = r.u32(), r.u8(), r.take(shamir.SHARE_BYTES)
                    if u not in self.graph.get(client, ()):
                        raise ProtocolError(f"client {client} revealed a share of {u}, not a neighbour")
                    entries.append((u, kind, share))
                r.end()
            except ProtocolError as exc:
                self.rejected[client] = str(exc)
                continue
            for u, kind, share in entries:
                target = seed_shares if kind == SELF_MASK else key_shares
                if u in target:
                    target[u][client + 1] = share
        total = np.zeros(self.length, dtype=self.fp.dtype)
        for u in self.survivors:
            total += self.masked[u]
        for u in self.survivors:
            seed = self._reconstruct(u, seed_shares[u], "self-mask seed")
            total -= expand_mask(seed, self.length, self.fp)
        survived = set(self.survivors)
        for u in self.dropped:
            s_key = X25519PrivateKey.from_private_bytes(self._reconstruct(u, key_shares[u], "mask key"))
            for v in self.graph[u]:
                if v not in survived:
                    continue
                s_pk = X25519PublicKey.from_public_bytes(self.adverts[v][1])
                seed = _kdf(s_key.exchange(s_pk), self.session, b"koinon secagg mask", u, v)
                if v < u:  # v added this mask; take it out
                    total -= expand_mask(seed, self.length, self.fp)
                else:
                    total += expand_mask(seed, self.length, self.fp)
        return total & self.fp.dtype(self.fp.mask)

    def _reconstruct(self, u: int, shares: dict[int, bytes], what: str) -> bytes:
        t = threshold_for(len(self.graph[u]), self.threshold_fraction)
        if len(shares) < t:
            raise ProtocolError(f"cannot unmask: {len(shares)} shares of client {u}'s {what} arrived, "
                                f"{t} needed (too many dropouts)")
        try:
            return shamir.reconstruct(shares, t)
        except ValueError as exc:
            raise ProtocolError(f"cannot unmask client {u}'s {what}: {exc}") from None


def new_session() -> bytes:
    return os.urandom(32)


