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
"""


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
            (folder / "pending").mkdir(exist_ok=True)
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
            # One connection shared by the server's threads, serialized by the server's lock.
            self.db = sqlite3.connect(folder / "state.db", check_same_thread=False, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            self._lock_file.close()
            raise KoinonError(f"--state {folder}: state.db is not a usable SQLite database ({exc})") from None
        # One connection serves every thread; a transaction belongs to the connection, so
        # statements from other threads must not interleave with one: all go through this lock.
        self._sql = threading.RLock()

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

    def drop_pending(self, round_index: int, idx: int) -> None:
        self._pending_path(round_index, idx).unlink(missing_ok=True)

    def record_accepted(self, round_index: int, client: str, idx: int, size: int, digest: str,
                        num_samples: int, train_loss: float) -> None:
        """The upload counts from here on; the client hears "accepted" only after this."""
        self._log(round_index, client, idx, "accepted", "", size, digest, num_samples, train_loss)

    def accept(self, round_index: int, client: str, idx: int, payloads: list[bytes],
               num_samples: int, train_loss: float) -> None:
        """`write_pending` + `record_accepted` in one go."""
        size, digest = self.write_pending(round_index, idx, payloads)
        self.record_accepted(round_index, client, idx, size, digest, num_samples, train_loss)

    def reject(self, round_index: int, client: str, idx: int, status: str, reason: str, nbytes: int) -> None:
        self._log(round_index, client, idx, status, reason, nbytes, "", 0, 0.0)

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

    def write_checkpoint(self, round_index: int, tensors: dict[str, torch.Tensor]) -> str:
        """The tensors of committed round `round_index`, durably on disk; returns the file name."""
        name = f"ckpt-{round_index:06d}.safetensors"
        tmp = self.folder / f".{name}.tmp"
        save_file(tensors, str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.folder / name)
        _fsync_dir(self.folder)
        return name

    def commit_round(self, round_index: int, checkpoint: str, record: dict[str, Any],
                     totals: dict[str, Any]) -> None:
        """Round `round_index` (1-based count of rounds done) becomes the truth, atomically."""
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO rounds VALUES (?, ?)", (round_index, json.dumps(record)))
            db.execute("DELETE FROM open_round")
            for key, value in {"round": round_index, "checkpoint": checkpoint, **totals}.items():
                db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))
        # Only now are the older files garbage.
        for old in self.folder.glob("ckpt-*.safetensors"):
            if old.name != checkpoint:
                old.unlink(missing_ok=True)
        for old in (self.folder / "pending").glob(f"r{round_index - 1:06d}-*"):
            old.unlink(missing_ok=True)

    def load_checkpoint(self) -> dict[str, torch.Tensor] | None:
        name = self.get("checkpoint")
        return None if name is None else load_file(str(self.folder / name))

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(r[0]) for r in self._query("SELECT record FROM rounds ORDER BY round")]


def _pack_head(payloads: list[bytes]) -> bytes:
    """A pending file holds a count, the payload sizes (u64 each), then the payloads."""
    return len(payloads).to_bytes(8, "little") + b"".join(len(p).to_bytes(8, "little") for p in payloads)


def _unpack(blob: bytes) -> list[bytes]:
    n = int.from_bytes(blob[:8], "little")
    sizes = [int.from_bytes(blob[8 + 8 * i : 16 + 8 * i], "little") for i in range(n)]
    out, offset = [], 8 + 8 * n
    for size in sizes:
        out.append(blob[offset : offset + size])
        offset += size
    return out
