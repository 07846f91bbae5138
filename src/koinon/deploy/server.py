"""`koinon server`: the federation's server over gRPC with mutual TLS, durable in `--state DIR`.

The round math is the simulation's: this driver steps the same `FederatedServer` state machine
(`koinon.topology.server`) that the simulation steps, through its public steps only: `sample`
(from the clients connected now), `open_round`, `task_for` (each client's downlink bytes, with
delta-mode catch-up), `decode` + `accept` for every upload, `close_round`; `state_dict` is the
checkpoint. So every client algorithm (SPSA's own bytes included), codec (increment codecs such
as EF21), downlink mode and simulated attack of the simulation runs here too, and with a fixed
seed and every client present a deployment ends with the model `koinon run` computes.

Threads: gRPC's pool serves the calls (joins, long polls, uploads, each validated as it streams
in); the main thread drives rounds. One lock and one condition guard the shared state, and
every wait has a deadline. One client certificate may hold at most `MAX_OPEN_CALLS` calls of
any kind open at once, so no identity can take the pool from the others; a partition belongs to
the first certificate that joined with it (kept in `state.db`) until that certificate is revoked.
"""

from __future__ import annotations

import gc
import json
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from koinon.config import Config
from koinon.deploy import federation_pb2_grpc
from koinon.deploy.certs import read_revoked, server_credentials
from koinon.deploy.faults import crash_point
from koinon.deploy.labels import check_trained, held_samples, trained_bounds
from koinon.deploy.personal import (
    Reported,
    check_counts,
    drop_server_figures,
    evaluation_task,
    final_evaluation,
    own_streams,
    split_size,
    summarize_counts,
    take_report,
)
from koinon.deploy.store import PendingWriter, Store
from koinon.deploy.wire import (
    MAX_GRPC_MESSAGE,
    PROTOCOL,
    Limits,
    Rejected,
    parse_upload_chunk,
    pb,
    quote,
    read_upload,
    serialize_frame,
    task_frames,
)
from koinon.errors import ConfigError, KoinonError
from koinon.files import atomic_write_text
from koinon.ledger.certsign import CertificateKey, check_upload_signature, receipt_statement
from koinon.topology.federated import Federation
from koinon.topology.server import digest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

POLL_HOLD_S = 5.0  # a long poll waits this long for work before answering WAIT
LIVENESS_S = 10.0  # a client that has not polled for this long is no longer "connected"
RECEIVING = 4  # uploads read and decoded at the same time (bounds the server's memory)
MAX_OPEN_UPLOADS = 2  # Upload calls one client may have open at once
MAX_OPEN_CALLS = 4  # calls of any kind one client certificate may have open at once
UPLOAD_GRACE_S = 5.0  # an Upload call is cut off this long after a round's full deadline
DONE_GRACE_S = 3.0  # after the last round, time for polling clients to hear DONE
MMAP_THRESHOLD = 4 << 20  # allocations from this size on are mapped and unmapped on their own (glibc)


def log(message: str) -> None:
    print(f"[server {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Member:
    """A client the server knows (joined at least once)."""

    name: str
    idx: int
    num_samples: int
    data_spec: str
    last_seen: float = 0.0
    polling: int = 0  # open long polls
    busy_round: int = -1  # round it was handed and has not answered yet
    uploading: bool = False
    open_uploads: int = 0  # Upload calls in progress, admitted or not
    muted_round: int = -1  # the server round in which its refusals stopped being logged


class Late(Rejected):
    """An upload for a round that has closed, or that came after the open round's deadline."""


def check_deployable(fed: Any, cfg: Config) -> Federation:
    """Refuse, before listening, what this server cannot run: only server-based federations."""
    if hasattr(fed, "schedule") and hasattr(fed, "clock"):
        raise ConfigError("[clock] and [schedule] simulate time; koinon server trains real clients in "
                          "real time (remove [clock]; [schedule] fedbuff or fedasync runs without it)")
    if not isinstance(fed, Federation):
        raise ConfigError(f"topology.name = {cfg.topology.name!r}: koinon server runs server-based "
                          "federations only (topology.name = 'federated')")
    if why := getattr(fed.algorithm, "simulation_only", ""):
        raise ConfigError(f"client.algorithm = {cfg.client.algorithm!r} runs in simulation (koinon run) only: {why}")
    if getattr(fed, "labels", None) is not None and (cfg.privacy.secagg or cfg.schedule.name != "sync"):
        raise ConfigError("data.unlabeled_clients / label_fraction / unseen_classes: a client's update then weighs the "
                          "samples it trained on that round, which koinon server takes in synchronous rounds without "
                          "privacy.secagg only (SecAgg+ and FedBuff/FedAsync weigh the count declared when joining)")
    if getattr(fed, "public", None) is not None:
        raise ConfigError("data.public_samples: the server's public data runs in simulation (koinon run) only; "
                          "koinon server does not take samples from its clients' data")
    if cfg.privacy.secagg:
        from koinon.deploy.secure import check_secure_deployable

        check_secure_deployable(cfg)
    return fed


def peer_name(context: grpc.ServicerContext) -> str | None:
    """The common name of the client's verified certificate (mutual TLS)."""
    names = context.auth_context().get("x509_common_name") or []
    return names[0].decode() if names else None


def peer_certificate(context: grpc.ServicerContext) -> bytes | None:
    """The PEM of the client certificate that authenticated this call (mutual TLS)."""
    pems = context.auth_context().get("x509_pem_cert") or []
    return pems[0] if pems else None


def check_receipt(header: Any, payloads: list[bytes], cert_pem: bytes | None) -> CertificateKey:
    """The upload's receipt signature must be its statement (round, model trained from, the
    payloads' digest as the server computes it, num_samples) signed by the key of the certificate
    that authenticated the call; `Rejected` with a one-line reason otherwise."""
    statement = receipt_statement(int(header.round) + 1, header.model_sha256, digest(payloads),
                                  int(header.num_samples))
    try:
        return check_upload_signature(cert_pem, bytes(header.receipt_signature), statement)
    except ValueError as exc:
        raise Rejected(str(exc)) from None


class FederationServer(federation_pb2_grpc.FederationServicer):
    """Rounds over the network; see the module docstring."""

    def __init__(self, cfg: Config, fed: Federation, store: Store, certs: Path) -> None:
        self.cfg = cfg
        self.fed = fed
        self.store = store
        self.certs = certs
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.server = fed.server
        self.local = fed.local
        self.layout_hash = fed.layout.hash()
        self.streams = self.server.streams
        self.max_stream = fed.codec.max_bytes()
        d = cfg.deploy
        auto = len(self.streams) * self.max_stream + (1 << 20)
        self.max_total = int(d.max_message_mb * (1 << 20)) if d.max_message_mb > 0 else auto
        self.limits = Limits(self.streams, self.max_stream, self.max_total)
        self.min_clients = d.min_clients or cfg.server.clients_per_round
        # A Poisson cohort (central DP's, or server.sampler = 'poisson') is not k clients: unless
        # deploy.min_clients says otherwise, a round waits for all of it, as the simulation keeps it.
        self.whole_cohort = not d.min_clients and getattr(fed.server.sampler, "name", "") == "poisson"
        self.min_connected = d.min_connected or self.min_clients
        self.members: dict[str, Member] = {
            name: Member(name, idx, n, spec) for name, (idx, n, spec) in store.clients().items()
        }
        self.deadline = 0.0  # of the open round (monotonic seconds)
        self.finished = False
        self.receiving = threading.BoundedSemaphore(RECEIVING)
        self.wall_offset = float(store.get("wall_s", 0.0))
        self.open_calls: dict[str, int] = {}  # by certificate name
        self.ledger: Any = None  # a [ledger] whose receipts the clients sign (`serve` sets it)
        self.secure: Any = None  # privacy.secagg: the rounds' SecAgg+ sessions (koinon.deploy.secure)
        # Personal counts of accepted uploads, by the round count of the model they score
        # (koinon.deploy.personal): {rounds done: {client index: (correct, total)}}.
        self.personal: dict[int, dict[int, tuple[int, int]]] = {}
        self.evaluating: int | None = None  # after the last round: its count, while clients score its model
        self.eval_clients: set[int] = set()

    # ------------------------------------------------------------ identity

    def _identify(self, context: grpc.ServicerContext) -> str:
        """The caller's name; aborts (before anything is read) if revoked or unknown."""
        name = peer_name(context)
        if name is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "no client certificate")
            raise AssertionError("unreachable")
        if name in read_revoked(self.certs):
            log(f"refused revoked client {name}")
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"client {name} is revoked")
        return name

    @contextmanager
    def _call(self, context: grpc.ServicerContext) -> Iterator[str]:
        """The caller's name for the length of a call, which counts against its open calls."""
        name = self._identify(context)
        with self.lock:
            busy = self.open_calls.get(name, 0) >= MAX_OPEN_CALLS
            if not busy:
                self.open_calls[name] = self.open_calls.get(name, 0) + 1
        if busy:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"client {name} already has {MAX_OPEN_CALLS} calls open; wait for them to end")
        try:
            yield name
        finally:
            with self.lock:
                self.open_calls[name] -= 1
                if not self.open_calls[name]:
                    del self.open_calls[name]

    def _member(self, name: str, context: grpc.ServicerContext) -> Member:
        with self.lock:
            member = self.members.get(name)
        if member is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"client {name} has not joined")
            raise AssertionError("unreachable")
        return member

    # ---------------------------------------------------------------- Join

    def Join(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._call(context) as name:
            return self._join(request, context, name)

    def _join(self, request: Any, context: grpc.ServicerContext, name: str) -> Any:
        data = self.fed.data
        if request.num_samples == 0:  # a probe for the config, registers nothing
            return self._join_reply(-1)
        if request.protocol < PROTOCOL and hasattr(self.fed.algorithm, "downlink_for"):
            log(f"refused client {name}: its koinon does not read per-client downloads")
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"client.algorithm = {self.cfg.client.algorithm!r} sends each client its own download "
                          f"(protocol {PROTOCOL}); this client speaks protocol {request.protocol}: update koinon")
        with self.lock:
            if request.partition >= 0:
                p = int(request.partition)
                if p >= data.num_clients:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"partition {p} does not exist (data.num_clients = {data.num_clients})")
                # A partition belongs to the first certificate that joined with it (persisted in
                # state.db), connected or not, until that certificate is revoked. The refusal
                # names neither the holder nor the partition's size.
                holder = next((m for m in self.members.values() if m.idx == p and m.name != name), None)
                if holder is not None and holder.name not in read_revoked(self.certs):
                    log(f"refused client {name}: partition {p} belongs to another certificate")
                    context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                  f"partition {p} belongs to another client certificate")
                if request.num_samples != held_samples(data, p):
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"client and server disagree on the data of partition {p} "
                                  "(the number of samples differs)")
                if holder is not None:  # revoked: its partition is free again
                    del self.members[holder.name]
                    self.store.forget_client(holder.name)
                idx = p
            else:
                known = self.members.get(name)
                used = {m.idx for m in self.members.values()}
                idx = known.idx if known and known.idx >= data.num_clients else max(
                    [data.num_clients - 1, *used]) + 1
            if request.num_samples < 1:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a client needs at least one sample")
            member = self.members.get(name)
            if member is None or member.idx != idx or member.num_samples != request.num_samples:
                member = Member(name, idx, int(request.num_samples), request.data_spec)
                self.members[name] = member
                self.store.save_client(name, idx, member.num_samples, request.data_spec)
            member.last_seen = time.monotonic()
            self.changed.notify_all()
        log(f"client {name} joined as index {idx} ({request.data_spec}, {request.num_samples} samples)")
        return self._join_reply(idx)

    def _join_reply(self, idx: int) -> Any:
        return pb.JoinReply(
            config_toml=self.cfg.to_toml(), layout_hash=self.layout_hash, client_index=idx,
            codec=self.fed.codec.name, downlink_codec=self.fed.downlink.name,
            max_upload_bytes=self.max_total,
        )

    # ---------------------------------------------------------------- Poll

    def Poll(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._call(context) as name:
            return self._poll(request, context, name)

    def _poll(self, request: Any, context: grpc.ServicerContext, name: str) -> Any:
        member = self._member(name, context)
        deadline = time.monotonic() + POLL_HOLD_S
        with self.lock:
            member.polling += 1
            member.last_seen = time.monotonic()
            self.changed.notify_all()
            try:
                # An upload of this client still in flight (its process was killed after sending
                # it) is decided first: the answer below tells the client which states are current.
                while member.open_uploads and time.monotonic() < deadline and context.is_active():
                    self.changed.wait(min(deadline - time.monotonic(), 1.0))
                while True:
                    task = self._task_for(member, int(request.last_round))
                    if task is not None or self.finished:
                        break
                    left = deadline - time.monotonic()
                    if left <= 0 or not context.is_active():
                        break
                    self.changed.wait(min(left, 1.0))
            finally:
                member.polling -= 1
                # A poll cut off by the client (process gone) ends its liveness at once.
                member.last_seen = time.monotonic() if context.is_active() else 0.0
        # Tells a client whose last "accepted" reply was lost (server crash) that its update
        # counts, so it keeps the codec state that goes with it.
        last = self.store.last_accepted(name)
        if self.finished:
            header = pb.TaskHeader(status=pb.TaskHeader.DONE, message="the run has finished",
                                   last_accepted_round=last)
            return task_frames(header, [])
        if task is None:
            header = pb.TaskHeader(status=pb.TaskHeader.WAIT, message="no work", last_accepted_round=last)
            return task_frames(header, [])
        header, payloads = task
        header.last_accepted_round = last
        return task_frames(header, payloads)

    def _task_for(self, member: Member, held_round: int) -> Any:
        """TRAIN messages when `member` is in the open round's cohort and has not delivered.
        `held_round`: the round of the model the client holds (delta downlink catches up from it)."""
        if self.evaluating is not None:  # after the last round (koinon.deploy.personal)
            return evaluation_task(self, member)
        rnd = self.server.open
        if rnd is None or member.idx not in rnd.cohort or member.idx in rnd.rows:
            return None
        if self.secure is not None and self.secure.started(member.idx, rnd.index):
            return None
        if time.monotonic() > self.deadline:
            return None
        member.busy_round = rnd.index
        if self.server.broadcast.delta:
            self.server.held_model(member.idx, held_round)
        named, _ = self.server.task_for(member.idx)
        own = own_streams(self.fed, member.idx, rnd.index)  # for this client alone, last, counted
        rnd.downlink_bytes += sum(len(p) for _, p in own)
        named += own
        header = pb.TaskHeader(
            status=pb.TaskHeader.TRAIN, round=rnd.index, layout_hash=self.layout_hash,
            codec=self.fed.downlink.name, streams=[n for n, _ in named], sizes=[len(p) for _, p in named],
            seed=self.cfg.seed, own=len(own),
        )
        return header, [p for _, p in named]

    # --------------------------------------------------- secure aggregation

    def SecureStep(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """One SecAgg+ message of a client (`koinon.deploy.secure`), answered after its step."""
        with self._call(context) as name:
            member = self._member(name, context)
            with self.lock:
                member.last_seen = time.monotonic()
            return bytes(self.secure.handle(request, member.idx, peer_certificate(context)))

    def _secure_round(self) -> None:
        """The open round's cohort sums its updates by SecAgg+; the server holds the sum only."""
        rnd = self.server.open
        assert rnd is not None and self.server.privacy is not None
        with self.lock:
            samples = {m.idx: m.num_samples for m in self.members.values() if m.idx in rnd.cohort}
        secure, losses = self.secure.run_round(rnd.index, list(rnd.cohort), samples,
                                               self.server.privacy.client_clip(), self.deadline)
        with self.lock:
            self.deadline = min(self.deadline, time.monotonic())
            self.server.accept_secure_sum(secure, {c: samples[c] for c in losses}, losses)
            for m in self.members.values():
                if m.busy_round == rnd.index:
                    m.busy_round = -1
            self.changed.notify_all()

    # -------------------------------------------------------------- Upload

    def Upload(self, request_iterator: Any, context: grpc.ServicerContext) -> Any:
        with self._call(context) as name:
            return self._upload(request_iterator, context, name)

    def _upload(self, request_iterator: Any, context: grpc.ServicerContext, name: str) -> Any:
        member = self._member(name, context)
        with self.lock:
            if member.open_uploads >= MAX_OPEN_UPLOADS:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"{MAX_OPEN_UPLOADS} uploads from this client are already open")
            member.open_uploads += 1
        # No upload outlives a round: a sender that stalls (or never sends its header) is cut
        # off, so it cannot hold a server thread or a receive slot past the round's deadline.
        timer = threading.Timer(self.cfg.deploy.round_timeout_s + UPLOAD_GRACE_S, context.cancel)
        timer.daemon = True
        timer.start()
        claimed: list[int] = []
        uploading: list[bool] = []
        try:
            return self._receive(request_iterator, member, claimed, uploading, peer_certificate(context))
        finally:
            timer.cancel()
            with self.lock:
                member.open_uploads -= 1
                if uploading:
                    member.uploading = False
                self.changed.notify_all()

    def _check_header(self, header: Any, member: Member) -> None:
        """An upload header's checks shared by rounds and asynchronous tasks: the model's layout,
        the run's codec, the calling client's index and the sample count it joined with."""
        if header.layout_hash != self.layout_hash:
            raise Rejected(f"layout hash {quote(header.layout_hash)} is not the model's {self.layout_hash!r}")
        if header.codec != self.fed.codec.name:
            raise Rejected(f"codec {quote(header.codec)}, the run uses {self.fed.codec.name!r}")
        if header.client_index != member.idx:
            raise Rejected(f"client index {header.client_index} is not this client's {member.idx}")
        # Where labels may be hidden an upload counts the samples it trained on (koinon.deploy.labels):
        # a partition's within what its algorithm can train on, an own-data client's up to its count.
        bounds: tuple[int, int] | None = None
        if member.idx >= self.fed.data.num_clients:  # its own data, where it may mark samples unlabeled
            bounds = (0, member.num_samples)
        elif getattr(self.fed, "labels", None) is not None:
            bounds = trained_bounds(self.fed.algorithm, int(self.fed.data.sizes[member.idx]), member.num_samples)
        if why := check_trained(int(header.num_samples), member.num_samples, bounds):
            raise Rejected(why)

    def _receive(self, request_iterator: Any, member: Member, claimed: list[int], uploading: list[bool],
                 cert_pem: bytes | None = None) -> Any:
        name = member.name

        def admit(header: Any) -> None:
            claimed.append(int(header.round))
            if self.secure is not None:  # an update sent in the clear would defeat the protocol
                raise Rejected("this run aggregates securely (privacy.secagg): updates go through "
                               "SecAgg+, never as a plain upload")
            self._check_header(header, member)
            if why := check_counts(int(header.personal_correct), int(header.personal_total),
                                   split_size(self.fed, member.idx)):
                raise Rejected(why)
            if self.evaluating is not None and header.round == self.evaluating:
                raise Reported(take_report(self, member, header))
            with self.lock:
                self._admit_round(header.round, member)
                if member.uploading:  # one upload per client at a time: no racing duplicates
                    raise Rejected("duplicate submission: another upload from this client is in progress")
                member.uploading = True
                uploading.append(True)

        slot: list[bool] = []
        pending: list[PendingWriter] = []
        got: list[Any] = []

        def take_slot() -> None:
            # At most RECEIVING uploads are buffered and decoded at once, and only admitted ones
            # (right round, sampled, not a duplicate) wait for a slot; the others wait here,
            # unread (gRPC flow control holds their senders), so memory stays bounded.
            if not self.receiving.acquire(timeout=self.cfg.deploy.round_timeout_s):
                raise Rejected("server busy: no upload slot within the round deadline")
            slot.append(True)
            # The pending file is written and hashed chunk by chunk as the upload streams in.
            header = got[0]
            pending.append(self.store.open_pending(int(header.round), member.idx, list(header.sizes)))

        def admit_and_keep(header: Any) -> None:
            admit(header)
            got.append(header)

        def on_chunk(data: bytes) -> None:
            pending[0].write(data)

        read: list[int] = []  # payload bytes read before a refusal (they crossed the wire)
        try:
            try:
                try:
                    header, payloads = read_upload(request_iterator, self.limits, admit_and_keep, take_slot,
                                                   on_chunk)
                except Rejected:
                    raise
                except Exception as exc:  # noqa: BLE001 - a cancelled or broken stream
                    raise Rejected(f"upload stream ended early ({type(exc).__name__}): not finished "
                                   "before the round's deadline, or the connection broke") from None
                round_index = int(header.round)
                read.append(sum(len(p) for p in payloads))
                signed = check_receipt(header, payloads, cert_pem) if self.ledger is not None else None
                # Decoded for the round the upload claims (admitted above), outside the lock: a
                # round that closes meanwhile makes it late at `_admit_round` below.
                rows = self.server.decode(member.idx, payloads, self.local.num_steps(int(header.num_samples)),
                                          round_index)
                # Named while the slot is held, so no more than RECEIVING buffers are alive.
                size, digest = pending.pop().finish()
                release_free_memory()  # the blocks gRPC received this upload in
            finally:
                if pending:  # refused or broken: the partial file goes
                    pending.pop().abort()
                if slot:
                    self.receiving.release()
        except Reported as exc:
            return pb.UploadReply(accepted=not str(exc), reason=str(exc))
        except Rejected as exc:
            rnd = self.server.open
            round_index = claimed[0] if claimed else (rnd.index if rnd else -1)
            return self._refuse(member, round_index, str(exc), "late" if isinstance(exc, Late) else "rejected",
                                nbytes=sum(read))
        with self.lock:
            try:
                self._admit_round(round_index, member)  # the round may have closed meanwhile
            except Rejected as exc:
                self.store.drop_pending(round_index, member.idx)
                status = "late" if isinstance(exc, Late) else "rejected"
                return self._refuse(member, round_index, str(exc), status, locked=True)
            if signed is not None:
                self.ledger.attest(round_index + 1, member.idx, signed, header.model_sha256, int(header.num_samples),
                                   bytes(header.receipt_signature))
            self.server.accept(member.idx, round_index, rows, int(header.num_samples), float(header.train_loss),
                               payloads)
            counts = (int(header.personal_correct), int(header.personal_total))
            if counts[1] > 0:
                self.personal.setdefault(round_index, {})[member.idx] = counts
            self.store.record_accepted(round_index, name, member.idx, size, digest, int(header.num_samples),
                                       header.train_loss, counts if counts[1] > 0 else None)
            member.busy_round = -1
            self.changed.notify_all()
        return pb.UploadReply(accepted=True)

    def _admit_round(self, round_index: int, member: Member) -> None:
        """`Late` for a round that has closed or is past its deadline; `Rejected` for a round
        that is not open (a future or unknown one), an unsampled client or a duplicate."""
        if 0 <= round_index < self.server.round_index:
            raise Late(f"late: round {round_index + 1} has closed")
        try:
            self.server.admit(member.idx, round_index)
        except Rejected as exc:
            raise Rejected(str(exc).replace(f"client {member.idx} ", f"client {member.name} ")) from None
        if time.monotonic() > self.deadline:
            raise Late(f"late: the deadline of round {round_index + 1} has passed")

    def _refuse(self, member: Member, round_index: int, reason: str, status: str, locked: bool = False,
                nbytes: int = 0) -> Any:
        late = status == "late"
        if not locked:
            self.lock.acquire()
        try:
            rnd = self.server.open
            if late and rnd is not None:
                rnd.late += 1
            elif (rnd is not None and rnd.index == round_index and member.idx not in rnd.rows
                  and not reason.startswith("duplicate")):  # its first upload still counts
                self.server.reject(member.idx, reason, nbytes)
            window = self.server.round_index
            stored = self.store.reject(round_index, member.name, member.idx, status, reason, 0, window)
            mute = not stored and member.muted_round != window
            if mute:
                member.muted_round = window
        finally:
            if not locked:
                self.lock.release()
        if stored:
            log(f"{self._round(round_index)}: {'discarded late' if late else 'rejected'} update from "
                f"{member.name}: {reason}")
        elif mute:
            log(f"{self._round(round_index)}: further refusals of {member.name} this round are counted, not "
                "stored or logged")
        return pb.UploadReply(accepted=False, reason=reason)

    # --------------------------------------------------------------- rounds

    def _connected(self, member: Member, now: float) -> bool:
        rnd = self.server.open
        return member.polling > 0 or now - member.last_seen < LIVENESS_S or (
            rnd is not None and member.busy_round == rnd.index)

    def _population(self) -> tuple[np.ndarray, np.ndarray]:
        now = time.monotonic()
        # The sampler weighs a partition's labeled samples, as the simulation does (koinon.deploy.labels).
        sizes = self.fed.data.sizes
        live = sorted((m.idx, int(sizes[m.idx]) if m.idx < len(sizes) else m.num_samples)
                      for m in self.members.values() if self._connected(m, now))
        return (np.array([i for i, _ in live], dtype=np.int64), np.array([n for _, n in live], dtype=np.int64))

    def _open(self, round_index: int, cohort: list[int] | None) -> None:
        """Open round `round_index`: wait for clients (if the cohort is not known yet), sample,
        encode, and take back the updates a crashed server had already accepted."""
        d = self.cfg.deploy
        if cohort is None:
            give_up = time.monotonic() + d.wait_clients_s
            with self.lock:
                while len(self._population()[0]) < self.min_connected and time.monotonic() < give_up:
                    self.changed.wait(min(1.0, max(give_up - time.monotonic(), 0.01)))
                population, sizes = self._population()
            if len(population) == 0:
                raise KoinonError(f"no client connected within deploy.wait_clients_s = {d.wait_clients_s} s; "
                                  "state is saved, restart the server to go on")
            if len(population) < self.min_connected:
                log(f"{self._round(round_index)}: only {len(population)} clients connected after "
                    f"{d.wait_clients_s} s, going on with them")
            cohort = self.server.sample(round_index, population, sizes)
            self.store.begin_round(round_index, cohort)
        with self.lock:
            rnd = self.server.open_round(round_index, cohort)
            self.deadline = time.monotonic() + d.round_timeout_s
            for up in self.store.pending(round_index):
                if up.idx not in cohort:
                    continue
                try:
                    rows = self.server.decode(up.idx, up.payloads, self.local.num_steps(up.num_samples),
                                              round_index)
                except Rejected:
                    continue
                self.server.accept(up.idx, round_index, rows, up.num_samples, up.train_loss, up.payloads)
            # The personal counts those uploads reported (koinon.deploy.personal) come back with them.
            for idx, counts in self.store.personal_counts(round_index).items():
                if idx in rnd.rows:
                    self.personal.setdefault(round_index, {})[idx] = counts
            self.changed.notify_all()
        log(f"{self._round(round_index)}: cohort {cohort}" + (f" ({len(rnd.rows)} updates recovered)"
                                                      if rnd.rows else ""))

    def _wait(self) -> None:
        rnd = self.server.open
        assert rnd is not None
        need = len(rnd.cohort) if self.whole_cohort else min(self.min_clients, len(rnd.cohort))
        with self.lock:
            while len(rnd.rows) < need and time.monotonic() < self.deadline:
                self.changed.wait(min(1.0, max(self.deadline - time.monotonic(), 0.01)))
            # From here on uploads for this round are late.
            self.deadline = min(self.deadline, time.monotonic())

    def _close(self, start: float) -> dict[str, Any]:
        """Apply the round's accepted updates, evaluate, checkpoint, commit."""
        release_free_memory()  # what gRPC held of the uploads, before the model-sized work of closing
        with self.lock:
            result = self.server.close_round()
        s = self.cfg.server
        upcoming = result.round
        crash_point("server.closed", upcoming)
        if upcoming % s.eval_every == 0 or upcoming == s.rounds:
            self.fed.evaluate_into(result)
            drop_server_figures(result.extra)  # the clients report them (koinon.deploy.personal)
        if (reports := self.personal.pop(upcoming - 1, None)) and (figures := summarize_counts(reports)):
            self.store.merge_record(upcoming - 1, figures)  # the model this round started from
        result.wall_s = round(self.wall_offset + time.perf_counter() - start, 4)
        record = result.as_dict()
        ckpt = self.store.write_checkpoint(upcoming, self.fed.state_dict())  # with its SHA-256
        self.store.commit_round(upcoming, ckpt, record, {
            "uplink_total": self.fed.uplink_total, "downlink_total": self.fed.downlink_total,
            "wall_s": record["wall_s"],
        })
        self._write_metrics()
        acc = record["test_accuracy"]
        log(f"{self._round(upcoming - 1)} closed: {result.num_clients}/{len(result.cohort)} updates"
            + (f", accuracy {acc:.4f}" if acc is not None else "")
            + (f"; {result.refused}" if result.refused else ""))
        return record

    def _round(self, round_index: int) -> str:
        """Round `round_index` (0-based, as on the wire) as logs and records show it: "round N/T"."""
        return f"round {round_index + 1}/{self.cfg.server.rounds}"

    def _write_metrics(self) -> None:
        text = "".join(json.dumps(r) + "\n" for r in self.store.records())
        atomic_write_text(self.store.folder / "metrics.jsonl", text)

    def run_rounds(self) -> None:
        """Drive rounds until `server.rounds` are committed (resuming an open one first)."""
        start = time.perf_counter()
        total = self.cfg.server.rounds
        while self.fed.round_index < total:
            pending = self.store.open_round()
            r = self.fed.round_index
            cohort = pending[1] if pending and pending[0] == r else None
            self._open(r, cohort)
            if self.secure is not None:
                self._secure_round()
            else:
                self._wait()
            self._close(start)
        final_evaluation(self)  # the last model's personal metrics, from the clients
        with self.lock:
            self.finished = True
            self.changed.notify_all()


def add_servicer(servicer: Any, grpc_server: grpc.Server) -> None:
    """Serve `servicer`'s methods as generated, except the two that carry models: `Upload`
    reads its data chunks as views of the received bytes (`parse_upload_chunk`, no protobuf
    message per chunk) and `Poll` sends its data chunks pre-serialized (`task_frames`). The
    bytes on the wire are the same."""
    federation_pb2_grpc.add_FederationServicer_to_server(servicer, grpc_server)
    grpc_server.add_registered_method_handlers("koinon.deploy.Federation", {  # replaces those two
        "Upload": grpc.stream_unary_rpc_method_handler(
            servicer.Upload, request_deserializer=parse_upload_chunk,
            response_serializer=pb.UploadReply.SerializeToString),
        "Poll": grpc.unary_stream_rpc_method_handler(
            servicer.Poll, request_deserializer=pb.PollRequest.FromString, response_serializer=serialize_frame),
    })


def restore(fed: Federation, store: Store) -> None:
    """Load the last committed round into `fed` (nothing to do on a fresh state folder)."""
    tensors = store.load_checkpoint()
    if tensors is None:
        return
    try:
        fed.load_state_dict(tensors)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise KoinonError(f"--state {store.folder}: checkpoint {store.get('checkpoint')} does not fit this "
                          f"run ({type(exc).__name__}: {str(exc)[:200]}); use a new --state folder") from None


def _return_large_buffers_to_the_os() -> None:
    """Serve every allocation of `MMAP_THRESHOLD` bytes or more with its own mmap (glibc).

    Uploads are tens of MB each, received on many threads. glibc raises its mmap threshold
    after such a buffer is freed, so the next ones come from per-thread arenas that never shrink:
    the server's resident memory then grows to several times what it holds (benchmark, 10
    uploads of 40 MB: peak 2.1-2.4 GB without this, 1.7 GB with it). A fixed threshold hands
    each buffer back when it is freed. It sits above the wire's chunks (1 MiB): those come and
    go by the thousand, and a mapping each costs a page fault and the zeroing of every page
    (a fifth of the server's CPU time while receiving, measured with perf).
    """
    import ctypes
    import ctypes.util

    global _LIBC
    name = ctypes.util.find_library("c")
    if sys.platform != "linux" or not name:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
        libc.malloc_trim  # noqa: B018 - glibc's, checked here once
    except (OSError, AttributeError):
        return
    _LIBC = libc


_LIBC: Any = None  # glibc, once `_return_large_buffers_to_the_os` has set it up


def release_free_memory() -> None:
    """Hand the free pages of glibc's heaps back to the OS (`malloc_trim`). gRPC takes an upload
    in small blocks (HTTP/2 frames), tens of MB per stream ahead of the reader; once read and
    freed they stay in glibc's arenas, still counted as the server's memory (benchmark: 160 MB
    after 10 uploads of 40 MB, 5 MB once trimmed). A few milliseconds per call."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


# What a restart may change: deadlines and limits, and how long the run goes on.
_RESUMABLE = {"deploy", "server.rounds", "server.eval_every", "server.checkpoint_every"}


def _changed_keys(stored_toml: str, cfg: Config) -> list[str]:
    """Config keys that differ from the stored run's, other than those a restart may change."""
    old = Config.from_dict(tomllib.loads(stored_toml)).to_dict()
    new = cfg.to_dict()
    changed = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section), new.get(section)
        if section in _RESUMABLE or a == b:
            continue
        if not isinstance(a, dict) or not isinstance(b, dict):
            changed.append(section)
            continue
        changed += [f"{section}.{k}" for k in sorted(set(a) | set(b))
                    if a.get(k) != b.get(k) and f"{section}.{k}" not in _RESUMABLE]
    return changed


def _ledger(fed: Federation, cfg: Config, state: Path) -> Any:
    """`[ledger]`: the contribution ledger watches the server and writes into the state folder
    (stored rounds, the round log, payouts at the end), as `koinon run` does into its run folder.
    After a restart its log is reopened and cut back to the committed rounds (`attach`)."""
    if cfg.ledger.contribution == "none":
        return None
    from koinon.ledger import attach_ledger

    log = state / "ledger" / "log.jsonl"
    resume = bool(fed.round_index) or (log.is_file() and log.stat().st_size > 0)
    return attach_ledger(fed, cfg, state, cfg.to_toml(), client_key="certificate", resume=resume)


def serve(cfg: Config, state: Path, certs: Path, listen: str) -> dict[str, Any]:
    """Run (or resume) the deployment in `state`; returns the summary once every round is done."""
    from koinon.experiment.runner import finish_run

    _return_large_buffers_to_the_os()

    from koinon.deploy.asynchronous import AsyncServer, AsyncStore, build_for_deployment

    topology, schedule = build_for_deployment(cfg)  # schedule: FedBuff / FedAsync, or None (rounds)
    fed = check_deployable(topology, cfg)
    if (serve_with := getattr(fed.algorithm, "serve_with", None)) is not None:
        serve_with(fed.model)  # a server step that runs the model (FedLGD's gradient matching)
    if not cfg.deploy.max_update_norm >= 0:
        raise ConfigError(f"deploy.max_update_norm = {cfg.deploy.max_update_norm}: must be >= 0 (0: no bound)")
    fed.server.bound_update_norm(cfg.deploy.max_update_norm)
    creds = server_credentials(certs)
    store = Store(state) if schedule is None else AsyncStore(state)
    try:
        stored = store.get("config_toml")
        if stored is not None:
            changed = _changed_keys(stored, cfg)
            if changed:
                raise ConfigError(f"--state {state} holds a run with another configuration ({', '.join(changed)} "
                                  f"differ; see {state / 'config.toml'}); use a new --state folder")
        restore(fed, store)
        if fed.round_index > cfg.server.rounds:
            raise ConfigError(f"server.rounds = {cfg.server.rounds} is below the {fed.round_index} rounds "
                              f"already committed in {state}")
        ledger = _ledger(fed, cfg, state)  # before the new config is written: a refused restart keeps the old one
        server = (FederationServer(cfg, fed, store, certs) if schedule is None
                  else AsyncServer(cfg, fed, store, certs, schedule))  # type: ignore[arg-type]
        server.ledger = ledger
        store.put("config_toml", cfg.to_toml())
        store.put("layout_hash", fed.layout.hash())
        atomic_write_text(state / "config.toml", cfg.to_toml())
        if fed.round_index:
            log(f"resuming from {state}: {fed.round_index} rounds committed")
        workers = min(1024, 2 * fed.data.num_clients + 32)
        grpc_server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers),
            # so_reuseport = 0: the port is this server's alone; with gRPC's default a second
            # server (another --state) would bind the same port and clients would split.
            options=[("grpc.so_reuseport", 0),
                     ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE),
                     ("grpc.max_send_message_length", MAX_GRPC_MESSAGE),
                     ("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000),
                     ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
                     ("grpc.keepalive_permit_without_calls", 1)],
            maximum_concurrent_rpcs=workers,
        )
        add_servicer(server, grpc_server)
        if cfg.privacy.secagg:
            from koinon.deploy.secure import SecureRounds

            assert fed.server.privacy is not None and fed.server.privacy.secure is not None
            server.secure = SecureRounds(fed.server.privacy.secure, fed.layout.numel,
                                         cfg.privacy.secagg_step_timeout_s, log)
            grpc_server.add_generic_rpc_handlers((server.secure.handler(server.SecureStep),))
        tls = grpc.ssl_server_credentials([(creds.key, creds.cert)], root_certificates=creds.ca,
                                          require_client_auth=True)
        try:
            port = grpc_server.add_secure_port(listen, tls)
        except RuntimeError as exc:
            raise KoinonError(f"--listen {listen}: cannot listen there ({exc})") from None
        if port == 0:
            raise KoinonError(f"--listen {listen}: cannot listen there (the port is in use, e.g. by another "
                              "server, or the address is invalid); choose another --listen")
        # What exists now lives as long as the server: the collector stops scanning it (with
        # torch loaded, each full pass walked hundreds of thousands of objects while uploads streamed).
        gc.collect()
        gc.freeze()
        grpc_server.start()
        host = listen.rsplit(":", 1)[0]
        log(f"listening on {host}:{port} (TLS, client certificates from {certs}), state in {state}")
        (state / "server.port").write_text(f"{port}\n")
        try:
            server.run_rounds()
            if ledger is not None:
                ledger.finish(state)
            time.sleep(DONE_GRACE_S)  # polling clients hear DONE and leave on their own
        finally:
            grpc_server.stop(grace=1.0).wait(5.0)
        counts = store.counts()
        log(f"done: {fed.round_index} rounds; updates accepted {counts.get('accepted', 0)}, "
            f"rejected {counts.get('rejected', 0)}, late {counts.get('late', 0)}")
        return finish_run(fed, cfg, state, float(store.get("wall_s", 0.0)))
    finally:
        store.close()
