"""Dense quantizers (`bf16`, `int8`, `int4`, `qsgd`) and the value formats sparsifiers reuse.

Integer levels travel offset-binary (level + max level) so they pack as unsigned bit fields; the
one unused code (e.g. 255 for int8) is rejected on decode. Scales are float32, one per block
(or one for the whole vector when `block = 0`). Stochastic rounding draws from the `rng` passed to
`encode`, so a seeded run is reproducible and the draws are unbiased (E[decode] = x).
"""

from __future__ import annotations

import numpy as np
import torch

from koinon.compress.base import CODECS, CodecState
from koinon.compress.wire import (
    Reader,
    check_input,
    check_size,
    finite,
    pack_uint,
    packed_size,
    unpack_uint,
    varint_encode,
)
from koinon.params import Layout

VALUE_FORMATS = ("fp32", "fp16", "bf16", "int8", "int4")
_INT_MAX = {"int8": 127, "int4": 7}
_INT_BITS = {"int8": 8, "int4": 4}


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """`x` zero-padded to whole blocks, shaped `[num_blocks, block]`."""
    pad = (-x.numel()) % block
    return torch.nn.functional.pad(x, (0, pad)).view(-1, block)


def _round(y: torch.Tensor, stochastic: bool, rng: torch.Generator) -> torch.Tensor:
    if stochastic:
        return torch.floor(y + torch.rand(y.shape, generator=rng))
    return torch.round(y)


def _absmax_levels(
    x: torch.Tensor, qmax: int, stochastic: bool, rng: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale (absmax / qmax) and signed integer levels of a `[rows, cols]` tensor."""
    scale = x.abs().amax(dim=1) / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    levels = _round(x / safe[:, None], stochastic, rng).clamp_(-qmax, qmax)
    return scale, levels


def _check_levels(reader: Reader, levels: np.ndarray, top: int) -> None:
    if len(levels) and levels.max() > top:
        raise reader.fail(f"quantization level {int(levels.max())} exceeds {top}")


def values_bound(fmt: str, n: int) -> int:
    """Bytes `encode_values` writes for `n` values (exact, so also the bound)."""
    if fmt in _INT_MAX:
        return 4 + packed_size(n, _INT_BITS[fmt])
    return n * (4 if fmt == "fp32" else 2)


def encode_values(v: torch.Tensor, fmt: str) -> bytes:
    """Values kept by a sparsifier: raw floats, or one absmax scale plus rounded levels."""
    if fmt == "fp32":
        return v.numpy().astype("<f4").tobytes()
    if fmt == "fp16":
        return v.clamp(-65504.0, 65504.0).numpy().astype("<f2").tobytes()
    if fmt == "bf16":
        return v.to(torch.bfloat16).view(torch.int16).numpy().astype("<i2").tobytes()
    qmax = _INT_MAX[fmt]
    scale, levels = _absmax_levels(v.view(1, -1), qmax, False, torch.Generator())
    packed = pack_uint((levels.view(-1).to(torch.int64) + qmax).numpy(), _INT_BITS[fmt])
    return np.float32(scale.item() if v.numel() else 0.0).tobytes() + packed


def decode_values(reader: Reader, n: int, fmt: str) -> torch.Tensor:
    if fmt == "fp32":
        out = torch.from_numpy(reader.array("<f4", n).astype(np.float32))
    elif fmt == "fp16":
        out = torch.from_numpy(reader.array("<f2", n).astype(np.float32))
    elif fmt == "bf16":
        raw = torch.from_numpy(reader.array("<i2", n).astype(np.int16))
        out = raw.view(torch.bfloat16).float()
    else:
        qmax = _INT_MAX[fmt]
        scale = reader.f32()
        levels = unpack_uint(reader, n, _INT_BITS[fmt])
        _check_levels(reader, levels, 2 * qmax)
        out = torch.from_numpy((levels - qmax).astype(np.float32)) * scale
    return finite(reader.codec, out)


class _BlockQuant:
    """Symmetric absmax quantization with one float32 scale per block."""

    name = "int"
    bits = 8
    qmax = 127

    def __init__(self, layout: Layout, block: int, stochastic: bool) -> None:
        if block < 0:
            raise ValueError(f"block = {block}: must be 0 (one scale) or a positive block size")
        self.numel = layout.numel
        self.block_option = block
        self.block = block or max(self.numel, 1)
        self.num_blocks = -(-self.numel // self.block)
        self.stochastic = stochastic
        self.header = varint_encode(np.array([block], dtype=np.int64))

    def init_state(self) -> CodecState:
        return {}

    def encode(
        self, x: torch.Tensor, state: CodecState, rng: torch.Generator
    ) -> tuple[bytes, CodecState]:
        x = check_input(self.name, x, self.numel)
        scale, levels = _absmax_levels(_blocks(x, self.block), self.qmax, self.stochastic, rng)
        codes = (levels.view(-1)[: self.numel].to(torch.int16) + self.qmax).numpy()
        payload = self.header + scale.numpy().astype("<f4").tobytes()
        return payload + pack_uint(codes, self.bits), state

    def decode(self, data: bytes) -> torch.Tensor:
        check_size(self.name, data, self.max_bytes(), self.max_bytes())
        reader = Reader(self.name, data)
        reader.expect("block size", reader.varint(), self.block_option)
        scales = reader.scales("block scales", self.num_blocks)
        codes = unpack_uint(reader, self.numel, self.bits)
        reader.finish()
        _check_levels(reader, codes, 2 * self.qmax)
        levels = torch.from_numpy((codes - self.qmax).astype(np.float32))
        scale = torch.from_numpy(scales.astype(np.float32))
        out = _blocks(levels, self.block) * scale[:, None]
        return finite(self.name, out.view(-1)[: self.numel].contiguous())

    def max_bytes(self) -> int:
        return len(self.header) + 4 * self.num_blocks + packed_size(self.numel, self.bits)


@CODECS.register("int8")
class Int8(_BlockQuant):
    """8-bit symmetric quantization with a float32 absmax scale per tensor or per block.

    Options: `block` (0 = one scale for the whole vector, else elements per scale),
    `stochastic` (unbiased stochastic rounding instead of round-to-nearest).
    Error bound: |x - decode| <= scale / 2 per element (scale for stochastic rounding).
    """

    name = "int8"

    def __init__(self, layout: Layout, block: int = 0, stochastic: bool = False) -> None:
        super().__init__(layout, block, stochastic)


@CODECS.register("int4")
class Int4(_BlockQuant):
    """4-bit symmetric quantization (levels -7..7), a float32 scale per block of 64 by default.

    Options: `block` (elements per scale; 0 = one scale), `stochastic` (unbiased rounding).
    About 4.5 bits per parameter with the default block; same error bound as `int8` with
    scale = block absmax / 7.
    """

    name = "int4"
    bits = 4
    qmax = 7

    def __init__(self, layout: Layout, block: int = 64, stochastic: bool = False) -> None:
        super().__init__(layout, block, stochastic)


@CODECS.register("bf16")
class BF16:
    """bfloat16 (2 bytes per parameter, float32's range, 8 bits of mantissa); round to nearest."""

    name = "bf16"

    def __init__(self, layout: Layout) -> None:
        self.numel = layout.numel

    def init_state(self) -> CodecState:
        return {}

    def encode(
        self, x: torch.Tensor, state: CodecState, rng: torch.Generator
    ) -> tuple[bytes, CodecState]:
        x = check_input(self.name, x, self.numel)
        return encode_values(x, "bf16"), state

    def decode(self, data: bytes) -> torch.Tensor:
        check_size(self.name, data, self.max_bytes(), self.max_bytes())
        return decode_values(Reader(self.name, data), self.numel, "bf16")

    def max_bytes(self) -> int:
        return 2 * self.numel


@CODECS.register("qsgd")
class QSGD:
    """QSGD: stochastic unbiased quantization to `levels` steps of each bucket's L2 norm.

    Alistarh et al. 2017, https://arxiv.org/abs/1610.02132. Per bucket: the float32 norm, then
    per entry sign * floor(levels * |v| / norm + u), u ~ U[0, 1); decode norm * level / levels.
    Options: `levels` (s, 1..32767), `bucket` (elements per norm; 0 = the whole vector).
    Entries pack in the smallest of 1/2/4/8/16 bits that holds 2s+1 codes (s=7: 4 bits).
    """

    name = "qsgd"

    def __init__(self, layout: Layout, levels: int = 7, bucket: int = 512) -> None:
        if not 1 <= levels <= 32767:
            raise ValueError(f"levels = {levels}: must be 1 to 32767")
        if bucket < 0:
            raise ValueError(f"bucket = {bucket}: must be 0 (whole vector) or positive")
        self.numel = layout.numel
        self.levels = levels
        self.bucket_option = bucket
        self.bucket = bucket or max(self.numel, 1)
        self.num_buckets = -(-self.numel // self.bucket)
        self.bits = next(b for b in (1, 2, 4, 8, 16) if (1 << b) > 2 * levels)
        self.header = varint_encode(np.array([levels, bucket], dtype=np.int64))

    def init_state(self) -> CodecState:
        return {}

    def encode(
        self, x: torch.Tensor, state: CodecState, rng: torch.Generator
    ) -> tuple[bytes, CodecState]:
        x = check_input(self.name, x, self.numel)
        rows = _blocks(x, self.bucket)
        norm = rows.norm(dim=1)
        safe = torch.where(norm > 0, norm, torch.ones_like(norm))
        mag = _round(rows.abs() * (self.levels / safe[:, None]), True, rng).clamp_(max=self.levels)
        signed = (torch.sign(rows) * mag).view(-1)[: self.numel].to(torch.int32) + self.levels
        payload = self.header + norm.numpy().astype("<f4").tobytes()
        return payload + pack_uint(signed.numpy(), self.bits), state

    def decode(self, data: bytes) -> torch.Tensor:
        check_size(self.name, data, self.max_bytes(), self.max_bytes())
        reader = Reader(self.name, data)
        reader.expect("levels", reader.varint(), self.levels)
        reader.expect("bucket size", reader.varint(), self.bucket_option)
        norms = reader.scales("bucket norms", self.num_buckets)
        codes = unpack_uint(reader, self.numel, self.bits)
        reader.finish()
        _check_levels(reader, codes, 2 * self.levels)
        signed = torch.from_numpy((codes - self.levels).astype(np.float32))
        scale = torch.from_numpy(norms.astype(np.float32)) / self.levels
        out = _blocks(signed, self.bucket) * scale[:, None]
        return finite(self.name, out.view(-1)[: self.numel].contiguous())

    def max_bytes(self) -> int:
        return len(self.header) + 4 * self.num_buckets + packed_size(self.numel, self.bits)
