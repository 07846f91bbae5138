"""A mixture of owners' experts behind a router, and opting an owner out at inference.

Every data owner trains its own expert; the mixture's prediction for an input is
`p(y | x) = sum_e w_e(x) p_e(y | x)` over the experts that are *included*, with router weights
`w(x)` that sum to one over them. Opting an owner out (`Mixture.excluded`) drops its expert
before anything is computed: its parameters are never read, and the other experts keep their
relative weights (the softmax is renormalised over the rest), so the result is exactly the
mixture the remaining owners would have built without it, with no retraining.

The router reads the frozen public model's features (the input of its output layer), so every
expert, whatever its width or depth, is routed in one shared space:

* `DomainRouter` (FlexOlmo, https://arxiv.org/abs/2507.07024): one embedding per expert, the
  mean feature of the data it was trained on (computed by its owner, who sends only that
  vector); the score is the cosine between an input's feature and the embedding over a
  temperature. No joint training, so a new owner joins and an owner leaves without anyone
  retraining.
* `LinearRouter` (Decentralized Diffusion Models, https://arxiv.org/abs/2501.05450): a small
  classifier of which partition an input comes from, trained on public data only.

With a `LatentInterface` (Mixture of Thoughts, `koinon.experts.thoughts`) the experts' features
also meet in a small trained latent space that corrects the mixture's logits.

`forward` returns log-probabilities (the log of the mixture), so `cross_entropy` and
`koinon.local.evaluate` apply to it unchanged (log-softmax of normalized log-probabilities is
the identity).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from koinon.experts.thoughts import LatentInterface


def output_layer(model: nn.Module) -> nn.Module:
    """The model's last module with parameters, which must be a linear layer (its head: an
    `nn.Linear`, or a LoRA-adapted one)."""
    owners = [m for _, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    if not owners or not isinstance(getattr(owners[-1], "in_features", None), int):
        raise ValueError("experts need a model whose last layer with parameters is an nn.Linear")
    return owners[-1]


def feature_dim(model: nn.Module) -> int:
    """The width of the features `model`'s output layer reads."""
    dim = output_layer(model).in_features
    assert isinstance(dim, int)
    return dim


def features_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The input of `model`'s output layer (`[..., d]`) and its output, in one forward pass."""
    captured: list[torch.Tensor] = []
    hook = output_layer(model).register_forward_pre_hook(lambda _m, inputs: captured.append(inputs[0]))
    try:
        logits = model(x)
    finally:
        hook.remove()
    feats = captured[0]
    return feats.reshape(*logits.shape[:-1], feats.shape[-1]), logits


class DomainRouter(nn.Module):
    """FlexOlmo's domain-informed router: score_e(x) = cos(h(x), r_e) / temperature."""

    def __init__(self, dim: int, num_experts: int, temperature: float = 0.1) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"router temperature must be > 0, got {temperature}")
        self.temperature = temperature
        # Set from the owners' mean features, never trained by gradient: frozen.
        self.embeddings = nn.Parameter(torch.zeros(num_experts, dim), requires_grad=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(h, dim=-1) @ F.normalize(self.embeddings, dim=-1).T / self.temperature


class LinearRouter(nn.Module):
    """A linear classifier of the expert (data partition) an input belongs to."""

    def __init__(self, dim: int, num_experts: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, num_experts)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(h)


def route(scores: torch.Tensor, included: torch.Tensor, top_k: int = 0) -> torch.Tensor:
    """Router weights `[..., E]` from scores: a softmax over the included experts (`[E]` bool),
    zero on the others; with `top_k` > 0 only the k best included experts of each input."""
    if not bool(included.any()):
        raise ValueError("every expert is excluded: nothing left to predict with")
    masked = scores.masked_fill(~included, float("-inf"))
    if 0 < top_k < int(included.sum()):
        kth = masked.topk(top_k, dim=-1).values[..., -1:]
        masked = masked.masked_fill(masked < kth, float("-inf"))
    return masked.softmax(dim=-1)


class Mixture(nn.Module):
    """The frozen public model, one expert per owner and a router (see the module docstring).

    Slots: the public model first when `public_expert` (FlexOlmo keeps it as an expert), then
    owner 0, 1, ...; the router scores every slot.
    """

    def __init__(self, public: nn.Module, experts: Iterable[nn.Module], router: nn.Module,
                 public_expert: bool = True, top_k: int = 0, interface: LatentInterface | None = None) -> None:
        super().__init__()
        self.public = public
        self.experts = nn.ModuleList(experts)
        self.router = router
        self.interface = interface  # Mixture of Thoughts' latent interface, or None
        self.public_expert = public_expert
        self.top_k = top_k
        self.excluded: frozenset[int] = frozenset()
        # Slot weights `[slots]` that replace the router for every input (SADE's test-time
        # aggregation, `koinon.experts.sade`), or None to route per input.
        self.fixed: torch.Tensor | None = None
        for p in public.parameters():
            p.requires_grad_(False)

    @property
    def num_owners(self) -> int:
        return len(self.experts)

    @property
    def num_slots(self) -> int:
        return self.num_owners + int(self.public_expert)

    def slot(self, owner: int) -> int:
        return owner + int(self.public_expert)

    def exclude(self, owners: Iterable[int]) -> None:
        """Opt `owners` out of every later prediction (an empty list puts everyone back)."""
        owners = frozenset(int(o) for o in owners)
        bad = sorted(o for o in owners if not 0 <= o < self.num_owners)
        if bad:
            raise ValueError(f"owner {bad[0]} does not exist; owners are 0..{self.num_owners - 1}")
        if len(owners) == self.num_owners and not self.public_expert:
            raise ValueError("every owner is excluded and there is no public expert: nothing to predict with")
        self.excluded = owners

    def included(self) -> torch.Tensor:
        mask = torch.ones(self.num_slots, dtype=torch.bool)
        for owner in self.excluded:
            mask[self.slot(owner)] = False
        return mask

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """Router weights `[..., slots]` for inputs `x` (zero on excluded owners)."""
        h, _ = features_and_logits(self.public, x)
        return self._route(h)

    def _route(self, h: torch.Tensor) -> torch.Tensor:
        if self.fixed is None:
            return route(self.router(h), self.included(), self.top_k)
        scores = self.fixed.clamp_min(1e-30).log().expand(*h.shape[:-1], self.num_slots)
        return route(scores, self.included() & (self.fixed > 0), self.top_k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, public_logits = features_and_logits(self.public, x)
        included = self.included()
        w = self._route(h)
        log_w = w.clamp_min(1e-30).log()
        terms = []
        features: dict[int, torch.Tensor] = {}
        if self.public_expert:
            terms.append(log_w[..., 0].unsqueeze(-1) + public_logits.log_softmax(dim=-1))
            features[0] = h
        for owner, expert in enumerate(self.experts):
            slot = self.slot(owner)
            if included[slot]:  # an excluded owner's expert is never run
                if self.interface is not None:
                    features[slot], logits = features_and_logits(expert, x)
                else:
                    logits = expert(x)
                terms.append(log_w[..., slot].unsqueeze(-1) + logits.log_softmax(dim=-1))
        mixed = torch.logsumexp(torch.stack(terms), dim=0)
        if self.interface is None:
            return mixed
        return (mixed + self.interface(features, w)).log_softmax(dim=-1)
