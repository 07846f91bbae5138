"""SPSA: zeroth-order local training whose upload is one byte per step ("Just One Byte").

Zelikman et al. 2023, "Just One Byte (per gradient): A Note on Low-Bandwidth Decentralized
Language Model Finetuning Using Shared Randomness", https://arxiv.org/abs/2306.10765.

At local step s, client c draws a direction z ~ N(0, I) from a seed everyone can compute
(run seed, round, client, step), measures the projected gradient on its minibatch with two
forward passes, g = [L(theta + eps z) - L(theta - eps z)] / (2 eps), quantizes it to one signed
byte on a fixed grid (`clip` / 127), and steps theta <- theta - lr * q(g) z. It sends only the
bytes; the server regenerates the z's and rebuilds the client's update exactly,
Delta = -lr * sum_s q(g_s) z_s. The client steps with the quantized scalar too, so what the
server rebuilds is what the client did (up to float summation order). No momentum or weight
decay: plain zeroth-order SGD, as in the paper.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from koinon.clients.base import CLIENT_ALGORITHMS, LocalSGD, State
from koinon.errors import CodecError
from koinon.local.trainer import start_stack
from koinon.seeding import generator
from koinon.update import CohortResult

if TYPE_CHECKING:
    from koinon.local.trainer import CohortTrainer


def spsa_direction(seed: int, round_index: int, client_id: int, step: int, numel: int) -> torch.Tensor:
    """The shared perturbation of one step: N(0, I), seeded by public values only."""
    return torch.randn(numel, generator=generator(seed, round_index, client_id, step, 0x5B5A))


@CLIENT_ALGORITHMS.register("spsa")
class SPSA(LocalSGD):
    """Zeroth-order SGD on shared random directions; uploads one byte per local step (Zelikman et al. 2023)."""

    name = "spsa"

    def __init__(self, epsilon: float = 1e-3, clip: float = 5.0) -> None:
        if epsilon <= 0:
            raise ValueError(f"client.epsilon must be > 0, got {epsilon}")
        if clip <= 0:
            raise ValueError(f"client.clip must be > 0, got {clip}")
        self.epsilon = epsilon
        self.clip = clip
        self.step_size = clip / 127.0

    def quantize(self, g: torch.Tensor) -> torch.Tensor:
        """int8 levels in -127..127 of the projected gradients (nearest, clipped)."""
        return torch.round(g.clamp(-self.clip, self.clip) / self.step_size).clamp(-127, 127)

    def encode_update(self, levels: torch.Tensor) -> bytes:
        """The wire payload: exactly one signed byte per local step."""
        return levels.to(torch.int8).numpy().tobytes()

    def decode_update(
        self, payload: bytes, seed: int, round_index: int, client_id: int, numel: int,
        lr: float, max_steps: int,
    ) -> torch.Tensor:
        """Rebuild a client's update from its bytes and the shared directions."""
        if len(payload) > max_steps:
            raise CodecError(self.name, f"payload has {len(payload)} scalars, at most {max_steps} allowed")
        levels = np.frombuffer(payload, dtype=np.int8)
        if (levels == -128).any():
            raise CodecError(self.name, "level -128 is outside -127..127")
        delta = torch.zeros(numel)
        for step, level in enumerate(levels.tolist()):
            if level:
                delta.add_(spsa_direction(seed, round_index, client_id, step, numel),
                           alpha=-lr * level * self.step_size)
        return delta

    @torch.no_grad()
    def train_cohort(
        self, trainer: CohortTrainer, client_ids: list[int], global_params: torch.Tensor,
        server_state: State, client_states: list[State], idx: torch.Tensor, steps: torch.Tensor,
        seed: int, round_index: int,
    ) -> CohortResult:
        """SPSA's local steps, in place of the trainer's gradient loop: two forward passes a
        step, no autograd; each client's payload is its levels, one byte a step."""
        k, pt, lr = len(client_ids), trainer.num_trainable, trainer.local.lr
        theta, bufs = start_stack(global_params, k, pt)
        weights = (idx >= 0).to(torch.float32)
        idx = idx.clamp(min=0)
        counts = weights.sum(dim=2)
        levels = torch.zeros(k, idx.shape[1])
        loss_sum, seen = torch.zeros(k), torch.zeros(k)
        trainer.module.train()

        def losses(th: torch.Tensor, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            out = trainer.forward_stack(th, bufs, x)
            per_sample = trainer.loss_fn(out.flatten(0, 1), y.flatten()).view(k, -1)
            return (per_sample * w).sum(dim=1)

        for s in range(idx.shape[1]):
            ix, w, n_b = idx[:, s], weights[:, s], counts[:, s]
            x, y = trainer.x_train[ix], trainer.y_train[ix]
            z = torch.stack([spsa_direction(seed, round_index, c, s, pt) for c in client_ids])
            plus = losses(theta + self.epsilon * z, x, y, w)
            minus = losses(theta - self.epsilon * z, x, y, w)
            g = (plus - minus) / (2 * self.epsilon * n_b.clamp_min(1.0))
            q = self.quantize(g) * (n_b > 0)
            levels[:, s] = q
            theta.sub_(z * (q * self.step_size * lr).unsqueeze(1))
            loss_sum += (plus + minus) / 2
            seen += n_b
        final = torch.cat([theta, bufs], dim=1)
        sizes = trainer.sizes(client_ids)
        messages = [self.encode_update(levels[i, : int(steps[i])]) for i in range(k)]
        return CohortResult(
            list(client_ids), final - global_params, {}, sizes, steps,
            loss_sum / seen.clamp_min(1.0), [{} for _ in client_ids], messages,
        )
