"""The SecAgg+ messages as bytes: one fixed binary layout, every message signed by its sender.

    header  = MAGIC "KSA1" | step u8 | session 32 bytes | sender u32 | recipient u32 | body length u32
    message = header | body | Ed25519 signature (64 bytes) over header | body

`SERVER` (0xFFFFFFFF) names the server. The session is fresh random bytes per protocol run (a
round), so a message recorded in another round fails its check; the step, sender and recipient
are signed too, so a message cannot be moved to another step or another party. `open_message`
checks all of it and raises `ProtocolError` with the reason. Bodies are fixed-width integers
(little-endian) and fixed-length byte strings; nothing is ever unpickled.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from koinon.errors import KoinonError

__all__ = ["ADVERTISE", "CHECK", "CHECKS", "MASKED", "NEIGHBOURS", "SERVER", "SHARES", "SHARES_FOR", "SURVIVORS",
           "UNMASK", "Message", "ProtocolError", "open_message", "seal"]

MAGIC = b"KSA1"
SERVER = 0xFFFFFFFF
HEADER = struct.Struct("<4sB32sIII")
SIGNATURE_BYTES = 64

ADVERTISE, NEIGHBOURS, SHARES, SHARES_FOR, MASKED, SURVIVORS, UNMASK, CHECK, CHECKS = range(1, 10)
STEP_NAMES = {ADVERTISE: "advertise keys", NEIGHBOURS: "neighbour keys", SHARES: "share keys",
              SHARES_FOR: "forwarded shares", MASKED: "masked input", SURVIVORS: "survivors",
              UNMASK: "unmasking shares", CHECK: "signed survivor list", CHECKS: "neighbours' signatures"}


class ProtocolError(KoinonError):
    """A message that fails a check (signature, session, step, sender, layout), or a run that
    cannot finish (too few shares left to unmask)."""


@dataclass(frozen=True)
class Message:
    step: int
    session: bytes
    sender: int
    recipient: int
    body: bytes


def header(step: int, session: bytes, sender: int, recipient: int, length: int) -> bytes:
    return HEADER.pack(MAGIC, step, session, sender, recipient, length)


def seal(key: Ed25519PrivateKey, step: int, session: bytes, sender: int, recipient: int, body: bytes) -> bytes:
    signed = header(step, session, sender, recipient, len(body)) + body
    return signed + key.sign(signed)


def open_message(data: bytes, key: Ed25519PublicKey, *, step: int, session: bytes, sender: int,
                 recipient: int) -> Message:
    """The checked message, or `ProtocolError` naming what is wrong."""
    if len(data) < HEADER.size + SIGNATURE_BYTES:
        raise ProtocolError(f"{STEP_NAMES.get(step, step)} message of {len(data)} bytes is truncated")
    magic, got_step, got_session, got_sender, got_recipient, length = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError("not a SecAgg message (bad magic)")
    if len(data) != HEADER.size + length + SIGNATURE_BYTES:
        raise ProtocolError(f"message length {len(data)} does not match its header")
    try:
        key.verify(data[-SIGNATURE_BYTES:], data[:-SIGNATURE_BYTES])
    except InvalidSignature:
        raise ProtocolError(f"{STEP_NAMES.get(step, step)} message from {got_sender}: bad signature "
                            "(tampered or forged)") from None
    if got_session != session:
        raise ProtocolError(f"{STEP_NAMES.get(step, step)} message from {got_sender} belongs to another "
                            "session (replayed)")
    if (got_step, got_sender, got_recipient) != (step, sender, recipient):
        raise ProtocolError(f"message is step {got_step} from {got_sender} to {got_recipient}, expected "
                            f"step {step} from {sender} to {recipient} (misrouted or replayed)")
    return Message(got_step, got_session, got_sender, got_recipient, data[HEADER.size:-SIGNATURE_BYTES])


class Reader:
    """Reads a body field by field; any short or trailing byte is a `ProtocolError`."""

    def __init__(self, body: bytes, what: str) -> None:
        self.body = body
        self.pos = 0
        self.what = what

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.body):
            raise ProtocolError(f"{self.what}: body is truncated")
        out = self.body[self.pos:self.pos + n]
        self.pos += n
        return out

    def u32(self) -> int:
        return int(struct.unpack("<I", self.take(4))[0])

    def u8(self) -> int:
        return self.take(1)[0]

    def end(self) -> None:
        if self.pos != len(self.body):
            raise ProtocolError(f"{self.what}: {len(self.body) - self.pos} trailing bytes")


def u32(x: int) -> bytes:
    return struct.pack("<I", x)
