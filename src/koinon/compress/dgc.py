"""Deep Gradient Compression as a stateful codec (Lin et al. 2018, https://arxiv.org/abs/1712.01887).

Per encode, on the owner's update x (treated as the gradient):
1. optional local clipping of x to L2 norm `clip_norm` (the paper uses thr * N^-1/2 for N
   workers: pass that product);
2. momentum correction u <- m u + x, v <- v + u (Nesterov: u <- m (u + x), v <- v + u + x);
3. per layout entry with 2+ dims keep the top ceil(r_t * n) of |v| (DGC's sampled threshold or
   exact); 1-D entries (biases, norms) are sent whole but still go through the momentum memory;
4. momentum factor masking: u <- 0 at the sent indices, and v loses what was sent.
The keep ratio r_t follows the warm-up schedule 4^-1, 4^-2, ... (75%, 93.75%, ... sparsity) in
`warmup_stages` equal stages over `warmup_rounds` rounds, never below `ratio`. The round index is a
0-d counter in the state. The receiver averages the decoded tensors; the optimizer applying them
must not add momentum again (momentum lives in u).
"""

from __future__ import annotations

import math

import torch

from koinon.compress.base import CODECS, CodecState
from koinon.compress.sparse import (
    check_format,
    decode_sparse,
    encode_sparse,
    exact_topk,
    sampled_topk,
    sparse_bound,
)
from koinon.compress.wire import Reader, check_input, check_size
from koinon.params import Layout


@CODECS.register("dgc")
class DGC:
    """Deep Gradient Compression: momentum correction, masking, clipping, warm-up sparsity.

    Options: `ratio` (final keep ratio, 0.001 = 99.9% sparsity), `momentum` (m), `nesterov`,
    `clip_norm` (local L2 clipping before accumulation; 0 = off), `warmup_rounds` (rounds of the
    exponential warm-up; 0 = none), `warmup_stages` (stages of that warm-up), `sampled` (DGC's
    sampled threshold instead of exact top-k), `values` (format of sent values).
    State: `u` (momentum), `v` (accumulated velocity), `round` (0-d int64 counter).
    """

    name = "dgc"

    def __init__(
        self,
        layout: Layout,
        ratio: float = 0.001,
        momentum: float = 0.9,
        nesterov: bool = False,
        clip_norm: float = 0.0,
        warmup_rounds: int = 0,
        warmup_stages: int = 4,
        sampled: bool = True,
        values: str = "fp32",
    ) -> None:
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio = {ratio}: must be in (0, 1]")
        if not 0.0 <= momentum < 1.0 or clip_norm < 0 or warmup_rounds < 0 or warmup_stages < 1:
            raise ValueError(
                "need 0 <= momentum < 1, clip_norm >= 0, warmup_rounds >= 0, stages >= 1"
            )
        self.numel = layout.numel
        self.ratio, self.momentum, self.nesterov = ratio, momentum, nesterov
        self.clip_norm = clip_norm
        self.warmup_rounds, self.warmup_stages = warmup_rounds, warmup_stages
        self.sampled = sampled
        self.fmt = check_format(values)
        self.slices = [(e.offset, e.numel, len(e.shape) > 1) for e in layout.entries]
        peak = self.keep_ratio(0)
        self.max_count = sum(
            min(n, math.ceil(peak * n)) if sparse else n for _, n, sparse in self.slices
        )

    def keep_ratio(self, round_index: int) -> float:
        """Fraction of each compressed entry sent in round `round_index` (warm-up schedule)."""
        if round_index >= self.warmup_rounds:
            return self.ratio
        stage = round_index * self.warmup_stages // self.warmup_rounds
        return max(self.ratio, 0.25 ** (stage + 1))

    def init_state(self) -> CodecState:
        zeros = torch.zeros(self.numel)
        return {"u": zeros, "v": zeros.clone(), "round": torch.tensor(0, dtype=torch.int64)}

    def _select(self, v: torch.Tensor, ratio: float, rng: torch.Generator) -> torch.Tensor:
        parts = []
        for offset, n, sparse in self.slices:
            if not sparse:
                parts.append(torch.arange(offset, offset + n))
                continue
            k = min(n, math.ceil(ratio * n))
            absv = v[offset : offset + n].abs()
            local = sampled_topk(absv, k, rng) if self.sampled else exact_topk(absv, k)
            parts.append(torch.sort(local).values + offset)
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)

    def encode(
        self, x: torch.Tensor, state: CodecState, rng: torch.Generator
    ) -> tuple[bytes, CodecState]:
        g = check_input(self.name, x, self.numel)
        if self.clip_norm > 0:
            g = g * min(1.0, self.clip_norm / (float(g.norm()) + 1e-12))
        if self.nesterov:
            u = self.momentum * (state["u"] + g)
            v = state["v"] + u + g
        else:
            u = self.momentum * state["u"] + g
            v = state["v"] + u
        round_index = int(state["round"])
        idx = self._select(v, self.keep_ratio(round_index), rng)
        payload = encode_sparse(idx, v, self.fmt)
        u[idx] = 0.0
        new_state = {"u": u, "v": v - self.decode(payload), "round": state["round"] + 1}
        return payload, new_state

    def decode(self, data: bytes) -> torch.Tensor:
        check_size(self.name, data, self.max_bytes())
        reader = Reader(self.name, data)
        out = decode_sparse(reader, self.numel, self.fmt, self.max_count)
        reader.finish()
        return out

    def max_bytes(self) -> int:
        return sparse_bound(self.max_count, self.numel, self.fmt)
