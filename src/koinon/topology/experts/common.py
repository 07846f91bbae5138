"""What the experts and distillation topologies share: round records, codecs over any tensor
shape, grouping models by architecture, and evaluation."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from koinon.clients import LocalSGD
from koinon.compress.base import Codec
from koinon.data.datasets import Dataset
from koinon.data.federated import FederatedData
from koinon.local import CohortTrainer, LocalTraining, cross_entropy, evaluate
from koinon.params import Entry, Layout
from koinon.wire import Sender

CodecFactory = Callable[[Layout], Codec]


@dataclass
class DomainRound:
    """One round of a topology with per-domain metrics (a line of `metrics.jsonl`)."""

    round: int
    test_accuracy: float | None
    test_loss: float | None
    train_loss: float
    num_clients: int
    uplink_bytes: int
    downlink_bytes: int
    domain_accuracy: list[float] | None = None  # per owner's domain (test_groups), when known
    domain_loss: list[float] | None = None
    party_accuracy: list[float] | None = None  # distillation: each party's own model
    taid_t: float | None = None  # distillation with loss = "taid": the interpolation used

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def token_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample loss of a sequence model (`[B, T, V]` outputs, `[B, T]` or flattened targets):
    the mean over positions of the next-token cross-entropy. The cohort trainer hands a loss
    flattened targets when it trains several clients at once, so they are reshaped here."""
    targets = targets.reshape(outputs.shape[:-1])
    per_token = F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1), reduction="none")
    return per_token.view(targets.shape).mean(dim=-1)


def loss_for(dataset: Dataset) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training loss of a dataset: cross-entropy per sample, or per position averaged over
    the sequence for a language model (labels `[N, T]`)."""
    return token_cross_entropy if dataset.y_train.dim() > 1 else cross_entropy


def distill_into(module: nn.Module, layout: Layout, start: torch.Tensor, x: torch.Tensor, target: torch.Tensor,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], local: LocalTraining,
                 seed: int, round_index: int) -> tuple[torch.Tensor, float]:
    """`start` (flat params of `module`) trained toward `target` log-probabilities on inputs `x`
    with `loss_fn(student_logits, target)`; returns the new params and the mean loss. The soft
    targets stand in for labels, so the one local trainer runs it (one model at a time: its
    rows are `[B, C]`)."""
    table = Dataset("soft targets", x, target, x[:1], target[:1], target.shape[-1])
    trainer = CohortTrainer(module, layout, FederatedData(table, [torch.arange(len(x))]), LocalSGD(), local,
                            loss_fn=loss_fn)
    result = trainer.train([0], start, {}, [{}], seed, round_index)
    assert result.deltas is not None
    return start + result.deltas[0], float(result.train_loss[0])


def tensor_layout(name: str, shape: tuple[int, ...]) -> Layout:
    """The layout of one tensor, so any codec can carry it (logits, an embedding)."""
    return Layout((Entry(name, tuple(shape), torch.float32, 0, True),))


class Channel:
    """One direction of a wire for tensors of several layouts: a codec and a `Sender` (codec
    state per sender) per layout, built on first use. Returns what the receiver decodes and the
    real payload length."""

    def __init__(self, factory: CodecFactory, seed: int, salt: int) -> None:
        self.factory = factory
        self.seed = seed
        self.salt = salt
        self.senders: dict[str, tuple[Codec, Sender]] = {}

    def _sender(self, layout: Layout) -> tuple[Codec, Sender]:
        key = layout.hash()
        if key not in self.senders:
            codec = self.factory(layout)
            self.senders[key] = (codec, Sender(codec, self.seed, ("delta",)))
        return self.senders[key]

    def send(self, sender: int, tensor: torch.Tensor, layout: Layout, round_index: int) -> tuple[torch.Tensor, int]:
        codec, s = self._sender(layout)
        payload = s.encode(sender, tensor.reshape(-1).float(), round_index, self.salt)
        return codec.decode(payload).reshape(tensor.shape), len(payload)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{key}/{k}": v for key, (_, s) in self.senders.items() for k, v in s.state_dict().items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], layouts: list[Layout]) -> None:
        for layout in layouts:
            key = layout.hash()
            mine = {k[len(key) + 1:]: v for k, v in tensors.items() if k.startswith(key + "/")}
            if mine:
                self._sender(layout)[1].load_state_dict(mine)


def groups_by_layout(modules: list[nn.Module]) -> dict[str, list[int]]:
    """Indices of `modules` grouped by architecture (layout hash), in first-seen order: each
    group trains as one lock-step cohort."""
    groups: dict[str, list[int]] = {}
    for i, m in enumerate(modules):
        groups.setdefault(Layout.from_module(m).hash(), []).append(i)
    return groups


def seed_from(source: nn.Module, target: nn.Module) -> None:
    """Start `target` from `source`'s weights: equal shapes are copied; a tensor of another
    shape (a wider or narrower expert) takes the overlapping leading block and keeps its own
    seeded initialization elsewhere; names `source` lacks (a deeper expert) keep theirs."""
    src = dict(source.named_parameters())
    with torch.no_grad():
        for name, p in target.named_parameters():
            q = src.get(name)
            if q is None or q.dim() != p.dim():
                continue
            block = tuple(slice(0, min(a, b)) for a, b in zip(p.shape, q.shape, strict=True))
            p[block] = q[block]


def domain_metrics(module: nn.Module, layout: Layout, params: torch.Tensor,
                   domains: list[tuple[torch.Tensor, torch.Tensor]] | None) -> tuple[list[float], list[float]] | None:
    if domains is None:
        return None
    pairs = [evaluate(module, layout, params, x, y) for x, y in domains]
    return [round(a, 6) for a, _ in pairs], [round(v, 6) for _, v in pairs]
