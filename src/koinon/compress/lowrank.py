"""`powersgd`: rank-r approximation per layer by one power-iteration step, with error feedback.

Vogels et al. 2019, https://arxiv.org/abs/1905.13727, as in PyTorch's DDP comm hook but for one
owner: M = x + e per layout entry with 2+ dims (reshaped to shape[0] x rest); P = M Q, P
orthonormalized, Q = M^T P; the receiver rebuilds P Q^T; e <- M - P Q^T. Q is kept in the state
and reused next round (warm start), which makes the single power step converge over rounds.
A matrix is only compressed when (n + m) r * `min_compression` < n m; others go dense (float32).
The initial Q comes from a fixed seed so every owner starts alike (the DDP hook does the same).
"""

from __future__ import annotations

import numpy as np
import torch

from koinon.compress.base import CODECS, CodecState
from koinon.compress.wire import Reader, check_input, check_size, finite
from koinon.params import Layout


def _orthonormal(p: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(p, mode="reduced").Q


@CODECS.register("powersgd")
class PowerSGD:
    """PowerSGD: per-layer rank-r factors P, Q (float32) with warm start and error feedback.

    Options: `rank` (r), `warm_start` (reuse Q across rounds; else a fresh Gaussian Q from the
    encode rng), `error_feedback`, `min_compression` (compress an n x m matrix only if
    (n+m) r * min_compression < n m). State: `q` (all Q factors, flat) and `error` (if enabled).
    """

    name = "powersgd"

    def __init__(
        self,
        layout: Layout,
        rank: int = 1,
        warm_start: bool = True,
        error_feedback: bool = True,
        min_compression: float = 2.0,
    ) -> None:
        if not 1 <= rank <= 255:
            raise ValueError(f"rank = {rank}: must be 1 to 255")
        if min_compression < 1.0:
            # below 1 a "compressed" matrix could need rank >= min(n, m), which QR cannot give
            raise ValueError(f"min_compression = {min_compression}: must be >= 1")
        self.numel = layout.numel
        self.rank, self.warm_start, self.error_feedback = rank, warm_start, error_feedback
        # (offset, numel, rows, cols, q_offset) per entry; rows = 0 marks a dense entry
        self.plan: list[tuple[int, int, int, int, int]] = []
        q_size = 0
        for e in layout.entries:
            n = e.shape[0] if len(e.shape) > 1 else 0
            m = e.numel // n if n else 0
            if n and (n + m) * rank * min_compression < n * m:
                self.plan.append((e.offset, e.numel, n, m, q_size))
                q_size += m * rank
            else:
                self.plan.append((e.offset, e.numel, 0, 0, 0))
        self.q_size = q_size

    def init_state(self) -> CodecState:
        q = torch.randn(self.q_size, generator=torch.Generator().manual_seed(0))
        state = {"q": q}
        if self.error_feedback:
            state["error"] = torch.zeros(self.numel)
        return state

    def encode(
        self, x: torch.Tensor, state: CodecState, rng: torch.Generator
    ) -> tuple[bytes, CodecState]:
        full = check_input(self.name, x, self.numel)
        if self.error_feedback:
            full = full + state["error"]
        q_all = state["q"] if self.warm_start else torch.randn(self.q_size, generator=rng)
        q_new = torch.empty(self.q_size)
        sent = torch.empty(self.numel)
        chunks = [bytes([self.rank])]
        for offset, numel, n, m, q_offset in self.plan:
            block = full[offset : offset + numel]
            if not n:  # dense entry
                chunks.append(block.numpy().astype("<f4").tobytes())
                sent[offset : offset + numel] = block
                continue
            mat = block.view(n, m)
            p = _orthonormal(mat @ q_all[q_offset : q_offset + m * self.rank].view(m, self.rank))
            q = mat.T @ p
            chunks += [p.numpy().astype("<f4").tobytes(), q.numpy().astype("<f4").tobytes()]
            sent[offset : offset + numel] = (p @ q.T).view(-1)
            q_new[q_offset : q_offset + m * self.rank] = q.reshape(-1)
        new_state = {"q": q_new}
        if self.error_feedback:
            new_state["error"] = full - sent
        return b"".join(chunks), new_state

    def decode(self, data: bytes) -> torch.Tensor:
        check_size(self.name, data, self.max_bytes(), self.max_bytes())
        reader = Reader(self.name, data)
        reader.expect("rank", reader.u8(), self.rank)
        out = torch.empty(self.numel)
        for offset, numel, n, m, _ in self.plan:
            if not n:
                out[offset : offset + numel] = torch.from_numpy(reader.array("<f4", numel).copy())
                continue
            p = torch.from_numpy(reader.array("<f4", n * self.rank).astype(np.float32))
            q = torch.from_numpy(reader.array("<f4", m * self.rank).astype(np.float32))
            out[offset : offset + numel] = (p.view(n, -1) @ q.view(m, -1).T).view(-1)
        reader.finish()
        return finite(self.name, out)

    def max_bytes(self) -> int:
        dense = sum(numel for _, numel, n, _, _ in self.plan if not n)
        factors = sum((n + m) * self.rank for _, _, n, m, _ in self.plan if n)
        return 1 + 4 * (dense + factors)
