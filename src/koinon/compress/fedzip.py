"""`fedzip`: per-layer top-z, k-means quantization, Huffman symbols, gap-coded positions.

Malekijoo et al. 2021, https://arxiv.org/abs/2102.01593. Unlike the original, which only
*estimates* sizes (with an invalid Huffman code), everything here is serialized: per layout entry
with 2+ dims, the kept positions (bitmap, varint or Rice gaps), `clusters` float32 centroids,
the Huffman code lengths (one byte per cluster), and the cluster symbols as a canonical Huffman
code (level-ordered bits, see `entropy.py`). 1-D entries (biases) go dense in float32, as the
original skips them. k-means is 1-D Lloyd from linspace(min, max, k), so assignment is a
`bucketize` against the midpoints and an update is two `bincount`s.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from koinon.compress.base import CODECS, CodecState
from koinon.compress.entropy import (
    decode_indices,
    encode_indices,
    huffman_decode,
    huffman_encode,
    huffman_lengths,
    index_bound,
)
from koinon.compress.sparse import exact_topk, keep_count
from koinon.compress.wire import Reader, check_input, check_size, finite, varint_encode
from koinon.params import Layout


def kmeans_1d(values: torch.Tensor, k: int, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted centroids and each value's cluster after Lloyd iterations from an even grid."""
    centroids = torch.linspace(float(values.min()), float(values.max()), k)
    for step in range(iterations + 1):
        centroids = torch.sort(centroids).values
        symbols = torch.bucketize(values, (centroids[1:] + centroids[:-1]) / 2)
        if step == iterations:
            break
        counts = torch.bincount(symbols, minlength=k).to(torch.float32)
        sums = torch.zeros(k).index_add_(0, symbols, values)
        # an empty cluster keeps its centroid instead of collapsing to 0/0
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    return centroids, symbols


@CODECS.register("fedzip")
class FedZip:
    """FedZip: top-z per layer, k-means to `clusters` centroids, Huffman + position coding.

    Options: `ratio` (top-z keep fraction per 2+-D entry; the paper's code keeps 20%),
    `clusters` (k, 1..16), `iterations` (Lloyd steps). Biased: wrap in `ef` for training.
    """

    name = "fedzip"

    def __init__(
        self, layout: Layout, ratio: float = 0.2, clusters: int = 3, iterations: int = 4
    ) -> None:
        if not 1 <= clusters <= 16 or iterations < 0:
            raise ValueError("clusters must be 1 to 16 and iterations >= 0")
        self.numel = layout.numel
        self.k, self.iterations = clusters, iterations
        # (offset, numel, max kept) per entry; max kept = 0 marks a dense entry
        self.plan = [
            (e.offset, e.numel, keep_count(ratio, e.numel) if len(e.shape) > 1 else 0)
            for e in layout.entries
        ]

    def init_state(self) -> CodecState:
        return {}

    def _layer(self, block: torch.Tensor, kmax: int) -> bytes:
        idx = exact_topk(block.abs(), kmax)
        head = varint_encode(np.array([len(idx)])) + encode_indices(idx.numpy(), len(block))
        if not len(idx):
            return head
        centroids, symbols = kmeans_1d(block[idx], self.k, self.iterations)
        lengths = huffman_lengths(np.bincount(symbols.numpy(), minlength=self.k))
        return (
            head
            + centroids.numpy().astype("<f4").tobytes()
            + lengths.astype(np.uint8).tobytes()
            + huffman_encode(symbols.numpy(), lengths)
        )

    def encode(
        self, x: torch.Tensor, state: CodecState, rng: torch.Generator
    ) -> tuple[bytes, CodecState]:
        x = check_input(self.name, x, self.numel)
        chunks = [bytes([self.k])]
        for offset, numel, kmax in self.plan:
            block = x[offset : offset + numel]
            if kmax:
                chunks.append(self._layer(block, kmax))
            else:
                chunks.append(block.numpy().astype("<f4").tobytes())
        return b"".join(chunks), state

    def decode(self, data: bytes) -> torch.Tensor:
        check_size(self.name, data, self.max_bytes())
        reader = Reader(self.name, data)
        reader.expect("clusters", reader.u8(), self.k)
        out = torch.zeros(self.numel)
        for offset, numel, kmax in self.plan:
            if not kmax:
                out[offset : offset + numel] = torch.from_numpy(reader.array("<f4", numel).copy())
                continue
            count = reader.count("kept count", kmax)
            idx = decode_indices(reader, count, numel)
            if not count:
                continue
            centroids = torch.from_numpy(reader.array("<f4", self.k).copy())
            lengths = reader.array("u1", self.k).astype(np.int64)
            symbols = huffman_decode(reader, count, lengths)
            out[torch.from_numpy(idx + offset)] = centroids[torch.from_numpy(symbols)]
        reader.finish()
        return finite(self.name, out)

    def max_bytes(self) -> int:
        total = 1
        for _, numel, kmax in self.plan:
            if not kmax:
                total += 4 * numel
                continue
            huffman = 5 + math.ceil(kmax * max(1, self.k - 1) / 8)
            total += 5 + index_bound(kmax, numel) + 5 * self.k + huffman
        return total
