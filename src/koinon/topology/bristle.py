"""Bristle: decentralized learning of an output layer over frozen pretrained features.

"Bristle: Decentralized Federated Learning in Byzantine, Non-i.i.d. Environments" (arXiv,
October 2021; one of our seed papers). Three ideas, each here:

* Transfer learning. The feature layers are pretrained once and frozen; only the output layer
  (the model's last `nn.Linear`, "the head") is trained and exchanged. We pretrain centrally on a
  seeded *public* split: a fraction of every client's training samples is set aside before
  training starts (those samples are nobody's private data any more, and no download is
  needed). The head is then reset to zero, so nodes must still learn it from their non-IID data
  and from each other. Frozen parameters become non-trainable entries of the `Layout`, so local
  training touches only the head, and only the head crosses the wire.
* A distance-based prioritizer. A node ranks its neighbours' heads by Euclidean distance to its
  own and considers the `closest` nearest, plus `explore` others drawn at random (seeded), so
  that honest heads trained on other classes still get a chance under label skew. `explore`
  is 0 by default: the far heads it re-admits are mostly the attackers' (noise, flipped heads),
  and the integrator below can only partly test rows of classes a node has no samples of.
* A performance-based integrator, per class. Features are frozen, so a head is judged on the
  node's own samples in one matrix product. For each class c and each prioritized neighbour j,
  the node plugs j's row for c (weights and bias) into its own head and measures its local
  accuracy: a row that loses more than `tolerance` against the node's own accuracy is refused
  for that class. Familiar classes (the node has samples of c) test recall of c; unfamiliar ones
  test that j's row does not claim the node's samples for c, which is what a flipped or noisy
  row often does. The node's new row c is the accuracy-weighted mean of its own row and the
  accepted ones. This per-class test is our reading of the paper's integrator, not a copy of its
  exact weighting function.

`defense = False` keeps the head-only exchange but mixes with plain Metropolis-Hastings
averaging: the baseline that shows what the prioritizer and integrator are for.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from koinon.clients import LocalSGD, LocalTraining
from koinon.data.federated import FederatedData
from koinon.local import CohortTrainer
from koinon.params import Layout
from koinon.seeding import mix_seed
from koinon.topology.peers import Links, PeerNetwork


@dataclass(frozen=True)
class BristleOptions:
    """`topology.options.bristle = { ... }` (or `bristle = true` for these defaults)."""

    public_fraction: float = 0.1  # of every client's samples, set aside for pretraining
    pretrain_epochs: int = 40
    pretrain_lr: float = 0.05
    closest: int = 4  # prioritizer: the nearest heads considered each round
    explore: int = 0  # plus this many seeded random other neighbours
    tolerance: float = 0.15  # integrator: local accuracy a peer's class row may cost
    defense: bool = True  # False: head-only exchange with plain averaging (the baseline)

    def __post_init__(self) -> None:
        if not 0.0 < self.public_fraction < 1.0:
            raise ValueError(f"bristle.public_fraction must be in (0, 1), got {self.public_fraction}")
        if self.pretrain_epochs < 1 or self.pretrain_lr <= 0:
            raise ValueError("bristle needs pretrain_epochs >= 1 and pretrain_lr > 0")
        if self.closest < 1 or self.explore < 0 or not 0.0 <= self.tolerance <= 1.0:
            raise ValueError("bristle needs closest >= 1, explore >= 0 and tolerance in [0, 1]")

    @staticmethod
    def parse(value: bool | dict) -> BristleOptions | None:
        """`True` -> defaults, a dict -> those options (unknown keys refused), `False` -> None."""
        if value is False:
            return None
        if value is True:
            return BristleOptions()
        if not isinstance(value, dict):
            raise ValueError(f"bristle must be true, false or a table of options, got {value!r}")
        allowed = {f.name for f in dataclasses.fields(BristleOptions)}
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise ValueError(f"bristle options {unknown}: not known; allowed: {', '.join(sorted(allowed))}")
        return BristleOptions(**value)


def head_of(model: nn.Module) -> tuple[str, nn.Linear]:
    """The output layer: the model's last module with parameters, which must be an `nn.Linear`."""
    owners = [(name, m) for name, m in model.named_modules()
              if any(True for _ in m.parameters(recurse=False))]
    if not owners or not isinstance(owners[-1][1], nn.Linear):
        raise ValueError("bristle needs a model whose last layer with parameters is an nn.Linear")
    name, module = owners[-1]
    assert isinstance(module, nn.Linear)
    return name, module


def reserve_public(data: FederatedData, fraction: float, seed: int) -> tuple[FederatedData, torch.Tensor]:
    """Set aside `fraction` of every client's samples (seeded) as the public pretraining split.

    Per client rather than globally, so each client keeps its share of the label skew.
    """
    gen = torch.Generator().manual_seed(mix_seed(seed, 0xB815))
    kept, public = [], []
    for idx in data.client_indices:
        order = idx[torch.randperm(len(idx), generator=gen)]
        cut = int(round(fraction * len(idx)))
        if len(idx) - cut < 1:
            cut = len(idx) - 1  # every client keeps at least one sample
        public.append(order[:cut])
        kept.append(order[cut:].sort().values)
    return FederatedData(data.dataset, kept), torch.cat(public).sort().values


def pretrain_and_freeze(model: nn.Module, data: FederatedData, public: torch.Tensor,
                        options: BristleOptions, seed: int) -> None:
    """Train the whole model on the public split (the shared local training: one 'client' that
    holds the public samples, SGD with momentum 0.9, batch 16), then zero the head and freeze
    the rest."""
    layout = Layout.from_module(model)
    local = LocalTraining(epochs=options.pretrain_epochs, batch_size=16, lr=options.pretrain_lr, momentum=0.9)
    trainer = CohortTrainer(model, layout, FederatedData(data.dataset, [public]), LocalSGD(), local)
    start = layout.flatten(model)
    result = trainer.train([0], start, {}, [{}], mix_seed(seed, 0xB816), 0)
    assert result.deltas is not None
    layout.load_into(model, start + result.deltas[0])
    _, head = head_of(model)
    with torch.no_grad():
        head.weight.zero_()
        if head.bias is not None:
            head.bias.zero_()
    head_params = {id(p) for p in head.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in head_params)


@torch.no_grad()
def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The frozen features: what the output layer receives, `[n, d]`."""
    _, head = head_of(model)
    captured: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _m, inputs: captured.append(inputs[0].detach()))
    try:
        model.eval()
        model(x)
        model.train()
    finally:
        hook.remove()
    return captured[0].reshape(len(x), -1)


def swap_accuracy(mine: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`[M, C]`: the node's accuracy when candidate m's logit for class c replaces its own.

    `mine` `[n, C]` are the node's logits, `logits` `[M, n, C]` the candidates'. With column c
    swapped, a sample is predicted c when the candidate's logit beats the best of the node's
    other columns (ties go to the lower index, as `argmax`), else that best column; the best
    other column of every (sample, c) is computed once for all candidates.
    """
    n, num_classes = mine.shape
    classes = torch.arange(num_classes)
    others = mine.unsqueeze(1).repeat(1, num_classes, 1)  # [n, C (swapped), C]
    others[:, classes, classes] = float("-inf")
    other_index = others.argmax(dim=2)  # first maximum, as argmax over the swapped row
    other_value = others.gather(2, other_index.unsqueeze(2)).squeeze(2)
    swapped = logits  # [M, n, C]
    wins = (swapped > other_value) | ((swapped == other_value) & (classes < other_index))
    correct = torch.where(wins, classes == y.unsqueeze(1), other_index == y.unsqueeze(1))
    return correct.float().mean(dim=1)


class BristleMixer:
    """Per node: prioritize neighbours' heads by distance, integrate per class by local accuracy.

    Heads are the first `head_numel` entries of a node's flat parameters (the only trainable
    ones): the weight `[C, d]` row-major, then the bias `[C]`.
    """

    def __init__(self, model: nn.Module, data: FederatedData, options: BristleOptions, seed: int) -> None:
        _, head = head_of(model)
        self.num_classes, self.dim = head.weight.shape
        self.has_bias = head.bias is not None
        self.head_numel = head.weight.numel() + (self.num_classes if self.has_bias else 0)
        self.options = options
        self.seed = seed
        feats = features(model, data.dataset.x_train)
        self.local = [(feats[idx], data.dataset.y_train[idx]) for idx in data.client_indices]

    def split(self, heads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`[M, H]` flat heads -> weights `[M, C, d]` and biases `[M, C]`."""
        c, d = self.num_classes, self.dim
        weight = heads[:, : c * d].reshape(-1, c, d)
        bias = heads[:, c * d : c * d + c] if self.has_bias else torch.zeros(len(heads), c)
        return weight, bias

    def prioritize(self, own: torch.Tensor, peers: list[int], heads: torch.Tensor, node: int,
                   round_index: int) -> list[int]:
        """The `closest` neighbours by head distance, then `explore` seeded random others."""
        if not peers:
            return []
        distance = (heads[peers] - own).norm(dim=1)
        ranked = [peers[i] for i in torch.argsort(distance, stable=True).tolist()]
        chosen, rest = ranked[: self.options.closest], ranked[self.options.closest :]
        if rest and self.options.explore:
            rng = np.random.default_rng([self.seed, round_index, node, 0xB817])
            picks = rng.choice(len(rest), min(self.options.explore, len(rest)), replace=False)
            chosen += [rest[int(i)] for i in sorted(picks)]
        return chosen

    def integrate(self, node: int, own: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Node `node`'s new head from its own and the candidates' heads (`[M, H]`), per class."""
        x, y = self.local[node]
        if not len(candidates) or not len(y):
            return own
        weight, bias = self.split(torch.cat([own.unsqueeze(0), candidates]))
        rows = torch.cat([weight, bias.unsqueeze(2)], dim=2)  # [M, C, d + 1]; [0] is the node's
        logits = torch.einsum("nd,mcd->mnc", x, weight) + bias.unsqueeze(1)  # [M, n, C]
        accuracy = swap_accuracy(logits[0], logits, y)  # [M, C]; row 0 is the node's own
        base = float(accuracy[0, 0])
        accept = accuracy >= base - self.options.tolerance
        accept[0] = True
        w = accuracy.clamp_min(1e-3) * accept
        new_rows = torch.einsum("mc,mcd->cd", w / w.sum(dim=0), rows)
        out = own.clone()
        out[: self.num_classes * self.dim] = new_rows[:, : self.dim].reshape(-1)
        if self.has_bias:
            out[self.num_classes * self.dim : self.head_numel] = new_rows[:, self.dim]
        return out

    def mix(self, net: PeerNetwork, public: torch.Tensor, links: Links, round_index: int) -> torch.Tensor:
        """Every live node's new head from its exact own head and its live neighbours' copies
        (a `koinon.topology.mixers.Mixer`)."""
        h = self.head_numel
        out = net.stack.clone()
        heads = public[:, :h]
        for i in net.live_ids():
            own = net.stack[i, :h]
            chosen = self.prioritize(own, links.live_neighbours(i, net.live), heads, i, round_index)
            out[i, :h] = self.integrate(i, own, heads[chosen])
        return out
