"""Distillation losses and knowledge fusion for federated distillation (FedMD / FedDF style).

Parties exchange predictions on a shared proxy set instead of weights; each then pulls its own
model toward a target distribution built from its peers' predictions. Every loss here is
per-sample (`reduction='none'`), takes the student's logits `[B, C]` and the target's
log-probabilities `[B, C]`, and is scaled by `T^2` at temperature `T` (Hinton et al.), so the
local trainer can use it as its `loss_fn` with the targets in place of labels.

* `kl`: forward KL(target || student), the FedMD / FedDF consensus loss.
* `bdkd` (BD-KD, https://arxiv.org/abs/2212.12965): forward and reverse KL balanced per sample
  by the entropy gap. Our reading of its sample-wise weighting: where the student is less
  confident than the target (higher entropy) the mode-seeking reverse KL gets weight `balance`
  and the forward KL 1; where it is more confident, the mass-covering forward KL gets `balance`.
* `taid` (TAID, https://arxiv.org/abs/2501.16937): KL(p_t || student) toward the interpolated
  target p_t = softmax((1 - t) * stopgrad(student logits) + t * target log-probs), with t rising
  from `t_start` to 1 (`TaidSchedule`: at least linear in the round, faster while the objective
  keeps improving, as the paper's adaptive update).
* `knfu_weights` (KnFu: Effective Knowledge Fusion, 2024): each party fuses only its peers'
  *effective* knowledge: peers are weighted by how close their predictions are to its own on
  the proxy set (a softmax of minus the KL divergence over a temperature), and only its
  `neighbours` most relevant peers (semantic neighbours) count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSSES = ("kl", "bdkd", "taid", "knfu")


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(p || q) from log-probabilities over the last dimension."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def entropy(log_p: torch.Tensor) -> torch.Tensor:
    return -(log_p.exp() * log_p).sum(dim=-1)


def kl_loss(student_logits: torch.Tensor, target_log_probs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 KL(target || student at temperature T), per sample."""
    log_s = F.log_softmax(student_logits / temperature, dim=-1)
    return temperature**2 * _kl(target_log_probs, log_s)


def bdkd_loss(student_logits: torch.Tensor, target_log_probs: torch.Tensor, temperature: float = 1.0,
              balance: float = 2.0) -> torch.Tensor:
    """BD-KD: per sample, the divergence that corrects the student's confidence weighs `balance`,
    the other 1 (see the module docstring)."""
    log_s = F.log_softmax(student_logits / temperature, dim=-1)
    forward = _kl(target_log_probs, log_s)
    reverse = _kl(log_s, target_log_probs)
    student_unsure = entropy(log_s) > entropy(target_log_probs)
    w_forward = torch.where(student_unsure, 1.0, balance)
    w_reverse = torch.where(student_unsure, balance, 1.0)
    return temperature**2 * (w_forward * forward + w_reverse * reverse)


def taid_target(student_logits: torch.Tensor, target_log_probs: torch.Tensor, t: float,
                temperature: float = 1.0) -> torch.Tensor:
    """TAID's intermediate target (log-probabilities): interpolated in logit space between the
    detached student and the target."""
    mixed = (1.0 - t) * (student_logits.detach() / temperature) + t * target_log_probs
    return F.log_softmax(mixed, dim=-1)


def taid_loss(student_logits: torch.Tensor, target_log_probs: torch.Tensor, t: float,
              temperature: float = 1.0) -> torch.Tensor:
    return kl_loss(student_logits, taid_target(student_logits, target_log_probs, t, temperature), temperature)


@dataclass
class TaidSchedule:
    """TAID's interpolation parameter t over rounds 0..`rounds`.

    After each round with distillation objective J: delta = (J_prev - J) / (J_prev + eps),
    m = beta m + (1 - beta) delta, and t <- min(1, max(linear(r), t + alpha sigmoid(m) (1 - t)))
    where linear(r) = t_start + (1 - t_start) r / rounds: t never lags the linear schedule, and
    moves ahead of it while the student keeps improving."""

    t_start: float = 0.4
    rounds: int = 30
    alpha: float = 0.1
    beta: float = 0.9
    t: float = -1.0
    momentum: float = 0.0
    previous: float = math.nan

    def __post_init__(self) -> None:
        if not 0.0 <= self.t_start < 1.0 or self.rounds < 1 or not 0.0 <= self.alpha <= 1.0 or not 0.0 <= self.beta < 1.0:
            raise ValueError("taid needs t_start in [0, 1), taid_rounds >= 1, alpha in [0, 1], beta in [0, 1)")
        if self.t < 0:
            self.t = self.t_start

    def linear(self, round_index: int) -> float:
        return min(1.0, self.t_start + (1.0 - self.t_start) * round_index / self.rounds)

    def update(self, objective: float, round_index: int) -> float:
        """The t for the round after `round_index` (from 1), given this round's objective."""
        if not math.isnan(self.previous):
            delta = (self.previous - objective) / (self.previous + 1e-8)
            self.momentum = self.beta * self.momentum + (1.0 - self.beta) * delta
        self.previous = objective
        step = self.alpha / (1.0 + math.exp(-self.momentum)) * (1.0 - self.t)
        self.t = min(1.0, max(self.linear(round_index), self.t + step))
        return self.t

    def state(self) -> torch.Tensor:
        return torch.tensor([self.t, self.momentum, self.previous], dtype=torch.float64)

    def load(self, state: torch.Tensor) -> None:
        self.t, self.momentum, self.previous = (float(v) for v in state.tolist())


def consensus(log_probs: torch.Tensor) -> torch.Tensor:
    """FedMD's consensus: the mean of the parties' probabilities `[N, B, C]` -> log `[B, C]`."""
    return torch.logsumexp(log_probs, dim=0) - math.log(len(log_probs))


def knfu_weights(log_probs: torch.Tensor, neighbours: int, temperature: float = 1.0) -> torch.Tensor:
    """`[N, N]` fusion weights: row k is a softmax of -KL(p_k || p_j) / temperature (the mean
    over the proxy samples) over party k itself and its `neighbours` most relevant peers, zero
    on the other peers. A party's own knowledge (divergence 0) always takes part: without it a
    party alone in its domain would be pulled toward peers that know nothing of it."""
    n = len(log_probs)
    if n < 2:
        raise ValueError("knfu needs at least two parties")
    divergence = torch.stack([_kl(log_probs[k].unsqueeze(0), log_probs).mean(dim=-1) for k in range(n)])
    scores = -divergence / temperature
    peers = scores.clone()
    peers.fill_diagonal_(float("-inf"))
    keep = min(max(neighbours, 1), n - 1)
    kth = peers.topk(keep, dim=1).values[:, -1:]
    drop = (peers < kth) & ~torch.eye(n, dtype=torch.bool)
    return scores.masked_fill(drop, float("-inf")).softmax(dim=1)


def fuse(log_probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each party's fused target `[N, B, C]` (log-probabilities): row k of `weights` `[N, N]`
    mixes the parties' probabilities."""
    return torch.log(torch.einsum("kj,jbc->kbc", weights, log_probs.exp()).clamp_min(1e-30))
