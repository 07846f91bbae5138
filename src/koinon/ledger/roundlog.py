"""The verifiable round log: canonical JSON entries in an RFC 6962 Merkle tree, Ed25519-signed heads.

Files (in a run folder's `ledger/`): `log.jsonl` holds one entry per line, and the bytes of a
line are exactly the bytes hashed into the tree; `heads.jsonl` holds the server's signed tree
head after every entry (`{"size", "root", "signature"}`), so a changed, dropped or reordered
entry is caught at that entry. An entry is canonical JSON (sorted keys, no spaces, UTF-8) with
integers and strings only: scores and amounts are fixed-point integers, never floats, so every
party serializes and hashes the same bytes. Each entry carries its position (`seq`).

Keys are Ed25519 (`cryptography`). The server's signing key is random (`new_server_key`), kept in
the private file `ledger/server_key.pem` (mode 0600, never in the log; do not publish it with the
run) and its public key is in the log's `open` entry: a verifier pins it (`koinon verify RUN
--server-key HEX`), since whoever holds a key can re-sign a whole log. Client receipt keys: in
simulation they derive from the run's seed (`simulated_key`, marked `"client_key": "simulated"`),
so anyone who knows the seed can sign for them and they check the plumbing, not identity; in a
deployment clients do not sign yet and receipts are server-attested only (`"client_key":
"server-attested"`: the server's signature alone).

A client keeps the signed head it was shown with its receipt; `inclusion` proves the receipt is
in the tree of that size and `consistency` proves that tree is a prefix of the final one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

from koinon.errors import KoinonError
from koinon.ledger import merkle

SERVER_KEY_FILE = "server_key.pem"
"""The server's private signing key in a run's `ledger/` folder (mode 0600; never in the log)."""


def canonical(entry: dict[str, Any]) -> bytes:
    """The one byte form of an entry: sorted keys, no whitespace, UTF-8; floats are refused."""
    _refuse_floats(entry, "entry")
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _refuse_floats(value: Any, where: str) -> None:
    if isinstance(value, float):
        raise TypeError(f"{where} holds the float {value!r}: log fixed-point integers or strings")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where} has a non-string key {k!r}")
            _refuse_floats(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _refuse_floats(v, f"{where}[{i}]")


def simulated_key(seed: int, role: str, index: int = 0) -> Ed25519PrivateKey:
    """A simulated party's key, derived from the run's seed (see the module docstring)."""
    material = hashlib.sha256(f"koinon-ledger/{seed}/{role}/{index}".encode()).digest()
    return Ed25519PrivateKey.from_private_bytes(material)


def new_server_key(folder: Path) -> Ed25519PrivateKey:
    """A fresh random server key, written to `folder/server_key.pem` (mode 0600)."""
    key = Ed25519PrivateKey.generate()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / SERVER_KEY_FILE
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    return key


def load_server_key(folder: Path) -> Ed25519PrivateKey:
    """The server key `new_server_key` wrote into `folder`."""
    key = load_pem_private_key((folder / SERVER_KEY_FILE).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise KoinonError(f"{folder / SERVER_KEY_FILE}: not an Ed25519 key")
    return key


def public_hex(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def verify_signature(public: str, signature: str, message: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public)).verify(bytes.fromhex(signature), message)
    except (InvalidSignature, ValueError):
        return False
    return True


def head_message(size: int, root: str) -> bytes:
    """What a tree head's signature covers."""
    return canonical({"log": "koinon-round-log/1", "root": root, "size": size})


@dataclass(frozen=True)
class TreeHead:
    size: int
    root: str  # hex
    signature: str  # hex, by the log's server key over `head_message`

    def verify(self, server_key: str) -> bool:
        return verify_signature(server_key, self.signature, head_message(self.size, self.root))


class RoundLog:
    """An append-only log written to `folder` (`log.jsonl`, `heads.jsonl`) as entries arrive."""

    def __init__(self, folder: Path, server_key: Ed25519PrivateKey) -> None:
        self.folder = folder
        self.key = server_key
        self.leaves: list[bytes] = []
        self.frontier = merkle.Frontier()
        self.heads: list[TreeHead] = []
        self._files: tuple[BinaryIO, BinaryIO] | None = None
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "log.jsonl").write_bytes(b"")
        (folder / "heads.jsonl").write_bytes(b"")

    @classmethod
    def reopen(cls, folder: Path, server_key: Ed25519PrivateKey, keep: Callable[[list[dict[str, Any]]], int]) -> RoundLog:
        """The log in `folder` after a restart, cut back to the first `keep(entries)` entries.

        The lines written so far are read up to the first torn one (a crash mid-write leaves a
        line without its newline, or a head missing); `keep` sees the entries of that intact
        prefix and says how many of them stand (the caller drops what an uncommitted round
        logged). The signed head of the last kept entry must verify with `server_key` and match
        the Merkle root recomputed from the kept lines, every kept entry must sit at its `seq`;
        then both files are rewritten to that prefix (atomically) and appending goes on."""
        log = cls.__new__(cls)
        log.folder, log.key = folder, server_key
        log.leaves, log.frontier, log.heads, log._files = [], merkle.Frontier(), [], None
        data = (folder / "log.jsonl").read_bytes() if (folder / "log.jsonl").is_file() else b""
        lines = data.split(b"\n")[:-1]  # the last piece has no newline: torn (or empty)
        heads: list[TreeHead] = []
        for raw in ((folder / "heads.jsonl").read_bytes() if (folder / "heads.jsonl").is_file() else b"").split(b"\n")[:-1]:
            try:
                h = json.loads(raw)
                heads.append(TreeHead(int(h["size"]), str(h["root"]), str(h["signature"])))
            except (ValueError, KeyError, TypeError):
                break
        entries: list[dict[str, Any]] = []
        for raw in lines[: len(heads)]:
            try:
                entry = json.loads(raw)
            except ValueError:
                break
            if not isinstance(entry, dict) or entry.get("seq") != len(entries):
                raise KoinonError(f"{folder / 'log.jsonl'}: line {len(entries) + 1} is not entry "
                                  f"{len(entries)} of the round log; cannot continue this run")
            entries.append(entry)
        count = keep(entries)
        if not 0 < count <= len(entries):
            raise KoinonError(f"{folder}: {count} of the round log's {len(entries)} intact entries should "
                              "stand; cannot continue this run")
        for raw in lines[:count]:
            log.leaves.append(merkle.leaf_hash(raw))
            log.frontier.append(log.leaves[-1])
        last = heads[count - 1]
        if last.size != count or not last.verify(public_hex(server_key)) or last.root != log.frontier.root().hex():
            raise KoinonError(f"{folder}: the signed tree head of entry {count - 1} does not verify against the "
                              "log and the server key; cannot continue this run")
        log.heads = heads[:count]
        for name, rows in (("log.jsonl", lines[:count]),
                           ("heads.jsonl", [canonical({"root": h.root, "signature": h.signature, "size": h.size})
                                            for h in log.heads])):
            tmp = folder / f".{name}.tmp"
            tmp.write_bytes(b"".join(r + b"\n" for r in rows))
            os.replace(tmp, folder / name)
        return log

    def entries(self) -> list[dict[str, Any]]:
        """The entries logged so far, parsed (read back from `log.jsonl`)."""
        return [json.loads(raw) for raw in (self.folder / "log.jsonl").read_bytes().split(b"\n")[:-1]]

    def append(self, entry: dict[str, Any]) -> TreeHead:
        """Append `entry` (its `seq` is set here) and return the signed head that covers it."""
        data = canonical({**entry, "seq": len(self.leaves)})
        self.leaves.append(merkle.leaf_hash(data))
        self.frontier.append(self.leaves[-1])
        root = self.frontier.root().hex()
        head = TreeHead(len(self.leaves), root, self.key.sign(head_message(len(self.leaves), root)).hex())
        self.heads.append(head)
        if self._files is None:  # kept open: opening both files for every entry cost a third of the logging
            self._files = ((self.folder / "log.jsonl").open("ab"), (self.folder / "heads.jsonl").open("ab"))
        log, heads = self._files
        log.write(data + b"\n")
        log.flush()  # the entry reaches the file before its head does
        heads.write(canonical({"root": head.root, "signature": head.signature, "size": head.size}) + b"\n")
        heads.flush()
        return head

    def close(self) -> None:
        """Close the log's files (appending reopens them)."""
        for f in self._files or ():
            f.close()
        self._files = None

    def inclusion(self, index: int, size: int | None = None) -> list[str]:
        """Proof that entry `index` is in the tree of `size` entries (default: all)."""
        return [h.hex() for h in merkle.inclusion_proof(index, self.leaves[: size or len(self.leaves)])]

    def consistency(self, old_size: int) -> list[str]:
        """Proof that the tree of `old_size` entries is a prefix of the current one."""
        return [h.hex() for h in merkle.consistency_proof(old_size, self.leaves)]


def read_log(folder: Path) -> tuple[list[bytes], list[TreeHead]]:
    """The raw entry lines and the signed heads of a log folder."""
    log, heads = folder / "log.jsonl", folder / "heads.jsonl"
    if not log.is_file() or not heads.is_file():
        raise KoinonError(f"{folder}: no round log here (log.jsonl and heads.jsonl)")
    lines = log.read_bytes().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    parsed = []
    for i, line in enumerate(heads.read_bytes().splitlines()):
        try:
            h = json.loads(line)
            parsed.append(TreeHead(int(h["size"]), str(h["root"]), str(h["signature"])))
        except (ValueError, KeyError, TypeError):
            raise KoinonError(f"{heads}: line {i + 1} is not a tree head") from None
    return lines, parsed


def verify_receipt(entry_line: bytes, index: int, head: TreeHead, proof: list[str], server_key: str) -> bool:
    """A client's check that its receipt (the entry's bytes) is entry `index` of the signed `head`."""
    return head.verify(server_key) and merkle.verify_inclusion(
        merkle.leaf_hash(entry_line), index, head.size, [bytes.fromhex(p) for p in proof], bytes.fromhex(head.root))


def verify_prefix(old: TreeHead, new: TreeHead, proof: list[str], server_key: str) -> bool:
    """A client's check that the log it saw (`old`) is a prefix of the final one (`new`)."""
    return old.verify(server_key) and new.verify(server_key) and merkle.verify_consistency(
        old.size, new.size, bytes.fromhex(old.root), bytes.fromhex(new.root), [bytes.fromhex(p) for p in proof])
