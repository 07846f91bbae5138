"""Byte-level helpers shared by the codecs: a bounds-checked reader, bit packing, varints.

Every decode goes through `Reader`, which turns any read past the end into a `CodecError`
instead of a `struct.error` or a short numpy array. Counts read from a header must be checked
against the layout (`Reader.count`) before anything of that size is allocated. Packing works
on whole arrays (numpy shifts and `packbits`), never per element in Python.
"""

from __future__ import annotations

import struct

import numpy as np
import torch

from koinon.errors import CodecError

MAX_VARINT_BYTES = 5  # gaps and counts stay below 2**35 (layouts hold far fewer elements)


class Reader:
    """Sequential reads from a payload; anything truncated or left over is a `CodecError`."""

    def __init__(self, codec: str, data: bytes) -> None:
        self.codec = codec
        self.buf = memoryview(data)
        self.pos = 0

    def fail(self, problem: str) -> CodecError:
        return CodecError(self.codec, problem)

    @property
    def remaining(self) -> int:
        return len(self.buf) - self.pos

    def take(self, n: int) -> memoryview:
        if n < 0 or n > self.remaining:
            raise self.fail(
                f"truncated payload: need {n} bytes at offset {self.pos}, {self.remaining} left"
            )
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))

    def u8(self) -> int:
        return self.unpack("B")[0]

    def u32(self) -> int:
        return self.unpack("I")[0]

    def f32(self) -> float:
        (value,) = self.unpack("f")
        if not np.isfinite(value):
            raise self.fail("header holds a NaN or Inf scale")
        return value

    def varint(self) -> int:
        value = 0
        for j in range(MAX_VARINT_BYTES):
            byte = self.u8()
            value |= (byte & 0x7F) << (7 * j)
            if byte < 0x80:
                return value
        raise self.fail("varint longer than 5 bytes")

    def count(self, what: str, limit: int) -> int:
        """A varint count, refused before any allocation if it exceeds `limit`."""
        n = self.varint()
        if n > limit:
            raise self.fail(f"{what} is {n}, more than the {limit} the layout allows")
        return n

    def array(self, dtype: str, n: int) -> np.ndarray:
        dt = np.dtype(dtype)
        return np.frombuffer(self.take(n * dt.itemsize), dtype=dt)

    def scales(self, what: str, n: int) -> np.ndarray:
        """`n` float32 scales (per block, bucket or layer) that must be finite and >= 0."""
        values = self.array("<f4", n)
        if not (np.isfinite(values).all() and (values >= 0).all()):
            raise self.fail(f"{what} must be finite and non-negative")
        return values

    def expect(self, what: str, got: int, want: int) -> None:
        if got != want:
            raise self.fail(f"{what} is {got}, this codec was configured with {want}")

    def finish(self) -> None:
        if self.remaining:
            raise self.fail(f"{self.remaining} unexpected trailing bytes")


def check_input(codec: str, x: torch.Tensor, numel: int) -> torch.Tensor:
    """The flat float32 CPU tensor to encode, or a `CodecError` naming the mismatch."""
    if x.numel() != numel:
        raise CodecError(codec, f"encode got {x.numel()} elements, layout has {numel}")
    x = x.detach().reshape(-1).to(torch.float32)
    if not torch.isfinite(x).all():
        raise CodecError(codec, "encode got NaN or Inf values")
    return x


def check_size(codec: str, data: bytes, max_bytes: int, min_bytes: int = 1) -> None:
    """Reject a payload outside the codec's stated size range before parsing it."""
    if not min_bytes <= len(data) <= max_bytes:
        raise CodecError(
            codec, f"payload is {len(data)} bytes, expected {min_bytes} to {max_bytes}"
        )


def finite(codec: str, t: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(t).all():
        raise CodecError(codec, "decoded values hold NaN or Inf")
    return t


def pack_uint(values: np.ndarray, bits: int) -> bytes:
    """Little-endian bit packing of unsigned integers below 2**bits (1 <= bits <= 32)."""
    v = np.ascontiguousarray(values)
    if bits == 8:
        return v.astype(np.uint8).tobytes()
    if bits == 16:
        return v.astype("<u2").tobytes()
    if bits in (1, 2, 4):
        per = 8 // bits
        v8 = np.zeros(-(-len(v) // per) * per, dtype=np.uint8)
        v8[: len(v)] = v
        grouped = v8.reshape(-1, per)
        out = np.zeros(len(grouped), dtype=np.uint8)
        for j in range(per):  # loop over the 2-8 slots of a byte, not over elements
            out |= grouped[:, j] << np.uint8(bits * j)
        return out.tobytes()
    shifts = np.arange(bits, dtype=np.uint32)
    bitmat = ((v.astype(np.uint32)[:, None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(bitmat.reshape(-1), bitorder="little").tobytes()


def packed_size(n: int, bits: int) -> int:
    return -(-n * bits // 8)


def unpack_uint(reader: Reader, n: int, bits: int) -> np.ndarray:
    """Inverse of `pack_uint`: `n` values as int64; padding bits must be zero."""
    raw = reader.array("u1", packed_size(n, bits))
    if bits == 8:
        return raw.astype(np.int64)
    if bits == 16:
        return raw.view("<u2").astype(np.int64)
    if bits in (1, 2, 4):
        per = 8 // bits
        mask = np.uint8((1 << bits) - 1)
        out = np.empty((len(raw), per), dtype=np.uint8)
        for j in range(per):
            out[:, j] = (raw >> np.uint8(bits * j)) & mask
        flat = out.reshape(-1)
        if flat[n:].any():
            raise reader.fail("nonzero padding bits")
        return flat[:n].astype(np.int64)
    bitmat: np.ndarray = np.unpackbits(raw, bitorder="little")
    if bitmat[n * bits :].any():
        raise reader.fail("nonzero padding bits")
    bitmat = bitmat[: n * bits].reshape(n, bits).astype(np.int64)
    return bitmat @ (np.int64(1) << np.arange(bits, dtype=np.int64))


def varint_encode(values: np.ndarray) -> bytes:
    """LEB128 varints of non-negative int64 values below 2**35, vectorized by byte position."""
    v = values.astype(np.int64)
    nbytes = np.ones(len(v), dtype=np.int64)
    for j in range(1, MAX_VARINT_BYTES):
        nbytes += v >= (1 << (7 * j))
    ends = np.cumsum(nbytes)
    starts = ends - nbytes
    out = np.zeros(int(ends[-1]) if len(v) else 0, dtype=np.uint8)
    for j in range(MAX_VARINT_BYTES):
        m = nbytes > j
        more = (nbytes[m] > j + 1).astype(np.uint8) << 7
        out[starts[m] + j] = ((v[m] >> (7 * j)) & 0x7F).astype(np.uint8) | more
    return out.tobytes()


def varint_decode(reader: Reader, raw: np.ndarray, n: int) -> np.ndarray:
    """Exactly `n` varints filling `raw`; anything else is a `CodecError`."""
    ends = np.flatnonzero(raw < 0x80)
    if len(ends) != n or (n and ends[-1] != len(raw) - 1) or (not n and len(raw)):
        raise reader.fail(f"varint stream does not hold exactly {n} values")
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if n and lengths.max() > MAX_VARINT_BYTES:
        raise reader.fail("varint longer than 5 bytes")
    out = np.zeros(n, dtype=np.int64)
    for j in range(MAX_VARINT_BYTES):
        m = lengths > j
        out[m] |= (raw[starts[m] + j].astype(np.int64) & 0x7F) << (7 * j)
    return out
