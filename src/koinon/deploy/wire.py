"""Framing of payloads on the wire: a header message, then the bytes in chunks.

gRPC refuses single messages above a few MB and would hold a whole message in memory, so a
payload (the codec's bytes) travels as a stream: the first message carries a header (round,
layout hash, codec, stream names and sizes), the next ones at most `CHUNK` bytes each. The
receiver checks the header *before* reading any data (an oversized or stale upload costs the
server one small message) and then the running total against the declared size, so a sender
can neither lie about the size nor make the server buffer more than the layout allows.
Everything here is pure (no sockets), so the decoding path is fuzzed directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from koinon.deploy import federation_pb2 as _pb
from koinon.wire import Rejected

__all__ = ["MAX_GRPC_MESSAGE", "Limits", "Rejected", "parse_task_chunk", "parse_upload_chunk", "pb", "poll_call", "quote",
           "read_task", "read_upload", "serialize_frame", "task_frames", "task_messages", "upload_call",
           "upload_frames", "upload_messages"]

pb: Any = _pb  # generated classes are built at import time; mypy cannot see their attributes

CHUNK = 1 << 20
# gRPC's own per-message ceiling: one chunk plus a header. A sender ignoring the chunking is cut
# off by gRPC before the message reaches our code.
MAX_GRPC_MESSAGE = CHUNK + (64 << 10)
# What a client reads of the wire, sent at Join (`JoinRequest.protocol`): 1 = the streams addressed
# to it alone (`TaskHeader.own`). A server whose run sends those refuses a client below 1, which
# would take them for shared downloads and train a model that is not the run's.
PROTOCOL = 1


@dataclass(frozen=True)
class Limits:
    """What the receiver accepts for one upload."""

    streams: tuple[str, ...]
    max_stream_bytes: int  # the codec's `max_bytes()`: no valid payload is longer
    max_total_bytes: int  # the deployment's message limit


QUOTE_CHARS = 40  # of a client-controlled string that a refusal reason may quote


def quote(value: str) -> str:
    """`value` as a reason may quote it: its repr, cut to `QUOTE_CHARS` characters (a header
    string can be a megabyte long, and reasons are stored and logged)."""
    if len(value) <= QUOTE_CHARS:
        return repr(value)
    return f"{value[:QUOTE_CHARS]!r}... ({len(value)} characters)"


def split(data: bytes | memoryview) -> Iterator[bytes]:
    """`data` in chunks of at most `CHUNK` bytes (no chunk for empty data)."""
    view = memoryview(data)
    for start in range(0, len(view), CHUNK):
        yield bytes(view[start : start + CHUNK])


def upload_messages(header: Any, payloads: list[bytes]) -> Iterator[Any]:
    """The messages of one upload: the header, then every payload's bytes back to back."""
    yield pb.UploadChunk(header=header)
    for payload in payloads:
        for piece in split(payload):
            yield pb.UploadChunk(data=piece)


_DATA_TAG = b"\x12"  # field 2 (`data`) of UploadChunk, length-delimited


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def _data_frames(payloads: list[bytes]) -> Iterator[bytes]:
    """Each data chunk of `payloads` serialized, byte for byte what protobuf writes for a chunk
    message (`UploadChunk` or `TaskChunk`, both hold `data` in field 2) holding only `data`."""
    for payload in payloads:
        view = memoryview(payload)
        for start in range(0, len(view), CHUNK):
            piece = view[start : start + CHUNK]
            yield b"".join((_DATA_TAG, _varint(len(piece)), piece))


def upload_frames(header: Any, payloads: list[bytes]) -> Iterator[Any]:
    """`upload_messages` as the client sends them (with `upload_call`): the header message,
    then each data chunk already serialized, byte for byte what protobuf writes for an
    `UploadChunk` holding only `data`. One copy of the payload, where building and serializing
    message objects makes three, all while the client holds the interpreter lock."""
    yield pb.UploadChunk(header=header)
    yield from _data_frames(payloads)


def task_frames(header: Any, payloads: list[bytes]) -> Iterator[Any]:
    """`task_messages` as the server sends them (its `Poll` answers go out through
    `serialize_frame`): the header message, then the data chunks pre-serialized."""
    yield pb.TaskChunk(header=header)
    yield from _data_frames(payloads)


def serialize_frame(message: Any) -> bytes:
    """The serializer of streams of frames (`upload_frames`, `task_frames`): pre-serialized
    chunks go as they are, message objects are serialized."""
    return message if isinstance(message, bytes) else message.SerializeToString()




class DataFrame:
    """A received chunk message that holds only `data`, read without protobuf: `data` is a
    view of the bytes gRPC handed over (no message object, no copy). Reads like the chunk
    message it is (`HasField("header")` is False)."""

    __slots__ = ("data",)

    def __init__(self, data: memoryview) -> None:
        self.data = data

    def HasField(self, name: str) -> bool:  # noqa: N802 - protobuf's name
        return False


def _data_only(raw: bytes) -> memoryview | None:
    """The bytes of `data` when `raw` is exactly one `data` field (field 2, length-delimited,
    spanning the whole message), else None. For such input protobuf's parse has nothing else
    to decide: the message holds that `data` and no header."""
    if len(raw) < 2 or raw[0] != _DATA_TAG[0]:
        return None
    length, shift = 0, 0
    for pos in range(1, min(len(raw), 6)):  # a chunk's length fits in 5 varint bytes
        byte = raw[pos]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return memoryview(raw)[pos + 1 :] if pos + 1 + length == len(raw) else None
    return None


def parse_upload_chunk(raw: bytes) -> Any:
    """The server's request deserializer for `Upload`: a data chunk becomes a `DataFrame`
    viewing the received bytes; anything else (the header, or bytes that are not one `data`
    field) is parsed by protobuf, so what is accepted and refused is protobuf's decision."""
    data = _data_only(raw)
    return DataFrame(data) if data is not None else pb.UploadChunk.FromString(raw)


def parse_task_chunk(raw: bytes) -> Any:
    """The client's response deserializer for `Poll`, as `parse_upload_chunk` for uploads."""
    data = _data_only(raw)
    return DataFrame(data) if data is not None else pb.TaskChunk.FromString(raw)


def upload_call(channel: Any) -> Any:
    """The `Upload` method on `channel`, sending what `upload_frames` yields (the generated stub
    serializes message objects only)."""
    return channel.stream_unary("/koinon.deploy.Federation/Upload", request_serializer=serialize_frame,
                                response_deserializer=pb.UploadReply.FromString)


def poll_call(channel: Any) -> Any:
    """The `Poll` method on `channel`, reading data chunks with `parse_task_chunk`."""
    return channel.unary_stream("/koinon.deploy.Federation/Poll", request_serializer=pb.PollRequest.SerializeToString,
                                response_deserializer=parse_task_chunk)


def task_messages(header: Any, payloads: list[bytes]) -> Iterator[Any]:
    yield pb.TaskChunk(header=header)
    for payload in payloads:
        for piece in split(payload):
            yield pb.TaskChunk(data=piece)


def check_upload_header(header: Any, limits: Limits) -> None:
    """Refuse a header whose shape of payload is impossible, before any data is read."""
    if tuple(header.streams) != limits.streams:
        shown = "[" + ", ".join(quote(n) for n in list(header.streams)[:4]) + (", ...]" if len(header.streams) > 4 else "]")
        raise Rejected(f"streams {shown} do not match the expected {list(limits.streams)}")
    if len(header.sizes) != len(limits.streams):
        raise Rejected(f"{len(header.sizes)} sizes for {len(limits.streams)} streams")
    for name, size in zip(limits.streams, header.sizes):
        if size < 0 or size > limits.max_stream_bytes:
            raise Rejected(f"stream {name!r} declares {size} bytes; the codec never sends more than "
                           f"{limits.max_stream_bytes} (oversized payload)")
    total = sum(header.sizes)
    if total > limits.max_total_bytes:
        raise Rejected(f"upload declares {total} bytes, over the limit of {limits.max_total_bytes} "
                       "(oversized payload)")
    if not math.isfinite(header.train_loss):
        raise Rejected("train_loss is not finite")
    if header.num_steps < 0:
        raise Rejected(f"num_steps = {header.num_steps} is negative")


def read_upload(
    messages: Iterable[Any], limits: Limits, admit: Callable[[Any], None],
    before_body: Callable[[], None] | None = None, on_chunk: Callable[[bytes], None] | None = None,
) -> tuple[Any, list[bytes]]:
    """(header, one payload per stream) from an upload stream, or `Rejected` with the reason.

    `admit(header)` is the caller's stateful check (right round, sampled, not a duplicate); it
    runs after the size checks and before the first data byte is read. `before_body()` runs
    after it, e.g. to wait for a receive slot only once the sender is known to be legitimate.
    `on_chunk(data)` sees every data chunk as it arrives, once it is within the declared size
    (the server writes and hashes its pending file there, while the rest is still in flight).
    """
    it = iter(messages)
    first = next(it, None)
    if first is None or not first.HasField("header"):
        raise Rejected("the first message of an upload must carry its header")
    if first.data:
        raise Rejected("the header message must not carry data")
    header = first.header
    check_upload_header(header, limits)
    admit(header)
    if before_body is not None:
        before_body()
    declared = sum(header.sizes)
    # Allocated once at the declared (already bounded) size: growing a buffer chunk by chunk
    # would copy a large payload over and over and double the peak while doing it.
    buffer = bytearray(declared)
    filled = 0
    for msg in it:
        if msg.HasField("header"):
            raise Rejected("a second header in one upload")
        data = msg.data  # each access of a bytes field builds a new object: read it once
        n = len(data)
        if filled + n > declared:
            raise Rejected(f"sent more than the {declared} bytes declared (oversized payload)")
        buffer[filled : filled + n] = data
        if on_chunk is not None:
            on_chunk(data)
        filled += n
    if filled != declared:
        raise Rejected(f"truncated upload: {filled} of {declared} declared bytes")
    return header, _cut(buffer, list(header.sizes))


def _cut(buffer: bytearray, sizes: list[int]) -> list[bytes]:
    """The payloads in `buffer`; a single one is the buffer itself (no copy of a large model)."""
    if len(sizes) == 1:
        return [buffer]  # type: ignore[list-item]  # bytearray reads like bytes everywhere we use it
    view = memoryview(buffer)
    payloads, offset = [], 0
    for size in sizes:
        payloads.append(bytes(view[offset : offset + size]))
        offset += size
    return payloads


def read_task(messages: Iterable[Any], max_stream_bytes: int) -> tuple[Any, list[bytes]]:
    """(header, payloads) of a task stream on the client, with the same size discipline."""
    it = iter(messages)
    first = next(it, None)
    if first is None or not first.HasField("header"):
        raise Rejected("the server's answer has no header")
    header = first.header
    if any(s < 0 or s > max_stream_bytes for s in header.sizes) or len(header.sizes) != len(header.streams):
        raise Rejected(f"the server announces payload sizes {list(header.sizes)} beyond the codec's "
                       f"{max_stream_bytes} bytes")
    declared = sum(header.sizes)
    buffer = bytearray()  # grown as bytes arrive: the stream count, hence `declared`, is the server's word
    for msg in it:
        data = msg.data  # each access of a bytes field builds a new object: read it once
        if len(buffer) + len(data) > declared:
            raise Rejected("the server sent more bytes than it declared")
        buffer += data
    if len(buffer) != declared:
        raise Rejected(f"truncated download: {len(buffer)} of {declared} bytes")
    return header, _cut(buffer, list(header.sizes))
