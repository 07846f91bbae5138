"""`koinon server` with `[schedule] name = "fedbuff"` or `"fedasync"`: updates one at a time.

The server keeps `concurrency` tasks out (default `server.clients_per_round`). A task is a
client's local training from the current model version; tasks handed out together form a
*dispatch*, numbered from 0, and the dispatch number is what the wire's `round` carries: the
client seeds its batches and encodes its update with it, exactly as the simulated schedule's
training call of the same number does (`koinon.schedule.driver.Scheduled.train`). A client
trains at its own pace and uploads; the server validates the upload as in rounds (header,
sizes, decode, norm bound), computes its staleness (current version minus the task's) and
puts it in the buffer. A full buffer (`schedule.buffer` updates; FedAsync: every update) is one
server step through `FederatedServer.apply_buffered` with the schedule's own staleness weights
(and FedAsync's mixing offset), the same code the simulation steps.

A client's slot stays taken until its update is applied, so each buffer holds at most one
update per client (`schedule.buffer <= concurrency`), and a step aggregates its buffer in
(dispatch, client) order: network timing never changes the bits. With every client present
and `schedule.buffer = concurrency = clients_per_round` each dispatch is a round's cohort and
each step its `close_round`: the deployment ends with the simulation's model, bit for bit.

Exactly once across a SIGKILL (`AsyncStore`): an update's bytes go to `buffer/` first; one
SQLite transaction then records its acceptance, its buffer row and its task's new status, and
only after that commit does the client hear "accepted". A step writes its checkpoint, then one
transaction commits the new version, its record and the `applied` mark of the updates it took.
A restart loads the last committed version and the buffer rows not yet applied: a kill before
a step's commit redoes the step from the same updates, a kill after it finds them applied. The
idempotency key is (task, client): an upload of an update already accepted is answered
"accepted" again and counted once. An update that arrives when the updates waiting already fill
the steps left (`server.rounds`) is late: no step would ever apply it.

Personal metrics (`data.client_test_fraction`, `koinon.deploy.personal`): a task names its model
version (`TaskHeader.version`); the client scores its personalized model on that version and
sends the counts with its update, and each step merges the counts reported so far into the
records of their versions; an EVALUATE task follows the last step. The counts are stored in the
acceptance's transaction (`async_personal`), so a restart keeps every version's figures whole.

`[clock]` is refused: it simulates clients' speeds, and real clients have real ones.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from koinon.config import Config, ScheduleConfig
from koinon.deploy.faults import crash_point
from koinon.deploy.personal import (
    Reported,
    check_counts,
    drop_server_figures,
    evaluation_task,
    final_evaluation,
    split_size,
    summarize_counts,
    take_report,
)
from koinon.deploy.server import FederationServer, Late, Member, log
from koinon.deploy.store import Checkpoint, Store, _pack_head, _unpack
from koinon.deploy.wire import Rejected, pb, read_upload
from koinon.errors import ConfigError, KoinonError
from koinon.topology.server import Buffered

__all__ = ["AsyncServer", "AsyncStore", "build_client_federation", "build_for_deployment"]

_ASYNC = ("fedbuff", "fedasync")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS async_tasks (
    task INTEGER NOT NULL, client TEXT NOT NULL, idx INTEGER NOT NULL, version INTEGER NOT NULL,
    status TEXT NOT NULL, issued REAL NOT NULL, PRIMARY KEY (task, client));
CREATE TABLE IF NOT EXISTS async_buffer (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, task INTEGER NOT NULL, client TEXT NOT NULL,
    idx INTEGER NOT NULL, version INTEGER NOT NULL, sha256 TEXT NOT NULL, num_samples INTEGER NOT NULL,
    num_steps INTEGER NOT NULL, train_loss REAL NOT NULL, applied INTEGER NOT NULL DEFAULT -1,
    UNIQUE (task, client));
CREATE TABLE IF NOT EXISTS async_personal (
    version INTEGER NOT NULL, idx INTEGER NOT NULL, correct INTEGER NOT NULL, total INTEGER NOT NULL,
    PRIMARY KEY (version, idx));
"""


# ------------------------------------------------------------------ configuration


def _without_schedule(cfg: Config) -> Any:
    """The federation `cfg` builds with its `[schedule]` set aside (it needs no clock then)."""
    from koinon.experiment.runner import build_federation

    schedule, cfg.schedule = cfg.schedule, ScheduleConfig()
    try:
        return build_federation(cfg)
    finally:
        cfg.schedule = schedule


def build_client_federation(cfg: Config) -> Any:
    """What `koinon client` builds from the server's config: the federation, without its
    schedule (the server decides when updates are applied)."""
    return _without_schedule(cfg)


def build_for_deployment(cfg: Config) -> tuple[Any, Any]:
    """(topology, asynchronous schedule or None) for `koinon server`; a one-line `ConfigError`
    for what it cannot run. `sync` is the deployment's rounds (deploy.round_timeout_s is their
    deadline); FedBuff and FedAsync run asynchronously; FedCompass and FedAMD are refused."""
    from koinon.experiment.runner import build_federation
    from koinon.schedule import scheduled

    c = cfg.clock
    if c.speed != "none" or c.trace:
        raise ConfigError("[clock] simulates clients' speeds and availability; koinon server's clients train "
                          "at their real speed: remove [clock] (keep [schedule])")
    s = cfg.schedule
    if s.name == "sync":
        if s.options:
            raise ConfigError(f"schedule options {sorted(s.options)}: koinon server's rounds end at "
                              "deploy.round_timeout_s; remove them")
        return build_federation(cfg), None
    if s.name not in _ASYNC:
        raise ConfigError(f"schedule.name = {s.name!r} plans clients by their simulated speed (local step counts, "
                          "anchor clients); koinon server runs 'sync', 'fedbuff' or 'fedasync'")
    if cfg.privacy.secagg:
        raise ConfigError(f"privacy.secagg = true with schedule.name = {s.name!r}: koinon server does not sum "
                          "asynchronous buffers securely yet (koinon run does); use schedule.name = 'sync'")
    if cfg.server.sampler == "poisson":
        raise ConfigError("server.sampler = 'poisson' draws cohorts of varying size; koinon server's asynchronous "
                          "schedules fill a fixed number of training slots: use 'uniform' (or another fixed-size one)")
    topology = _without_schedule(cfg)
    # The simulation's own checks of what an asynchronous schedule cannot run (privacy, ledger,
    # attacks, server-side hooks, delta downlink), on a copy given a constant clock.
    probe = copy.deepcopy(cfg)
    probe.clock.speed = "constant"
    schedule = scheduled(probe, topology).schedule
    slots = schedule.concurrency or cfg.server.clients_per_round
    if s.name == "fedbuff" and schedule.buffer > slots:
        raise ConfigError(f"schedule.buffer = {schedule.buffer} is above the {slots} clients training at once "
                          "(schedule.concurrency, default server.clients_per_round): koinon server takes at most "
                          "one update per client into a buffer, so it would never fill")
    return topology, schedule


# ------------------------------------------------------------------------ store


@dataclass
class Entry:
    """An accepted update waiting in the buffer."""

    seq: int
    task: int
    client: str
    idx: int
    version: int
    payloads: list[bytes]
    num_samples: int
    num_steps: int
    train_loss: float


class AsyncStore(Store):
    """`Store` plus the tasks handed out and the buffer (see the module docstring)."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        with self._sql:
            self.db.executescript(_SCHEMA)
        (folder / "buffer").mkdir(exist_ok=True)
        # Files of applied updates (a kill between a step's commit and its clean-up leaves them),
        # of uploads never accepted, and half-written ones: never part of the truth.
        waiting = {self.buffer_file(t, i).name for t, i in self._query(
            "SELECT task, idx FROM async_buffer WHERE applied < 0")}
        for path in (folder / "buffer").iterdir():
            if path.suffix == ".tmp" or (path.suffix == ".bin" and path.name not in waiting):
                path.unlink(missing_ok=True)

    def buffer_file(self, task: int, idx: int) -> Path:
        return self.folder / "buffer" / f"t{task:06d}-c{idx}.bin"

    def write_buffer(self, task: int, idx: int, payloads: list[bytes]) -> tuple[int, str]:
        """An upload's bytes in `buffer/` (not yet counted); returns (size, sha256)."""
        path = self.buffer_file(task, idx)
        tmp = path.with_suffix(".tmp")
        digest, size = hashlib.sha256(), 0
        with tmp.open("wb") as f:
            for piece in (_pack_head(payloads), *payloads):
                f.write(piece)
                digest.update(piece)
                size += len(piece)
        os.replace(tmp, path)
        return size, digest.hexdigest()

    def issue(self, tasks: list[tuple[int, str, int, int]], dispatches: int, downlink: int) -> None:
        """Tasks (task, client, idx, version) handed out, and the counters that go with them."""
        with self._transaction() as db:
            now = time.time()
            db.executemany("INSERT OR REPLACE INTO async_tasks VALUES (?, ?, ?, ?, 'out', ?)",
                           [(t, c, i, v, now) for t, c, i, v in tasks])
            for key, value in (("async_dispatches", dispatches), ("async_downlink", downlink)):
                db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def end_tasks(self, tasks: list[tuple[int, str]], status: str) -> None:
        """Tasks no longer awaited: `expired` (past the deadline) or `dropped` (cannot be served)."""
        with self._transaction() as db:
            db.executemany("UPDATE async_tasks SET status = ? WHERE task = ? AND client = ? AND status = 'out'",
                           [(status, t, c) for t, c in tasks])

    def task_status(self, task: int, client: str) -> str | None:
        rows = self._query("SELECT status FROM async_tasks WHERE task = ? AND client = ?", (task, client))
        return rows[0][0] if rows else None

    def open_tasks(self) -> list[tuple[int, str, int, int]]:
        return [tuple(r) for r in self._query(  # type: ignore[misc]
            "SELECT task, client, idx, version FROM async_tasks WHERE status = 'out' ORDER BY task, idx")]

    def accept_update(self, task: int, client: str, idx: int, version: int, size: int, digest: str,
                      num_samples: int, num_steps: int, train_loss: float,
                      personal: tuple[int, int] | None = None) -> int:
        """The update counts from here on (one transaction: the acceptance, its buffer row, its
        task's status, the personal counts it reported of its model version); the client hears
        "accepted" only after this. Returns its sequence number."""
        with self._transaction() as db:
            if personal is not None:
                db.execute("INSERT OR REPLACE INTO async_personal VALUES (?, ?, ?, ?)",
                           (version, idx, int(personal[0]), int(personal[1])))
            db.execute("INSERT INTO updates VALUES (?, ?, ?, 'accepted', '', ?, ?, ?, ?, ?)",
                       (task, client, idx, size, digest, num_samples, train_loss, time.time()))
            cur = db.execute("INSERT INTO async_buffer (task, client, idx, version, sha256, num_samples, num_steps, "
                             "train_loss) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (task, client, idx, version, digest, num_samples, num_steps, train_loss))
            db.execute("UPDATE async_tasks SET status = 'accepted' WHERE task = ? AND client = ?", (task, client))
            seq = int(cur.lastrowid or 0)
        return seq

    def personal_counts_by_version(self) -> dict[int, dict[int, tuple[int, int]]]:
        """Every accepted upload's personal counts: {model version: {client index: (correct, total)}}."""
        out: dict[int, dict[int, tuple[int, int]]] = {}
        for version, idx, correct, total in self._query("SELECT version, idx, correct, total FROM async_personal"):
            out.setdefault(int(version), {})[int(idx)] = (int(correct), int(total))
        return out

    def buffered(self) -> list[Entry]:
        """Accepted updates not yet applied, in acceptance order, with their bytes (verified)."""
        rows = self._query("SELECT seq, task, client, idx, version, sha256, num_samples, num_steps, train_loss "
                           "FROM async_buffer WHERE applied < 0 ORDER BY seq")
        out = []
        for seq, task, client, idx, version, digest, n, steps, loss in rows:
            path = self.buffer_file(task, idx)
            blob = path.read_bytes() if path.is_file() else b""
            if hashlib.sha256(blob).hexdigest() != digest:
                raise KoinonError(f"--state {self.folder}: the accepted update {path.name} is missing or damaged; "
                                  "restore the folder from a backup (nothing was changed)")
            out.append(Entry(seq, task, client, idx, version, _unpack(blob), n, steps, loss))
        return out

    def commit_step(self, step: int, checkpoint: Checkpoint, record: dict[str, Any], totals: dict[str, Any],
                    taken: list[Entry]) -> None:
        """Version `step` becomes the truth with the updates it applied, atomically."""
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO rounds VALUES (?, ?)", (step, json.dumps(record)))
            meta = {"round": step, "checkpoint": checkpoint.name, "checkpoint_sha256": checkpoint.sha256, **totals}
            for key, value in meta.items():
                db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))
            db.executemany("UPDATE async_buffer SET applied = ? WHERE seq = ? AND applied < 0",
                           [(step, e.seq) for e in taken])
            db.executemany("UPDATE async_tasks SET status = 'applied' WHERE task = ? AND client = ?",
                           [(e.task, e.client) for e in taken])
            self._flush_refusals(db)
        crash_point("server.stepped", step)
        for old in self.folder.glob("ckpt-*.safetensors"):
            if old.name != checkpoint.name:
                old.unlink(missing_ok=True)
        for e in taken:
            self.buffer_file(e.task, e.idx).unlink(missing_ok=True)

    def applied(self) -> list[tuple[int, str, int]]:
        """(task, client, step) of every applied update, in application order."""
        return [tuple(r) for r in self._query(  # type: ignore[misc]
            "SELECT task, client, applied FROM async_buffer WHERE applied >= 0 ORDER BY applied, seq")]

    # FedAsync mixes models: an update from version v needs the model version v sent.
    def _model_path(self, version: int) -> Path:
        return self.folder / "buffer" / f"model-v{version:06d}.safetensors"

    def save_model(self, version: int, received: torch.Tensor) -> None:
        path = self._model_path(version)
        if not path.is_file():
            tmp = path.with_suffix(".tmp")
            save_file({"received": received.contiguous()}, str(tmp))
            os.replace(tmp, path)

    def load_model(self, version: int) -> torch.Tensor | None:
        path = self._model_path(version)
        return load_file(str(path))["received"] if path.is_file() else None

    def prune_models(self, keep: set[int]) -> None:
        for path in (self.folder / "buffer").glob("model-v*.safetensors"):
            if int(path.stem[len("model-v"):]) not in keep:
                path.unlink(missing_ok=True)


# ----------------------------------------------------------------------- server


@dataclass
class Task:
    """A task out: `client` trains dispatch `task` from model `version`."""

    task: int
    client: str
    idx: int
    version: int
    issued: float  # monotonic


class AlreadyAccepted(Exception):
    """An upload of an update the server already holds (a resend): answered "accepted"."""


class AsyncServer(FederationServer):
    """`FederationServer` with FedBuff / FedAsync steps instead of rounds."""

    def __init__(self, cfg: Config, fed: Any, store: AsyncStore, certs: Path, schedule: Any) -> None:
        super().__init__(cfg, fed, store, certs)
        self.astore = store
        self.schedule = schedule
        self.mixing = float(getattr(schedule, "mixing", 1.0))
        self.fedasync = schedule.name == "fedasync"
        self.buffer_size = 1 if self.fedasync else int(schedule.buffer)
        self.slots = int(schedule.concurrency or cfg.server.clients_per_round)
        self.tasks: dict[str, Task] = {}  # by client name: the task it trains
        self.buffer: list[Entry] = list(store.buffered())
        # Every update told "accepted" must be applied: a restart may not end the run before.
        needed = self.server.round_index + -(-len(self.buffer) // self.buffer_size)
        if cfg.server.rounds < needed:
            raise ConfigError(f"server.rounds = {cfg.server.rounds}: the {len(self.buffer)} accepted updates waiting in "
                              f"{store.folder} need {needed} steps in all to be applied; use server.rounds >= {needed}")
        self.dispatches = int(store.get("async_dispatches", 0))
        self.pending_downlink = int(store.get("async_downlink", 0))
        self.sent: dict[int, tuple[list[tuple[str, bytes]], torch.Tensor]] = {}  # dispatch -> (payloads, received)
        self.received: dict[int, torch.Tensor] = {}  # FedAsync: version -> the model clients got
        # Personal counts by model version, those accepted before a restart included (each
        # version's record is the summary of all of them; merging again is idempotent).
        self.personal.update(store.personal_counts_by_version())
        self.reported: set[int] = set(self.personal)  # versions whose counts may not be in their records yet
        self.stepping = 0  # updates of the step being committed (applied, still in `buffer`)
        version = self.server.round_index
        stale = []
        now = time.monotonic()
        for task, client, idx, v in store.open_tasks():
            if client not in self.members or (self.fedasync and v != version and store.load_model(v) is None):
                stale.append((task, client))
            else:
                self.tasks[client] = Task(task, client, idx, v, now)
        if stale:
            store.end_tasks(stale, "dropped")
        if self.fedasync:
            for v in {t.version for t in self.tasks.values()} | {e.version for e in self.buffer}:
                held = store.load_model(v)
                if held is not None:
                    self.received[v] = held
        if self.tasks or self.buffer:
            log(f"resuming asynchronous training at version {version}: {len(self.tasks)} tasks out, "
                f"{len(self.buffer)} accepted updates waiting")

    # ------------------------------------------------------------------ tasks

    def _task_for(self, member: Member, held_round: int) -> Any:
        """The member's task (handed out again if it asks again: training is deterministic)."""
        if self.evaluating is not None:  # after the last step (koinon.deploy.personal)
            return evaluation_task(self, member)
        task = self.tasks.get(member.name)
        if task is None:
            return None
        if task.task not in self.sent:
            if task.version != self.server.round_index:  # sent before a restart, from an older model
                del self.tasks[member.name]
                self.astore.end_tasks([(task.task, task.client)], "dropped")
                self.changed.notify_all()
                return None
            self.sent[task.task] = self._publish()
        named, _ = self.sent[task.task]
        header = pb.TaskHeader(
            status=pb.TaskHeader.TRAIN, round=task.task, layout_hash=self.layout_hash,
            codec=self.fed.downlink.name, streams=[n for n, _ in named], sizes=[len(p) for _, p in named],
            seed=self.cfg.seed, message=f"task {task.task} from model version {task.version}",
            version=task.version,
        )
        return header, [p for _, p in named]

    def _publish(self) -> tuple[list[tuple[str, bytes]], torch.Tensor]:
        payloads, received, _ = self.server.publish()
        return payloads, received

    def _busy(self) -> set[str]:
        return set(self.tasks) | {e.client for e in self.buffer}

    def _dispatch(self) -> None:
        """Hand out tasks until `concurrency` clients train (or wait in the buffer); locked."""
        free = self.slots - len(self._busy())
        if free <= 0:
            return
        now = time.monotonic()
        busy = self._busy()
        live = sorted((m.idx, m.num_samples, m.name) for m in self.members.values()
                      if m.name not in busy and self._connected(m, now))
        if not live:
            return
        population = np.array([i for i, _, _ in live], dtype=np.int64)
        sizes = np.array([n for _, n, _ in live], dtype=np.int64)
        d = self.dispatches
        chosen = self.server.sample(d, population, sizes, k=min(free, len(live)))
        by_idx = {i: name for i, _, name in live}
        version = self.server.round_index
        payloads, received = self._publish()
        if self.fedasync:
            self.astore.save_model(version, received)
            self.received[version] = received
        self.pending_downlink += sum(len(p) for _, p in payloads) * len(chosen)
        issued = [(d, by_idx[i], i, version) for i in chosen]
        self.astore.issue(issued, d + 1, self.pending_downlink)
        self.dispatches = d + 1
        self.sent[d] = (payloads, received)
        for t, name, i, v in issued:
            self.tasks[name] = Task(t, name, i, v, now)
        self.changed.notify_all()
        log(f"dispatch {d}: clients {chosen} train from model version {version}")

    def _expire(self) -> None:
        """Tasks past deploy.round_timeout_s free their slots; their uploads will be late."""
        limit = self.cfg.deploy.round_timeout_s
        now = time.monotonic()
        gone = [t for t in self.tasks.values() if now - t.issued > limit
                and not getattr(self.members.get(t.client), "uploading", False)]
        if gone:
            for t in gone:
                del self.tasks[t.client]
            self.astore.end_tasks([(t.task, t.client) for t in gone], "expired")
            log(f"tasks timed out after {limit} s: {', '.join(f'{t.client} (task {t.task})' for t in gone)}")

    # ----------------------------------------------------------------- upload

    def _admit_task(self, task_index: int, member: Member) -> Task:
        """The member's task `task_index`, or why its upload is refused; locked."""
        task = self.tasks.get(member.name)
        if task is not None and task.task == task_index:
            # The steps left take (steps left) x buffer updates: one more would never be applied.
            waiting = len(self.buffer) - self.stepping
            if waiting >= (self.cfg.server.rounds - self.server.round_index) * self.buffer_size:
                raise Late(f"late: the updates waiting fill the steps left of the {self.cfg.server.rounds}")
            return task
        status = self.astore.task_status(task_index, member.name)
        if status in ("accepted", "applied"):
            raise AlreadyAccepted(f"task {task_index}: this update was already accepted; counted once")
        if status in ("expired", "dropped"):
            raise Late(f"late: task {task_index} was {status} ({'past deploy.round_timeout_s' if status == 'expired' else 'its model is gone after a restart'})")
        now = f"its task is {task.task}" if task is not None else "it has no task now"
        if status is None:
            raise Rejected(f"unknown task {task_index}: not handed to client {member.name} ({now})")
        raise Rejected(f"task {task_index} is not open ({now})")

    def _receive(self, request_iterator: Any, member: Member, claimed: list[int], uploading: list[bool],
                 cert_pem: bytes | None = None) -> Any:
        def admit(header: Any) -> None:
            claimed.append(int(header.round))
            self._check_header(header, member)  # the same header checks as a round's upload
            if why := check_counts(int(header.personal_correct), int(header.personal_total),
                                   split_size(self.fed, member.idx)):
                raise Rejected(why)
            if self.evaluating is not None and header.round == self.evaluating and not any(header.sizes):
                raise Reported(take_report(self, member, header))  # an EVALUATE answer, no update
            with self.lock:
                self._admit_task(int(header.round), member)
                if member.uploading:
                    raise Rejected("duplicate submission: another upload from this client is in progress")
                member.uploading = True
                uploading.append(True)

        slot: list[bool] = []

        def take_slot() -> None:
            if not self.receiving.acquire(timeout=self.cfg.deploy.round_timeout_s):
                raise Rejected("server busy: no upload slot within the deadline")
            slot.append(True)

        steps = self.local.num_steps(member.num_samples)
        try:
            try:
                try:
                    header, payloads = read_upload(request_iterator, self.limits, admit, take_slot)
                except (Rejected, AlreadyAccepted):
                    raise
                except Exception as exc:  # noqa: BLE001 - a cancelled or broken stream
                    raise Rejected(f"upload stream ended early ({type(exc).__name__})") from None
                task_index = int(header.round)
                # Validated as the step will decode it (outside the lock; pure).
                self.server.decode(member.idx, payloads, steps, self.server.round_index)
                size, digest = self.astore.write_buffer(task_index, member.idx, payloads)
            finally:
                if slot:
                    self.receiving.release()
        except AlreadyAccepted as exc:
            log(f"client {member.name}: {exc}")
            return pb.UploadReply(accepted=True, reason=str(exc))
        except Reported as exc:
            return pb.UploadReply(accepted=not str(exc), reason=str(exc))
        except Rejected as exc:
            return self._refuse_update(member, claimed[0] if claimed else -1, str(exc),
                                       "late" if isinstance(exc, Late) else "rejected")
        with self.lock:
            try:
                task = self._admit_task(task_index, member)  # it may have expired meanwhile
            except AlreadyAccepted as exc:  # not reachable while `uploading` guards it; kept total
                return pb.UploadReply(accepted=True, reason=str(exc))
            except Rejected as exc:
                self.astore.buffer_file(task_index, member.idx).unlink(missing_ok=True)
                return self._refuse_update(member, task_index, str(exc),
                                           "late" if isinstance(exc, Late) else "rejected")
            counts = ((int(header.personal_correct), int(header.personal_total))
                      if int(header.personal_total) > 0 else None)
            seq = self.astore.accept_update(task_index, member.name, member.idx, task.version, size, digest,
                                            member.num_samples, steps, float(header.train_loss), counts)
            crash_point("server.async_accepted", task_index)
            del self.tasks[member.name]
            # Its personal counts score the task's model version (stored with the acceptance, so a
            # restart keeps them: `personal_counts_by_version`).
            if counts is not None:
                self.personal.setdefault(task.version, {})[member.idx] = (int(header.personal_correct),
                                                                          int(header.personal_total))
                self.reported.add(task.version)
            self.buffer.append(Entry(seq, task_index, member.name, member.idx, task.version, payloads,
                                     member.num_samples, steps, float(header.train_loss)))
            self.changed.notify_all()
        return pb.UploadReply(accepted=True)

    def _refuse_update(self, member: Member, task_index: int, reason: str, status: str) -> Any:
        stored = self.store.reject(task_index, member.name, member.idx, status, reason, 0, self.server.round_index)
        if stored:
            log(f"task {task_index}: {'discarded late' if status == 'late' else 'rejected'} update from "
                f"{member.name}: {reason}")
        return pb.UploadReply(accepted=False, reason=reason)

    # ------------------------------------------------------------------ steps

    def _take(self) -> list[Entry] | None:
        """The next step's updates once the buffer is full; locked."""
        if len(self.buffer) < self.buffer_size:
            return None
        return self.buffer[: self.buffer_size]

    def _step(self, taken: list[Entry], start: float) -> None:
        """Apply `taken` as one server step (the simulation's code), checkpoint, commit."""
        with self.lock:
            version = self.server.round_index
            updates = []
            for e in sorted(taken, key=lambda e: (e.task, e.idx)):
                tau = version - e.version
                weight = self.schedule.staleness(tau)
                offset = None
                if self.fedasync:
                    weight *= self.mixing
                    offset = self.received[e.version] - self.server.params if tau else None
                updates.append(Buffered(e.idx, e.payloads, e.num_samples, e.train_loss, weight, e.num_steps,
                                        None, offset))
            result = self.server.apply_buffered(updates, self.pending_downlink)
            self.stepping = len(taken)
            self.pending_downlink = 0
        s = self.cfg.server
        step = result.round
        if step % s.eval_every == 0 or step == s.rounds:
            self.fed.evaluate_into(result)
            # The server holds no client state: its personal_accuracy_* would score empty states.
            drop_server_figures(result.extra)
        result.extra["staleness_max"] = float(max(version - e.version for e in taken))
        result.wall_s = round(self.wall_offset + time.perf_counter() - start, 4)
        record = result.as_dict()
        ckpt = self.store.write_checkpoint(step, self.fed.state_dict())
        self.astore.commit_step(step, ckpt, record, {
            "uplink_total": self.fed.uplink_total, "downlink_total": self.fed.downlink_total,
            "wall_s": record["wall_s"], "async_downlink": 0,
        }, taken)
        with self.lock:
            done = {e.seq for e in taken}
            self.buffer = [e for e in self.buffer if e.seq not in done]
            self.stepping = 0
            self.sent = {d: v for d, v in self.sent.items() if any(t.task == d for t in self.tasks.values())}
            if self.fedasync:
                keep = {t.version for t in self.tasks.values()} | {e.version for e in self.buffer}
                self.received = {v: m for v, m in self.received.items() if v in keep}
                self.astore.prune_models(keep | {self.server.round_index})
            self.changed.notify_all()
        self._merge_personal()
        self._write_metrics()
        acc = record["test_accuracy"]
        log(f"step {step}/{s.rounds}: {result.num_clients} updates applied (staleness "
            f"{[version - e.version for e in taken]})" + (f", accuracy {acc:.4f}" if acc is not None else "")
            + (f"; {result.refused}" if result.refused else ""))

    def _merge_personal(self) -> None:
        """The clients' personal counts of each model version into that version's record (as
        rounds do; a version's figures grow as its tasks' updates arrive)."""
        with self.lock:
            versions = sorted(v for v in self.reported if v <= self.server.round_index)
            self.reported -= set(versions)
            figures = {v: summarize_counts(self.personal[v]) for v in versions}
        for v, values in figures.items():
            if values:
                self.store.merge_record(v, values)

    def run_rounds(self) -> None:
        """Serve tasks and step the model until `server.rounds` steps are committed."""
        start = time.perf_counter()
        total = self.cfg.server.rounds
        d = self.cfg.deploy
        # The first dispatch (after a restart too) waits for the clients, as a round does: a
        # dispatch to the first client back would split the cohort and change the seeds' groups.
        give_up = time.monotonic() + d.wait_clients_s
        with self.lock:
            while (sum(self._connected(m, time.monotonic()) for m in self.members.values()) < self.min_connected
                   and time.monotonic() < give_up):
                self.changed.wait(min(1.0, max(give_up - time.monotonic(), 0.01)))
        idle_since = time.monotonic()
        while self.fed.round_index < total:
            with self.lock:
                taken = self._take()
                if taken is None:
                    self._expire()
                    self._dispatch()
                    if self.tasks:
                        idle_since = time.monotonic()
                    elif time.monotonic() - idle_since > d.wait_clients_s:
                        raise KoinonError(f"no client took a task within deploy.wait_clients_s = {d.wait_clients_s} s "
                                          f"({len(self.buffer)} accepted updates wait in the buffer); state is saved, "
                                          "restart the server to go on")
                    self.changed.wait(0.5)
                    continue
            self._step(taken, start)
        self._merge_personal()
        final_evaluation(self)  # the last version's personal metrics, from the clients
        with self.lock:
            self.finished = True
            self.changed.notify_all()

