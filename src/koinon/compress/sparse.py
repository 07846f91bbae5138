"""Sparsifiers: `topk` (exact or DGC's sampled threshold), `randomk`, `threshold`.

All three are biased (except `randomk` with `rescale`), so wrap them in `ef` for training.
A sparse payload is: the value format byte, a varint count, the index set (bitmap, varint gaps
or Rice gaps, whichever is smallest: see `entropy.py`), then the kept values in `values` format
(fp32, fp16, bf16, int8 or int4 with one absmax scale). `randomk` sends no indices at all: the
receiver regenerates them from an 8-byte seed.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from koinon.compress.base import CODECS, CodecState
from koinon.compress.entropy import decode_indices, encode_indices, index_bound
from koinon.compress.quant import VALUE_FORMATS, decode_values, encode_values, values_bound
from koinon.compress.wire import Reader, check_input, check_size, varint_encode
from koinon.params import Layout


def check_format(fmt: str) -> str:
    if fmt not in VALUE_FORMATS:
        raise ValueError(f"values = {fmt!r}: allowed {', '.join(VALUE_FORMATS)}")
    return fmt


def keep_count(ratio: float, numel: int) -> int:
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio = {ratio}: must be in (0, 1]")
    return min(numel, math.ceil(ratio * numel))


def sparse_bound(max_count: int, numel: int, fmt: str) -> int:
    return 1 + 5 + index_bound(max_count, numel) + values_bound(fmt, max_count)


def encode_sparse(idx: torch.Tensor, x: torch.Tensor, fmt: str) -> bytes:
    """`x[idx]` as a sparse payload; `idx` is sorted ascending and unique."""
    head = bytes([VALUE_FORMATS.index(fmt)]) + varint_encode(np.array([idx.numel()]))
    return head + encode_indices(idx.numpy(), x.numel()) + encode_values(x[idx], fmt)


def decode_sparse(reader: Reader, numel: int, fmt: str, max_count: int) -> torch.Tensor:
    """Dense tensor of a sparse payload, the count checked against `max_count` first."""
    reader.expect("value format", reader.u8(), VALUE_FORMATS.index(fmt))
    count = reader.count("index count", max_count)
    idx = decode_indices(reader, count, numel)
    values = decode_values(reader, count, fmt)
    out = torch.zeros(numel)
    out[torch.from_numpy(idx)] = values
    return out


def exact_topk(absx: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted indices of the `k` largest entries (ties broken by position).

    A numpy partition for the k-th value plus one comparison pass is about 3x faster than
    `torch.topk` on 1e7 entries, and yields the indices already in order.
    """
    n = absx.numel()
    if k >= n:
        return torch.arange(n)
    if k <= 0:
        return torch.zeros(0, dtype=torch.int64)
    thr = float(np.partition(absx.numpy(), n - k)[n - k])
    above = torch.nonzero(absx > thr).view(-1)
    if above.numel() == k:
        return above
    ties = torch.nonzero(absx == thr).view(-1)[: k - above.numel()]
    return torch.sort(torch.cat([above, ties])).values


def sampled_topk(absx: torch.Tensor, k: int, rng: torch.Generator) -> torch.Tensor:
    """DGC's threshold by sampling: at most `k` indices near the top-k, without a full top-k.

    Samples about 1% of the entries (at least 2n/k), takes the threshold from the sampled
    top fraction, lowers it by 0.8x up to 10 times while fewer than 0.8k pass, and falls back
    to an exact top-k among the survivors when more than k pass.
    """
    n = absx.numel()
    if k == 0 or n == 0:
        return torch.zeros(0, dtype=torch.int64)
    num_samples = min(n, max(math.ceil(0.01 * n), math.ceil(2 * n / k)))
    sample = absx[torch.randint(n, (num_samples,), generator=rng)]
    top = max(1, math.ceil(k / n * num_samples))
    thr = torch.topk(sample, top, sorted=False).values.min()
    for _ in range(10):
        idx = torch.nonzero(absx >= thr).view(-1)
        if idx.numel() >= 0.8 * k:
            break
        thr = thr * 0.8
    if idx.numel() > k:
        idx = idx[exact_topk(absx[idx], k)]
    return idx


class _SparseCodec:
    name = "sparse"

    def __init__(self, layout: Layout, values: str, max_count: int) -> None:
        self.numel = layout.numel
        self.fmt = check_format(values)
        self.max_count = max_count

    def init_state(self) -> CodecState:
        return {}

    def decode(self, data: bytes) -> torch.Tensor:
        check_size(self.name, data, self.max_bytes())
        reader = Reader(self.name, data)
        out = decode_sparse(reader, self.numel, self.fmt, self.max_count)
        reader.finish()
        return out

    def max_bytes(self) -> int:
        return sparse_bound(self.max_count, self.numel, self.fmt)


@CODECS.register("topk")
class TopK(_SparseCodec):
    """Top-k by magnitude: keeps ceil(ratio * P) entries (biased; wrap in `ef` to train).

    Options: `ratio` (kept fraction), `values` (fp32|fp16|bf16|int8|int4 for kept values),
    `sampled` (DGC's sampled threshold instead of an exact top-k: faster on large vectors,
    may keep slightly fewer than k). Add `zstd` around it for the entropy stage.
    """

    name = "topk"

    def __init__(
        self, layout: Layout, ratio: float = 0.01, values: str = "fp32", sampled: bool = False
    ) -> None:
        super().__init__(layout, values, keep_count(ratio, layout.numel))
        self.sampled = sampled

    def encode(
        self, x: torch.Tensor, state: CodecState, rng: torch.Generator
    ) -> tuple[bytes, CodecState]:
        x = check_input(self.name, x, self.numel)
        absx = x.abs()
        if self.sampled:
            idx = torch.sort(sampled_topk(absx, self.max_count, rng)).values
        else:
            idx = exact_topk(absx, self.max_count)
        return encode_sparse(idx, x, self.fmt), state


@CODECS.register("threshold")
class Threshold(_SparseCodec):
    """Keeps the entries with |x| >= `threshold`; the count varies from round to round.

    Options: `threshold` (absolute magnitude), `values` (format of the kept values).
    The size bound is the all-kept case (a bitmap plus every value).
    """

    name = "threshold"

    def __init__(self, layout: Layout, threshold: float = 1e-3, values: str = "fp32") -> None:
        if threshold < 0:
            raise ValueError(f"threshold = {threshold}: must be >= 0")
        super().__init__(layout, values, layout.numel)
        self.threshold = threshold

    def encode(
        self, x: torch.Tensor, state: CodecState, rng: torch.Generator
    ) -> tuple[bytes, CodecState]:
        x = check_input(self.name, x, self.numel)
        idx = torch.nonzero(x.abs() >= self.threshold).view(-1)
        return encode_sparse(idx, x, self.fmt), state


@CODECS.register("randomk")
class RandomK:
    """Random-k: ceil(ratio * P) uniformly chosen entries; indices regenerated from a seed.

    Options: `ratio`, `values` (format of kept values), `rescale` (multiply by P/k so the
    estimate is unbiased; leave off under `ef`). Payload: format byte, 8-byte seed, values.
    """

    name = "randomk"

    def __init__(
        self, layout: Layout, ratio: float = 0.01, values: str = "fp32", rescale: bool = False
    ) -> None:
        self.numel = layout.numel
        self.k = keep_count(ratio, layout.numel)
        self.fmt = check_format(values)
        self.gain = self.numel / self.k if rescale and self.k else 1.0

    def init_state(self) -> CodecState:
        return {}

    def _indices(self, seed: int) -> torch.Tensor:
        # numpy's set-based sampling without replacement is O(k), unlike a full randperm
        chosen = np.random.default_rng(seed).choice(self.numel, self.k, replace=False)
        return torch.from_numpy(np.sort(chosen))

    def encode(
        self, x: torch.Tensor, state: CodecState, rng: torch.Generator
    ) -> tuple[bytes, CodecState]:
        x = check_input(self.name, x, self.numel)
        seed = int(torch.randint(0, 2**62, (1,), generator=rng).item())
        values = encode_values(x[self._indices(seed)] * self.gain, self.fmt)
        return bytes([VALUE_FORMATS.index(self.fmt)]) + seed.to_bytes(8, "little") + values, state

    def decode(self, data: bytes) -> torch.Tensor:
        check_size(self.name, data, self.max_bytes(), self.max_bytes())
        reader = Reader(self.name, data)
        reader.expect("value format", reader.u8(), VALUE_FORMATS.index(self.fmt))
        seed = int.from_bytes(reader.take(8), "little")
        values = decode_values(reader, self.k, self.fmt)
        reader.finish()
        out = torch.zeros(self.numel)
        out[self._indices(seed)] = values
        return out

    def max_bytes(self) -> int:
        return 1 + 8 + values_bound(self.fmt, self.k)
