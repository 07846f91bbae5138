"""Entropy stages: index-set coding, a vectorized Huffman code, and the `zstd` wrapper codec.

Index sets (which coordinates a sparsifier kept) dominate the payload at 99.9% sparsity, so
`encode_indices` sizes three codings and writes the smallest, announced by a flag byte:
a bitmap (dense sets), LEB128 varints of the gaps, or Golomb-Rice coded gaps (near the entropy
of the geometric gaps of a random-looking set). Rice stores the remainders and the unary
quotients as two separate streams so both directions vectorize (quotients are the distances
between the ones of a bit stream).

The Huffman code is canonical, but its bits are written level by level (every symbol's first
bit, then the second bit of those still undecided, ...). That is the same number of bits as the
usual interleaved order and it decodes with one vectorized step per code length instead of a
Python loop per symbol.
"""

from __future__ import annotations

import heapq

import numpy as np
import torch
import zstandard

from koinon.compress.base import CODECS, CodecState, build_inner
from koinon.compress.wire import Reader, check_size, pack_uint, unpack_uint, varint_decode
from koinon.compress.wire import varint_encode as _varints
from koinon.params import Layout

INDEX_BITMAP, INDEX_VARINT, INDEX_RICE = 0, 1, 2
MAX_RICE_BITS = 31
MAX_HUFFMAN_LENGTH = 32


def _varint(n: int) -> bytes:
    return _varints(np.array([n], dtype=np.int64))


def _gaps(idx: np.ndarray) -> np.ndarray:
    return np.diff(idx, prepend=-1) - 1


def _rice_bits(gaps: np.ndarray) -> tuple[int, int]:
    """The Rice parameter with the fewest total bits near log2(mean gap), and that size."""
    mean = float(gaps.mean()) if len(gaps) else 0.0
    centre = int(np.log2(mean * np.log(2) + 1.0))
    best = (0, 1 << 62)
    for b in range(max(0, centre - 2), min(MAX_RICE_BITS, centre + 2) + 1):
        bits = int((gaps >> b).sum()) + len(gaps) * (1 + b)
        best = min(best, (b, bits), key=lambda t: t[1])
    return best


def index_bound(count: int, numel: int) -> int:
    """Largest `encode_indices` output for `count` of `numel` coordinates (the bitmap caps it)."""
    body = -(-numel // 8)
    return 1 + 5 + min(body, 5 * count)


def encode_indices(idx: np.ndarray, numel: int) -> bytes:
    """Sorted unique int64 indices below `numel` as flag + varint body length + smallest body."""
    gaps = _gaps(idx)
    nbytes = len(gaps) + sum(int((gaps >= (1 << (7 * j))).sum()) for j in range(1, 5))
    sizes = {INDEX_BITMAP: -(-numel // 8), INDEX_VARINT: nbytes}
    if len(idx):
        b, bits = _rice_bits(gaps)
        sizes[INDEX_RICE] = 1 + -(-bits // 8)
    flag = min(sizes, key=lambda f: (sizes[f], f))
    if flag == INDEX_BITMAP:
        mask = np.zeros(numel, dtype=np.uint8)
        mask[idx] = 1
        body = np.packbits(mask, bitorder="little").tobytes()
    elif flag == INDEX_VARINT:
        body = _varints(gaps)
    else:
        q = gaps >> b
        unary = np.zeros(int(q.sum()) + len(q), dtype=np.uint8)
        unary[np.cumsum(q + 1) - 1] = 1
        remainders = pack_uint(gaps & ((1 << b) - 1), b) if b else b""
        body = bytes([b]) + remainders + np.packbits(unary, bitorder="little").tobytes()
    return bytes([flag]) + _varint(len(body)) + body


def decode_indices(reader: Reader, count: int, numel: int) -> np.ndarray:
    """Inverse of `encode_indices`: `count` sorted indices, each checked below `numel`."""
    flag = reader.u8()
    size = reader.varint()
    if size > reader.remaining:
        raise reader.fail(f"index body of {size} bytes exceeds the payload")
    body = Reader(reader.codec, reader.take(size).tobytes())
    if flag == INDEX_BITMAP:
        body.expect("bitmap size", size, -(-numel // 8))
        bits = np.unpackbits(body.array("u1", size), bitorder="little")
        if bits[numel:].any():
            raise reader.fail("bitmap has bits set past the layout")
        idx = np.flatnonzero(bits)
        if len(idx) != count:
            raise reader.fail(f"bitmap holds {len(idx)} indices, header says {count}")
        return idx
    if flag == INDEX_VARINT:
        gaps = varint_decode(reader, body.array("u1", size), count)
    elif flag == INDEX_RICE:
        b = body.u8()
        if b > MAX_RICE_BITS:
            raise reader.fail(f"Rice parameter {b} exceeds {MAX_RICE_BITS}")
        remainders = unpack_uint(body, count, b) if b else np.zeros(count, dtype=np.int64)
        unary = body.array("u1", body.remaining)
        ones = np.flatnonzero(np.unpackbits(unary, bitorder="little"))
        if len(ones) != count or (count and len(unary) != ones[-1] // 8 + 1):
            raise reader.fail("Rice quotient stream does not match the index count")
        gaps = ((np.diff(ones, prepend=-1) - 1) << b) | remainders
    else:
        raise reader.fail(f"unknown index coding flag {flag}")
    body.finish()
    if count and (gaps.max() >= numel or gaps.sum() + count > numel):
        raise reader.fail(f"indices run past the layout's {numel} elements")
    return np.cumsum(gaps + 1) - 1


def huffman_lengths(counts: np.ndarray) -> np.ndarray:
    """Optimal prefix-code lengths for symbol `counts` (0 for unused symbols)."""
    lengths = np.zeros(len(counts), dtype=np.int64)
    used = [int(s) for s in np.flatnonzero(counts)]
    if len(used) == 1:
        lengths[used[0]] = 1  # a lone symbol still needs one bit per occurrence
        return lengths
    # heap items: (weight, tiebreak, symbols under this node); loops run over the alphabet only
    heap = [(int(counts[s]), s, [s]) for s in used]
    heapq.heapify(heap)
    while len(heap) > 1:
        w1, t1, s1 = heapq.heappop(heap)
        w2, t2, s2 = heapq.heappop(heap)
        lengths[s1 + s2] += 1
        heapq.heappush(heap, (w1 + w2, min(t1, t2), s1 + s2))
    return lengths


def _canonical(lengths: np.ndarray) -> np.ndarray:
    codes = np.zeros(len(lengths), dtype=np.int64)
    code, prev = 0, 0
    for s in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[s]) - prev
        codes[s], prev = code, int(lengths[s])
        code += 1
    return codes


def huffman_encode(symbols: np.ndarray, lengths: np.ndarray) -> bytes:
    """Level-ordered canonical Huffman bits of `symbols`, prefixed by their byte length."""
    codes = _canonical(lengths)
    sym_len, sym_code = lengths[symbols], codes[symbols]
    levels = []
    for level in range(int(lengths.max()) if len(symbols) else 0):
        alive = sym_len > level
        levels.append(((sym_code[alive] >> (sym_len[alive] - 1 - level)) & 1).astype(np.uint8))
    bits = np.concatenate(levels) if levels else np.zeros(0, dtype=np.uint8)
    body = np.packbits(bits, bitorder="little").tobytes()
    return _varint(len(body)) + body


def huffman_decode(reader: Reader, n: int, lengths: np.ndarray) -> np.ndarray:
    """`n` symbols written by `huffman_encode` with the same code `lengths` (validated here)."""
    if lengths.max(initial=0) > MAX_HUFFMAN_LENGTH:
        raise reader.fail(f"Huffman code length above {MAX_HUFFMAN_LENGTH}")
    used = lengths > 0
    if n and (not used.any() or (2.0 ** -lengths[used].astype(float)).sum() > 1.0):
        raise reader.fail("Huffman code lengths do not form a prefix code")
    size = reader.varint()
    bits = np.unpackbits(reader.array("u1", size), bitorder="little")
    codes = _canonical(lengths)
    out = np.full(n, -1, dtype=np.int64)
    alive = np.arange(n)
    prefix = np.zeros(n, dtype=np.int64)
    pos = 0
    for level in range(1, int(lengths.max(initial=0)) + 1):
        if not len(alive):
            break
        if pos + len(alive) > len(bits):
            raise reader.fail("Huffman stream is truncated")
        prefix = prefix * 2 + bits[pos : pos + len(alive)]
        pos += len(alive)
        syms = np.flatnonzero(lengths == level)
        order = np.argsort(codes[syms])
        level_codes, level_syms = codes[syms][order], syms[order]
        at = np.minimum(np.searchsorted(level_codes, prefix), max(len(level_codes) - 1, 0))
        hit = (level_codes[at] == prefix) if len(level_codes) else np.zeros(len(alive), bool)
        out[alive[hit]] = level_syms[at[hit]]
        alive, prefix = alive[~hit], prefix[~hit]
    if len(alive):
        raise reader.fail("Huffman stream holds a code word that is not in the code")
    if -(-pos // 8) != size or bits[pos:].any():
        raise reader.fail("Huffman stream has trailing bits")
    return out


@CODECS.register("zstd")
class Zstd:
    """Zstandard entropy stage over any inner codec's bytes (the last step of a composition).

    Options: `inner` (required: the wrapped codec as an inline table `{name = "topk", ratio = 0.01}` or a
    bare name), `level` (zstd level, 1-22). The payload is a flag byte (0 = inner bytes stored,
    1 = one zstd frame), so it never exceeds the inner bound by more than one byte.
    Decompression stops at the inner codec's `max_bytes()`, however large the frame claims to be.
    """

    name = "zstd"

    def __init__(self, layout: Layout, inner: dict | str | None = None, level: int = 3) -> None:
        self.inner = build_inner(inner, layout, "codec.inner")
        if not 1 <= level <= 22:
            raise ValueError(f"level = {level}: zstd levels are 1 to 22")
        self.compressor = zstandard.ZstdCompressor(level=level)

    def init_state(self) -> CodecState:
        return self.inner.init_state()

    def encode(
        self, x: torch.Tensor, state: CodecState, rng: torch.Generator
    ) -> tuple[bytes, CodecState]:
        raw, state = self.inner.encode(x, state, rng)
        packed = self.compressor.compress(raw)
        if len(packed) < len(raw):
            return b"\x01" + packed, state
        return b"\x00" + raw, state

    def decode(self, data: bytes) -> torch.Tensor:
        limit = self.inner.max_bytes()
        check_size(self.name, data, self.max_bytes())
        reader = Reader(self.name, data)
        flag = reader.u8()
        if flag == 0:
            return self.inner.decode(data[1:])
        if flag != 1:
            raise reader.fail(f"unknown flag byte {flag}")
        try:
            dctx = zstandard.ZstdDecompressor()
            with dctx.stream_reader(data[1:], read_across_frames=True) as stream:
                raw = stream.read(limit + 1)
        except zstandard.ZstdError as exc:
            raise reader.fail(f"corrupt zstd frame ({exc})") from None
        if len(raw) > limit:
            raise reader.fail(f"zstd frame inflates past the inner bound of {limit} bytes")
        return self.inner.decode(raw)

    def max_bytes(self) -> int:
        return 1 + self.inner.max_bytes()
