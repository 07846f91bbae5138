"""The server's durable state: SQLite for the bookkeeping, safetensors files for the tensors.

What a SIGKILL at any moment must not break, and how:
- A round is committed by one SQLite transaction that names its checkpoint file; the file is
  written (and fsynced) *before* the transaction. A crash before the commit leaves the previous
  round's checkpoint as the truth (an orphan file is overwritten later), a crash after it the
  new one: a round is never lost once committed and never applied twice.
- The open round's cohort is stored when the round opens, so a restarted server asks the
  same clients. Every accepted upload is written to `pending/` and then recorded in the same
  transaction as its acceptance, before the client is told; after a restart the round goes on
  with those updates (a pending file that does not match its recorded hash is dropped and its
  client asked again).
- WAL journaling: readers never block the writer and a torn write cannot corrupt the database.

What it refuses rather than repairs (one line naming the file and what to do; nothing deleted):
a folder that holds a run (checkpoints, metrics, pending uploads) but no usable `state.db`
(missing, empty, or a database of no run: starting over there would overwrite the run), a
damaged `state.db` (`PRAGMA quick_check`), and a committed checkpoint that is missing, unreadable
or whose SHA-256 differs from the one recorded when its round was committed.

Refusals are bounded: a reason is stored cut to `MAX_REASON` characters, and per client and
round at most `REFUSALS_KEPT` refusals (and `REFUSAL_BYTES_KEPT` bytes of reasons) are stored;
the rest are only counted (`refusals_suppressed`, written with the round's commit), so a client
sending refused uploads in a loop cannot fill the disk.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from koinon.deploy.faults import crash_point
from koinon.errors import KoinonError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS clients (
    name TEXT PRIMARY KEY, idx INTEGER NOT NULL, num_samples INTEGER NOT NULL,
    data_spec TEXT NOT NULL, joined REAL NOT NULL);
CREATE TABLE IF NOT EXISTS open_round (
    round INTEGER PRIMARY KEY, cohort TEXT NOT NULL, opened REAL NOT NULL);
CREATE TABLE IF NOT EXISTS updates (
    round INTEGER NOT NULL, client TEXT NOT NULL, idx INTEGER NOT NULL, status TEXT NOT NULL,
    reason TEXT NOT NULL, bytes INTEGER NOT NULL, sha256 TEXT NOT NULL, num_samples INTEGER NOT NULL,
    train_loss REAL NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS updates_round ON updates (round, status);
CREATE TABLE IF NOT EXISTS rounds (round INTEGER PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS personal_counts (
    round INTEGER NOT NULL, idx INTEGER NOT NULL, correct INTEGER NOT NULL, total INTEGER NOT NULL,
    PRIMARY KEY (round, idx));
CREATE TABLE IF NOT EXISTS refusals_suppressed (
    client TEXT NOT NULL, round INTEGER NOT NULL, count INTEGER NOT NULL, bytes INTEGER NOT NULL,
    PRIMARY KEY (client, round));
"""

MAX_REASON = 300  # characters of a refusal reason that are stored and logged
REFUSALS_KEPT = 20  # refusals stored per client and round; more are counted only
REFUSAL_BYTES_KEPT = 4096  # bytes of reasons stored per client and round


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint file on disk and the SHA-256 of its bytes (recorded when its round commits)."""

    name: str
    sha256: str


@dataclass(frozen=True)
class PendingUpdate:
    """An accepted upload of the open round, as recorded."""

    client: str
    idx: int
    payloads: list[bytes]
    num_samples: int
    train_loss: float


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store:
    """`--state DIR`: `state.db`, `ckpt-*.safetensors`, `pending/`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        try:
            folder.mkdir(parents=True, exist_ok=True)
            # One server per state folder: a second one would commit rounds of its own and
            # delete the first one's checkpoints. The OS drops the lock when the process dies.
            self._lock_file = open(folder / "server.lock", "w")  # noqa: SIM115 - held until close()
        except OSError as exc:
            raise KoinonError(f"--state {folder}: cannot use it as a state folder ({exc.strerror})") from None
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            raise KoinonError(f"--state {folder} is in use by another running server") from None
        try:
            self._open_db()
        except BaseException:
            self._lock_file.close()
            raise
        (folder / "pending").mkdir(exist_ok=True)
        # One connection serves every thread; a transaction belongs to the connection, so
        # statements from other threads must not interleave with one: all go through this lock.
        self._sql = threading.RLock()
        self._refusals: dict[tuple[str, int], list[int]] = {}  # (client, round) -> [count, bytes]
        self._clear_garbage()

    def _run_files(self) -> list[str]:
        """Files that show this folder holds a run (what starting over would overwrite)."""
        found = [p.name for p in sorted(self.folder.glob("ckpt-*.safetensors"))]
        found += [name for name in ("metrics.jsonl", "summary.json", "state.db-wal")
                  if (self.folder / name).is_file()]
        found += [f"pending/{p.name}" for p in sorted(self.folder.glob("pending/*.bin"))]
        return found

    def _refuse_start_over(self, what: str, found: list[str]) -> KoinonError:
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        return KoinonError(f"--state {self.folder}: state.db {what}, but the folder holds a run ({shown}); "
                           "refusing to start over in it: restore state.db from a backup, or use a new "
                           "--state folder (nothing was changed)")

    def _open_db(self) -> None:
        """Open `state.db`, or refuse a missing, empty, damaged or foreign one next to a run."""
        path = self.folder / "state.db"
        found = self._run_files()
        if found and (not path.is_file() or path.stat().st_size == 0):
            raise self._refuse_start_over("is missing" if not path.is_file() else "is empty", found)
        damaged = (f"--state {self.folder}: state.db is damaged ({{}}); restore it from a backup or use "
                   "a new --state folder (nothing was changed)")
        # One connection shared by the server's threads, serialized by the server's lock.
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        try:
            check = db.execute("PRAGMA quick_check").fetchall()
            if check != [("ok",)]:
                raise KoinonError(damaged.format(" ".join(str(check[0][0]).split())[:200]))
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            holds_run = bool(db.execute("SELECT 1 FROM meta UNION ALL SELECT 1 FROM open_round UNION ALL "
                                        "SELECT 1 FROM updates LIMIT 1").fetchall())
            if found and not holds_run:
                raise self._refuse_start_over("holds no run", found)
        except sqlite3.Error as exc:
            db.close()
            raise KoinonError(damaged.format(" ".join(str(exc).split())[:200])) from None
        except KoinonError:
            db.close()
            raise
        self.db = db

    def _clear_garbage(self) -> None:
        """Pending files of committed rounds (a kill between a commit and its clean-up leaves
        them) and half-written files: never part of the truth."""
        committed = int(self.get("round", 0))
        for path in (self.folder / "pending").iterdir():
            head = path.name[1:7]
            if path.suffix == ".tmp" or (head.isdigit() and int(head) < committed):
                path.unlink(missing_ok=True)

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._sql:
            return self.db.execute(sql, args).fetchall()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._sql:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def close(self) -> None:
        with self._sql:
            self.db.close()
        self._lock_file.close()

    # ------------------------------------------------------------------ meta

    def get(self, key: str, default: Any = None) -> Any:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return default if not rows else json.loads(rows[0][0])

    def put(self, key: str, value: Any) -> None:
        self._query("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    # --------------------------------------------------------------- clients

    def clients(self) -> dict[str, tuple[int, int, str]]:
        rows = self._query("SELECT name, idx, num_samples, data_spec FROM clients")
        return {name: (idx, n, spec) for name, idx, n, spec in rows}

    def save_client(self, name: str, idx: int, num_samples: int, data_spec: str) -> None:
        self._query("INSERT OR REPLACE INTO clients VALUES (?, ?, ?, ?, ?)",
                    (name, idx, num_samples, data_spec, time.time()))

    def forget_client(self, name: str) -> None:
        self._query("DELETE FROM clients WHERE name = ?", (name,))

    # ---------------------------------------------------------------- rounds

    def open_round(self) -> tuple[int, list[int]] | None:
        rows = self._query("SELECT round, cohort FROM open_round")
        return None if not rows else (int(rows[0][0]), json.loads(rows[0][1]))

    def begin_round(self, round_index: int, cohort: list[int]) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM open_round")
            db.execute("INSERT INTO open_round VALUES (?, ?, ?)", (round_index, json.dumps(cohort), time.time()))

    def _pending_path(self, round_index: int, idx: int) -> Path:
        return self.folder / "pending" / f"r{round_index:06d}-c{idx}.bin"

    def write_pending(self, round_index: int, idx: int, payloads: list[bytes]) -> tuple[int, str]:
        """Put an upload's bytes in `pending/` (not yet counted); returns (size, sha256).

        Done outside the server's lock, so large files do not serialize other clients' calls;
        the upload counts only once `record_accepted` has committed its row.
        """
        path = self._pending_path(round_index, idx)
        tmp = path.with_suffix(".tmp")
        digest, size = hashlib.sha256(), 0
        with tmp.open("wb") as f:  # written piece by piece: no second copy of a large payload
            for piece in (_pack_head(payloads), *payloads):
                f.write(piece)
                digest.update(piece)
                size += len(piece)
        os.replace(tmp, path)
        return size, digest.hexdigest()

    def open_pending(self, round_index: int, idx: int, sizes: list[int]) -> PendingWriter:
        """A pending file written while the upload streams in: `write_pending` for payloads of
        `sizes` bytes that arrive chunk by chunk (hashed and written as they come, so the bytes
        are not passed over a second time once received). Nothing is visible under the final
        name before `PendingWriter.finish`; `PendingWriter.abort` removes the partial file."""
        return PendingWriter(self._pending_path(round_index, idx), sizes)

    def drop_pending(self, round_index: int, idx: int) -> None:
        self._pending_path(round_index, idx).unlink(missing_ok=True)

    def record_accepted(self, round_index: int, client: str, idx: int, size: int, digest: str,
                        num_samples: int, train_loss: float, personal: tuple[int, int] | None = None) -> None:
        """The upload counts from here on; the client hears "accepted" only after this.
        `personal`: the (correct, total) the upload reported (koinon.deploy.personal), kept with
        it in the same transaction so that a restart that takes the upload back has them too."""
        with self._transaction() as db:
            db.execute("INSERT INTO updates VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (round_index, client, idx, "accepted", "", size, digest, num_samples, train_loss,
                        time.time()))
            if personal is not None:
                db.execute("INSERT OR REPLACE INTO personal_counts VALUES (?, ?, ?, ?)",
                           (round_index, idx, int(personal[0]), int(personal[1])))

    def personal_counts(self, round_index: int) -> dict[int, tuple[int, int]]:
        """The (correct, total) reported with the open round's accepted uploads, by client index."""
        rows = self._query(
            "SELECT p.idx, p.correct, p.total FROM personal_counts p JOIN updates u "
            "ON u.round = p.round AND u.idx = p.idx AND u.status = 'accepted' WHERE p.round = ?",
            (round_index,))
        return {int(idx): (int(c), int(t)) for idx, c, t in rows}

    def accept(self, round_index: int, client: str, idx: int, payloads: list[bytes],
               num_samples: int, train_loss: float) -> None:
        """`write_pending` + `record_accepted` in one go."""
        size, digest = self.write_pending(round_index, idx, payloads)
        self.record_accepted(round_index, client, idx, size, digest, num_samples, train_loss)

    def reject(self, round_index: int, client: str, idx: int, status: str, reason: str, nbytes: int,
               window: int) -> bool:
        """Record a refusal (its reason cut to `MAX_REASON`); `window` is the server's round. Past
        the per-client budget of that round it is only counted: returns whether it was stored."""
        reason = reason[:MAX_REASON]
        with self._sql:
            # [stored, bytes stored, counted only, their bytes]
            used = self._refusals.setdefault((client, window), [0, 0, 0, 0])
            if used[0] >= REFUSALS_KEPT or used[1] + len(reason) > REFUSAL_BYTES_KEPT:
                used[2] += 1
                used[3] += len(reason)
                return False
            used[0] += 1
            used[1] += len(reason)
            self._log(round_index, client, idx, status, reason, nbytes, "", 0, 0.0)
        return True

    def suppressed(self) -> dict[str, int]:
        """Refusals counted but not stored, by client (committed rounds and the current one)."""
        with self._sql:
            out: dict[str, int] = {}
            for client, n in self._query("SELECT client, SUM(count) FROM refusals_suppressed GROUP BY client"):
                out[client] = int(n)
            for (client, _), (_, _, count, _) in self._refusals.items():
                if count:
                    out[client] = out.get(client, 0) + count
        return out

    def _flush_refusals(self, db: sqlite3.Connection) -> None:
        for (client, window), (_, _, count, nbytes) in self._refusals.items():
            if count:
                db.execute("INSERT INTO refusals_suppressed VALUES (?, ?, ?, ?) ON CONFLICT (client, round) "
                           "DO UPDATE SET count = count + excluded.count, bytes = bytes + excluded.bytes",
                           (client, window, count, nbytes))
        self._refusals.clear()

    def _log(self, round_index: int, client: str, idx: int, status: str, reason: str, nbytes: int,
             digest: str, num_samples: int, train_loss: float) -> None:
        with self._transaction() as db:
            db.execute("INSERT INTO updates VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (round_index, client, idx, status, reason, nbytes, digest, num_samples,
                        train_loss, time.time()))

    def pending(self, round_index: int) -> list[PendingUpdate]:
        """The open round's accepted uploads whose files are intact; broken ones are forgotten."""
        rows = self._query(
            "SELECT client, idx, sha256, num_samples, train_loss FROM updates "
            "WHERE round = ? AND status = 'accepted' ORDER BY idx", (round_index,))
        out = []
        for client, idx, digest, n, loss in rows:
            path = self._pending_path(round_index, idx)
            blob = path.read_bytes() if path.is_file() else b""
            if hashlib.sha256(blob).hexdigest() != digest:
                with self._transaction() as db:
                    db.execute("UPDATE updates SET status = 'lost', reason = 'pending file "
                                    "missing or damaged after a restart' WHERE round = ? AND idx = ? "
                                    "AND status = 'accepted'", (round_index, idx))
                continue
            out.append(PendingUpdate(client, idx, _unpack(blob), n, loss))
        return out

    def last_accepted(self, client: str) -> int:
        """The last round for which an upload of `client` is held as accepted (-1: none)."""
        rows = self._query("SELECT MAX(round) FROM updates WHERE client = ? AND status = 'accepted'", (client,))
        return -1 if not rows or rows[0][0] is None else int(rows[0][0])

    def counts(self) -> dict[str, int]:
        rows = self._query("SELECT status, COUNT(*) FROM updates GROUP BY status")
        return {status: n for status, n in rows}

    def write_checkpoint(self, round_index: int, tensors: dict[str, torch.Tensor]) -> Checkpoint:
        """The tensors of committed round `round_index`, durably on disk, and their SHA-256."""
        name = f"ckpt-{round_index:06d}.safetensors"
        tmp = self.folder / f".{name}.tmp"
        save_file(tensors, str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        digest = _file_sha256(tmp)
        os.replace(tmp, self.folder / name)
        _fsync_dir(self.folder)
        return Checkpoint(name, digest)

    def commit_round(self, round_index: int, checkpoint: Checkpoint, record: dict[str, Any],
                     totals: dict[str, Any]) -> None:
        """Round `round_index` (1-based count of rounds done) becomes the truth, atomically."""
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO rounds VALUES (?, ?)", (round_index, json.dumps(record)))
            db.execute("DELETE FROM open_round")
            meta = {"round": round_index, "checkpoint": checkpoint.name,
                    "checkpoint_sha256": checkpoint.sha256, **totals}
            for key, value in meta.items():
                db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))
            self._flush_refusals(db)
        crash_point("server.committed", round_index)
        # Only now are the older files garbage.
        for old in self.folder.glob("ckpt-*.safetensors"):
            if old.name != checkpoint.name:
                old.unlink(missing_ok=True)
        for old in (self.folder / "pending").glob(f"r{round_index - 1:06d}-*"):
            old.unlink(missing_ok=True)

    def load_checkpoint(self) -> dict[str, torch.Tensor] | None:
        """The last committed round's tensors (None on a fresh folder), verified against the
        SHA-256 recorded at its commit; a missing or damaged file is refused in one line."""
        name = self.get("checkpoint")
        if name is None:
            return None
        path = self.folder / name
        todo = ("restore it from a backup (its SHA-256 is in state.db, meta 'checkpoint_sha256'), "
                "or use a new --state folder")
        if not path.is_file():
            raise KoinonError(f"--state {self.folder}: checkpoint {name} of committed round "
                              f"{self.get('round')} is missing; {todo}")
        expected = self.get("checkpoint_sha256")
        if expected is not None:
            digest = _file_sha256(path)
            if digest != expected:
                raise KoinonError(f"--state {self.folder}: checkpoint {name} is damaged (SHA-256 "
                                  f"{digest[:16]}..., recorded {expected[:16]}...); {todo}")
        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - safetensors raises several kinds on bad bytes
            raise KoinonError(f"--state {self.folder}: checkpoint {name} cannot be read "
                              f"({type(exc).__name__}); {todo}") from None

    def merge_record(self, round_index: int, values: dict[str, Any]) -> None:
        """Add `values` to the committed record of round `round_index` (1-based count), e.g. the
        clients' personal metrics of its model, which arrive with the next round's uploads."""
        with self._transaction() as db:
            rows = db.execute("SELECT record FROM rounds WHERE round = ?", (round_index,)).fetchall()
            if rows:
                record = json.loads(rows[0][0])
                record.update(values)
                db.execute("INSERT OR REPLACE INTO rounds VALUES (?, ?)", (round_index, json.dumps(record)))

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(r[0]) for r in self._query("SELECT record FROM rounds ORDER BY round")]


class PendingWriter:
    """One pending file being written as its upload arrives; see `Store.open_pending`.
    The same file, size and SHA-256 as `Store.write_pending` with the whole payloads."""

    def __init__(self, path: Path, sizes: list[int]) -> None:
        self.path = path
        self.tmp = path.with_suffix(".tmp")
        self.digest = hashlib.sha256()
        self.size = 0
        self.file = self.tmp.open("wb")
        self.write(_pack_sizes(sizes))

    def write(self, chunk: bytes) -> None:
        # hashlib and the file write release the GIL on large buffers: other uploads go on.
        self.file.write(chunk)
        self.digest.update(chunk)
        self.size += len(chunk)

    def finish(self) -> tuple[int, str]:
        """Put the file under its final name; returns (size, sha256) as `write_pending` does."""
        self.file.close()
        os.replace(self.tmp, self.path)
        return self.size, self.digest.hexdigest()

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _pack_head(payloads: list[bytes]) -> bytes:
    """A pending file holds a count, the payload sizes (u64 each), then the payloads."""
    return _pack_sizes([len(p) for p in payloads])


def _pack_sizes(sizes: list[int]) -> bytes:
    return len(sizes).to_bytes(8, "little") + b"".join(n.to_bytes(8, "little") for n in sizes)


def _unpack(blob: bytes) -> list[bytes]:
    n = int.from_bytes(blob[:8], "little")
    sizes = [int.from_bytes(blob[8 + 8 * i : 16 + 8 * i], "little") for i in range(n)]
    out, offset = [], 8 + 8 * n
    for size in sizes:
        out.append(blob[offset : offset + size])
        offset += size
    return out
