"""Upload framing: sizes checked before data is read, running totals, and a fuzzed decoding path."""

import numpy as np
import pytest
import torch
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st

from koinon.compress import CODECS
from koinon.deploy.wire import (
    CHUNK,
    DataFrame,
    Limits,
    Rejected,
    parse_task_chunk,
    parse_upload_chunk,
    pb,
    read_task,
    read_upload,
    serialize_frame,
    task_frames,
    task_messages,
    upload_frames,
    upload_messages,
)
from koinon.errors import CodecError
from koinon.params import Layout

LIMITS = Limits(("delta",), max_stream_bytes=4 * 1000, max_total_bytes=4 * 1000)


def header(sizes, streams=("delta",), **kw):
    return pb.UploadHeader(round=0, layout_hash="h", codec="identity", streams=list(streams),
                           sizes=list(sizes), num_samples=10, num_steps=1, train_loss=0.5, **kw)


def test_round_trip_over_several_chunks():
    payloads = [bytes(range(256)) * (CHUNK // 256 * 2 + 3), b"tail"]
    limits = Limits(("delta", "c"), len(payloads[0]), 10 * CHUNK)
    msgs = list(upload_messages(header([len(p) for p in payloads], ("delta", "c")), payloads))
    assert len(msgs) > 3 and all(len(m.data) <= CHUNK for m in msgs)
    got_header, got = read_upload(msgs, limits, lambda h: None)
    assert got == payloads and got_header.num_samples == 10


def test_oversized_declaration_is_refused_before_any_data_is_read():
    def stream():
        yield pb.UploadChunk(header=header([10**12]))
        raise AssertionError("the receiver read data after an oversized header")

    with pytest.raises(Rejected, match="oversized"):
        read_upload(stream(), LIMITS, lambda h: None)


def test_admit_runs_before_the_data():
    def stream():
        yield pb.UploadChunk(header=header([8]))
        raise AssertionError("data read before admit")

    def admit(h):
        raise Rejected("duplicate submission for round 0")

    with pytest.raises(Rejected, match="duplicate"):
        read_upload(stream(), LIMITS, admit)


@pytest.mark.parametrize(("declared", "sent", "match"), [(8, 12, "more than"), (8, 4, "truncated")])
def test_the_running_total_must_equal_the_declared_size(declared, sent, match):
    msgs = [pb.UploadChunk(header=header([declared])), pb.UploadChunk(data=b"x" * sent)]
    with pytest.raises(Rejected, match=match):
        read_upload(msgs, LIMITS, lambda h: None)


@pytest.mark.parametrize(("bad", "match"), [
    ({"streams": ["delta", "extra"]}, "streams"),
    ({"train_loss": float("nan")}, "train_loss"),
    ({"num_steps": -1}, "negative"),
])
def test_malformed_headers(bad, match):
    h = header([4])
    for key, value in bad.items():
        if isinstance(value, list):
            del getattr(h, key)[:]
            getattr(h, key).extend(value)
        else:
            setattr(h, key, value)
    with pytest.raises(Rejected, match=match):
        read_upload([pb.UploadChunk(header=h), pb.UploadChunk(data=b"abcd")], LIMITS, lambda _: None)


def test_missing_or_repeated_header():
    with pytest.raises(Rejected, match="first message"):
        read_upload([pb.UploadChunk(data=b"abcd")], LIMITS, lambda h: None)
    with pytest.raises(Rejected, match="second header"):
        read_upload([pb.UploadChunk(header=header([4])), pb.UploadChunk(header=header([4]))], LIMITS,
                    lambda h: None)


def test_task_stream_round_trip_and_limits():
    h = pb.TaskHeader(status=pb.TaskHeader.TRAIN, round=3, streams=["delta"], sizes=[6])
    got_header, got = read_task(task_messages(h, [b"abcdef"]), 6)
    assert got == [b"abcdef"] and got_header.round == 3
    with pytest.raises(Rejected):
        read_task(task_messages(h, [b"abcdef"]), 5)


# --- fuzz: whatever arrives, the server's decoding path answers "accepted" or a reason ----------

NUMEL = 50
CODEC = CODECS.build("identity", {}, "codec", layout=Layout.from_module(torch.nn.Linear(NUMEL - 1, 1)))
FUZZ_LIMITS = Limits(("delta",), CODEC.max_bytes(), CODEC.max_bytes())

def make_chunk(with_header, sizes, streams, loss, data):
    if not with_header:
        return pb.UploadChunk(data=data)
    h = pb.UploadHeader(round=0, streams=streams, sizes=sizes, train_loss=loss, num_samples=1)
    return pb.UploadChunk(header=h, data=data)


chunk = st.builds(
    make_chunk,
    st.booleans(),
    st.lists(st.integers(-5, 10**13), max_size=3),
    st.lists(st.sampled_from(["delta", "x", ""]), max_size=3),
    st.floats(allow_nan=True, allow_infinity=True),
    st.binary(max_size=300),
)


def server_decode(messages):
    """What the server does with an upload stream, minus the sockets."""
    _, payloads = read_upload(messages, FUZZ_LIMITS, lambda h: None)
    row = CODEC.decode(payloads[0])
    if row.shape != (NUMEL,) or not bool(torch.isfinite(row).all()):
        raise Rejected("shape or values")
    return row


@given(st.lists(chunk, max_size=6))
def test_fuzzed_upload_streams_are_accepted_or_refused_with_a_reason(messages):
    try:
        row = server_decode(messages)
    except (Rejected, CodecError) as exc:
        assert str(exc)
    else:
        assert row.shape == (NUMEL,) and torch.isfinite(row).all()


@given(st.binary(max_size=400), st.integers(0, NUMEL * 4))
def test_fuzzed_bytes_on_the_wire(raw, split):
    """Random bytes as serialized messages: protobuf refuses them or they go through the checks."""
    try:
        messages = [pb.UploadChunk.FromString(raw[:split]), pb.UploadChunk.FromString(raw[split:])]
    except DecodeError:
        return
    try:
        server_decode(messages)
    except (Rejected, CodecError):
        pass


def test_a_valid_upload_survives_the_decoding_path():
    x = torch.from_numpy(np.linspace(-1, 1, NUMEL, dtype=np.float32))
    payload, _ = CODEC.encode(x, {}, torch.Generator())
    msgs = list(upload_messages(header([len(payload)]), [payload]))
    assert torch.equal(server_decode(msgs), x)


def test_chunks_reach_the_sink_as_they_arrive_and_never_past_the_declared_size():
    payload = bytes(range(256)) * (CHUNK // 256 + 5)
    seen: list[bytes] = []
    msgs = list(upload_messages(header([len(payload)]), [payload]))
    _, got = read_upload(msgs, Limits(("delta",), len(payload), len(payload)), lambda h: None,
                         on_chunk=seen.append)
    assert len(seen) == 2 and b"".join(seen) == payload == bytes(got[0])
    seen.clear()
    over = [*msgs, pb.UploadChunk(data=b"x")]
    with pytest.raises(Rejected, match="more than"):
        read_upload(over, Limits(("delta",), len(payload), len(payload)), lambda h: None, on_chunk=seen.append)
    assert b"".join(seen) == payload  # the extra byte was refused before the sink saw it


def test_a_received_buffer_is_decoded_in_place_with_the_same_values():
    x = torch.from_numpy(np.linspace(-1, 1, NUMEL, dtype=np.float32))
    payload, _ = CODEC.encode(x, {}, torch.Generator())
    received = bytearray(payload)
    row = CODEC.decode(received)
    assert torch.equal(row, x) and torch.equal(CODEC.decode(payload), x)
    received[:4] = np.float32(7.0).tobytes()
    assert row[0] == 7.0  # the row is the received buffer: no second copy of the model
    for bad in (np.nan, np.inf, -np.inf):
        broken = bytearray(payload)
        broken[8:12] = np.float32(bad).tobytes()
        with pytest.raises(CodecError, match="NaN or Inf"):
            CODEC.decode(broken)


@pytest.mark.parametrize("size", [0, 1, 127, 128, 300, CHUNK - 1, CHUNK, 2 * CHUNK + 5])
def test_pre_serialized_frames_are_the_bytes_protobuf_writes(size):
    payloads = [bytes(range(256)) * (size // 256) + bytes(size % 256), b"x" * 200]
    head = header([len(p) for p in payloads], ("delta", "c"))
    frames = [serialize_frame(m) for m in upload_frames(head, payloads)]
    assert frames == [m.SerializeToString() for m in upload_messages(head, payloads)]
    got = read_upload([pb.UploadChunk.FromString(f) for f in frames],
                      Limits(("delta", "c"), 3 * CHUNK, 6 * CHUNK), lambda h: None)[1]
    assert [bytes(p) for p in got] == payloads


def _same_parse(raw: bytes, parse, message) -> None:
    """`parse(raw)` reads `raw` as protobuf does: the same refusal, or the same header and data."""
    try:
        expected = message.FromString(raw)
    except DecodeError:
        with pytest.raises(DecodeError):
            parse(raw)
        return
    got = parse(raw)
    assert got.HasField("header") == expected.HasField("header")
    if expected.HasField("header"):
        assert got.header == expected.header
    assert bytes(got.data) == expected.data


def _frame(data: bytes, varint: bytes | None = None, tail: bytes = b"") -> bytes:
    """A `data` field with its length as `varint` (default: the shortest form), then `tail`."""
    from koinon.deploy.wire import _varint

    return b"\x12" + (varint if varint is not None else _varint(len(data))) + data + tail


@given(st.binary(max_size=300))
def test_received_chunks_parse_as_protobuf_parses_them(raw):
    for parse, message in ((parse_upload_chunk, pb.UploadChunk), (parse_task_chunk, pb.TaskChunk)):
        _same_parse(raw, parse, message)
        _same_parse(b"\x12" + raw, parse, message)  # starts like a data chunk


@pytest.mark.parametrize("raw", [
    b"", b"\x12", b"\x12\x00", _frame(b"abc"), _frame(b"abc", b"\x83\x00"),  # a long form of 3: still one field
    _frame(b"abc", b"\x04"), _frame(b"abc", b"\x02"),  # length past or short of the end
    _frame(b"abc", tail=_frame(b"de")),  # two data fields: protobuf keeps the last
    _frame(b"abc", tail=b"\x0a\x00"),  # and a header
    _frame(b"x" * 200, b"\xc8\x81\x80\x80\x80\x00"),  # a 6-byte varint: left to protobuf
    _frame(b"y" * (CHUNK + 7)),
])
def test_edge_frames_parse_as_protobuf_parses_them(raw):
    _same_parse(raw, parse_upload_chunk, pb.UploadChunk)
    _same_parse(raw, parse_task_chunk, pb.TaskChunk)


def test_a_data_chunk_is_a_view_of_the_received_bytes_and_the_stream_reads_as_before():
    payloads = [bytes(range(256)) * (CHUNK // 256 + 3), b"tail"]
    head = header([len(p) for p in payloads], ("delta", "c"))
    frames = [serialize_frame(m) for m in upload_frames(head, payloads)]
    parsed = [parse_upload_chunk(f) for f in frames]
    assert not isinstance(parsed[0], DataFrame) and all(isinstance(m, DataFrame) for m in parsed[1:])
    assert parsed[1].data.obj is frames[1]  # no copy of the chunk
    got = read_upload(parsed, Limits(("delta", "c"), 2 * CHUNK, 4 * CHUNK), lambda h: None)
    assert got[0] == head and [bytes(p) for p in got[1]] == payloads
    task = pb.TaskHeader(status=pb.TaskHeader.TRAIN, streams=["model"], sizes=[len(payloads[0])])
    sent = [serialize_frame(m) for m in task_frames(task, payloads[:1])]
    assert sent == [m.SerializeToString() for m in task_messages(task, payloads[:1])]
    assert read_task([parse_task_chunk(f) for f in sent], 2 * CHUNK) == (task, payloads[:1])
