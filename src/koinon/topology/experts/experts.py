"""`topology.name = "experts"`: every owner trains its own expert; a router mixes them.

The recipe (FlexOlmo, https://arxiv.org/abs/2507.07024; Decentralized Diffusion Models,
https://arxiv.org/abs/2501.05450; HDEE: Heterogeneous Domain Expert Ensemble, 2025):

1. The run pretrains a public seed model on a public split (a fraction of every owner's samples
   set aside, as Bristle does) and freezes it. Every owner downloads it once.
2. Each owner starts its expert from the seed (an expert of another width or depth takes the
   overlapping block, `seed_from`) and trains it on its own data only, in isolation: no update
   crosses the wire while experts train. Owners with the same architecture train in lock-step
   (one `CohortTrainer` cohort), which changes nothing in their arithmetic.
3. The router reads the frozen public model's features. `router = "domain"` (FlexOlmo): each
   owner sends one vector, the mean feature of its data, computed once; no joint training.
   `router = "learned"` (DDM): a linear classifier of which owner's partition an input comes
   from, trained on the public split only.
4. On evaluation rounds the experts are assembled: each owner sends its expert through the
   uplink codec (real payload bytes), and the mixture is evaluated overall and per domain. Set
   `server.eval_every = server.rounds` to ship the experts once, at the end.
5. At inference an owner opts out (`Mixture.exclude`, `koinon predict RUN --exclude OWNER`): its
   expert is dropped and the others keep their relative weights, with no retraining.

`expert = "lora"` (LoRA-Mixer): an owner's expert is a low-rank adapter on every linear layer of
the frozen public model, and only the adapter is shipped (`koinon.experts.lora`).

`interface = "thoughts"` (Mixture of Thoughts): after each assembly a small latent interface
between the frozen experts is trained on the public split (`koinon.experts.thoughts`).

HDEE: `sizes` lists model options from small to large; owners are ranked by their domain's
difficulty (the public model's loss on their own data, one number each) and the harder domains
get the larger experts. What FlexOlmo does that this does not: there, an expert is a
feed-forward block inside a transformer trained next to the frozen public block with shared
attention; here an expert is a whole model and experts meet only at the output.
"""

from __future__ import annotations

import struct
from typing import Any

import torch
from torch import nn

from koinon.clients import LocalSGD, LocalTraining
from koinon.config import Config
from koinon.experts.domains import domain_test_sets
from koinon.experts.lora import lora_expert
from koinon.experts.mixture import (
    DomainRouter,
    LinearRouter,
    Mixture,
    feature_dim,
    features_and_logits,
    output_layer,
)
from koinon.experts.thoughts import LatentInterface
from koinon.local import CohortTrainer, cross_entropy, evaluate
from koinon.models import build_model
from koinon.params import Layout
from koinon.seeding import mix_seed
from koinon.topology.experts.common import (
    Channel,
    CodecFactory,
    DomainRound,
    domain_metrics,
    groups_by_layout,
    loss_for,
    seed_from,
    tensor_layout,
)
from koinon.topology.experts.options import ExpertsOptions, OwnersData, build_named, pretrain


def _mean_feature(public: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        h, _ = features_and_logits(public, x)
    return h.reshape(-1, h.shape[-1]).mean(dim=0)


def difficulty(public: nn.Module, data: OwnersData) -> list[float]:
    """Each owner's domain difficulty: the public model's mean loss on the owner's own data."""
    public.eval()
    out = []
    with torch.no_grad():
        for idx in data.private.client_indices:
            logits = public(data.dataset.x_train[idx])
            y = data.dataset.y_train[idx]
            out.append(float(cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).mean()))
    public.train()
    return out


def per_owner_models(options: ExpertsOptions, hardness: list[float]) -> list[dict[str, Any]]:
    """Each owner's model options over `[model]`: `expert_models` as given, else HDEE's `sizes`
    by difficulty rank (the easiest owners get sizes[0]), else the seed model's for all."""
    n = len(hardness)
    if options.expert_models:
        return [dict(t) for t in options.expert_models]
    if options.sizes:
        ranks = {owner: r for r, owner in enumerate(sorted(range(n), key=lambda i: (hardness[i], i)))}
        return [dict(options.sizes[ranks[i] * len(options.sizes) // n]) for i in range(n)]
    return [{} for _ in range(n)]


def build_mixture(cfg: Config, options: ExpertsOptions, input_shape: tuple[int, ...], num_classes: int,
                  per_owner: list[dict[str, Any]], public: nn.Module | None = None) -> Mixture:
    """The mixture's modules, freshly initialized (seeded); `public` if already built."""
    if public is None:
        public = build_model(cfg.model.name, cfg.model.options, input_shape, num_classes, cfg.seed)
    if options.expert == "lora":
        experts = [lora_expert(public, options.lora_rank, float(options.lora_rank), mix_seed(cfg.seed, 0xE9, i))
                   for i in range(len(per_owner))]
    else:
        experts = [build_named(f"topology.expert_models[{i}]", build_model, cfg.model.name,
                               {**cfg.model.options, **opts}, input_shape, num_classes, mix_seed(cfg.seed, 0xE2, i))
                   for i, opts in enumerate(per_owner)]
    dim = feature_dim(public)
    slots = len(experts) + int(options.public_expert)
    with torch.random.fork_rng(devices=[]):  # a seeded initialization, the global RNG untouched
        torch.manual_seed(mix_seed(cfg.seed, 0xE8))
        router: nn.Module = (DomainRouter(dim, slots, options.temperature) if options.router == "domain"
                             else LinearRouter(dim, slots))
    interface = None
    if options.interface == "thoughts":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(cfg.seed, 0xEB))
            members = ([public] if options.public_expert else []) + experts
            interface = LatentInterface([feature_dim(m) for m in members], options.latent, num_classes)
    return Mixture(public, experts, router, options.public_expert, options.top_k, interface)


class Experts:
    """The experts topology (see the module docstring); a `koinon.topology.Topology`."""

    def __init__(self, data: OwnersData, mixture: Mixture, local: LocalTraining, options: ExpertsOptions,
                 codec: CodecFactory, downlink: CodecFactory, seed: int) -> None:
        self.data = data
        self.mixture = mixture
        self.local = local
        self.options = options
        self.seed = seed
        self.layout = Layout.from_module(mixture)
        self.round_index = 0
        self.uplink_total = 0
        self.downlink_total = 0
        self.uplink = Channel(codec, seed, 0xE5)
        self.downlink = Channel(downlink, seed, 0xE6)
        experts = list(mixture.experts)
        for expert in experts:
            seed_from(mixture.public, expert)
        self.expert_layouts = [Layout.from_module(e) for e in experts]
        self.owner_params = [lay.flatten(e) for lay, e in zip(self.expert_layouts, experts, strict=True)]
        # What an owner ships: its trainable entries (the whole expert, or a LoRA adapter; the
        # frozen rest is the public model, which the assembler has). Trainable entries come first.
        self.ship_layouts = [Layout(tuple(e for e in lay.entries if e.trainable)) for lay in self.expert_layouts]
        self.groups = [
            (CohortTrainer(experts[owners[0]], self.expert_layouts[owners[0]], data.private, LocalSGD(), local,
                           loss_fn=loss_for(data.dataset)), owners)
            for owners in groups_by_layout(experts).values()
        ]
        self.domains = domain_test_sets(data.dataset)
        self._setup_bytes = self._setup_router()

    def _setup_router(self) -> tuple[int, int]:
        """The router, before any expert trains; returns its (uplink, downlink) bytes: the public
        model to every owner, and with the domain router each owner's embedding back."""
        m, ds = self.mixture, self.data.dataset
        public_layout = Layout.from_module(m.public)
        public_flat = public_layout.flatten(m.public)
        down = sum(self.downlink.send(o, public_flat, public_layout, 0)[1] for o in range(m.num_owners))
        up = 0
        router = m.router
        if isinstance(router, DomainRouter):
            rows = []
            if m.public_expert:
                rows.append(_mean_feature(m.public, ds.x_train[self.data.public]))
            for owner, idx in enumerate(self.data.private.client_indices):
                vec = _mean_feature(m.public, ds.x_train[idx])
                received, n = self.uplink.send(owner, vec, tensor_layout("embedding", tuple(vec.shape)), 0)
                rows.append(received)
                up += n
            with torch.no_grad():
                router.embeddings.copy_(torch.stack(rows))
        else:
            assert isinstance(router, LinearRouter)
            self._train_router(router)
        if self.options.sizes and not self.options.expert_models:
            up += len(struct.pack("<f", 0.0)) * m.num_owners  # each owner's difficulty (HDEE)
        return up, down

    def _train_router(self, router: LinearRouter) -> None:
        """DDM's router: which owner's partition a public sample came from, from its frozen
        public feature (the public split remembers each sample's owner of origin)."""
        from koinon.data import Dataset, FederatedData

        x = self.data.dataset.x_train[self.data.public]
        with torch.no_grad():
            h, _ = features_and_logits(self.mixture.public, x)
        # A sequence model routes per position: every position is a sample labelled by its owner.
        labels = self.data.public_owner.view(-1, *([1] * (h.dim() - 2))).expand(h.shape[:-1])
        h, labels = h.reshape(-1, h.shape[-1]), labels.reshape(-1)
        table = Dataset("router", h, labels, h[:1], labels[:1], self.mixture.num_slots)
        layout = Layout.from_module(router)
        local = LocalTraining(epochs=self.options.router_epochs, batch_size=64, lr=self.options.router_lr, momentum=0.9)
        trainer = CohortTrainer(router, layout, FederatedData(table, [torch.arange(len(labels))]), LocalSGD(), local)
        start = layout.flatten(router)
        result = trainer.train([0], start, {}, [{}], mix_seed(self.seed, 0xE7), 0)
        assert result.deltas is not None
        layout.load_into(router, start + result.deltas[0])

    # ------------------------------------------------------------- the Topology interface

    @property
    def params(self) -> torch.Tensor:
        return self.layout.flatten(self.mixture)

    def run_round(self, evaluate: bool = True) -> DomainRound:
        r = self.round_index + 1
        up, down = self._setup_bytes if self.round_index == 0 else (0, 0)
        losses, counts = [], []
        for trainer, owners in self.groups:
            stack = torch.stack([self.owner_params[o] for o in owners])
            result = trainer.train(owners, stack, {}, [{} for _ in owners], mix_seed(self.seed, 0xE3), r)
            assert result.deltas is not None
            for row, owner in enumerate(owners):
                self.owner_params[owner] = stack[row] + result.deltas[row]
            losses.append(result.train_loss * result.num_samples)
            counts.append(result.num_samples)
        train_loss = float(torch.cat(losses).sum() / torch.cat(counts).sum().clamp_min(1))
        acc = loss = None
        per_domain = None
        if evaluate:
            up += self._assemble(r)
            acc, loss = self.evaluate()
            per_domain = self.evaluate_domains()
        self.round_index = r
        self.uplink_total += up
        self.downlink_total += down
        return DomainRound(r, acc, loss, train_loss, self.mixture.num_owners, up, down,
                           per_domain[0] if per_domain else None, per_domain[1] if per_domain else None)

    def _assemble(self, round_index: int) -> int:
        """Every owner ships its expert through the uplink codec into the mixture; the bytes."""
        sent = 0
        for owner, (layout, flat) in enumerate(zip(self.expert_layouts, self.owner_params, strict=True)):
            shipped = self.ship_layouts[owner]
            received, n = self.uplink.send(owner, flat[: shipped.numel], shipped, round_index)
            layout.load_into(self.mixture.experts[owner], torch.cat([received, flat[shipped.numel :]]))
            sent += n
        if self.mixture.interface is not None:
            self._train_interface(round_index)
        return sent

    def _train_interface(self, round_index: int) -> None:
        """Mixture of Thoughts: the latent interface trained on the public split, every other
        part of the mixture frozen (no bytes: the assembler holds the public data)."""
        from koinon.data import FederatedData

        m = self.mixture
        assert m.interface is not None
        own = {id(p) for p in m.interface.parameters()}
        flags = [(p, p.requires_grad) for p in m.parameters()]
        for p, _ in flags:
            p.requires_grad_(id(p) in own)
        try:
            layout = Layout.from_module(m)
            local = LocalTraining(epochs=self.options.interface_epochs, batch_size=16,
                                  lr=self.options.interface_lr, momentum=0.9)
            ds = self.data.dataset
            trainer = CohortTrainer(m, layout, FederatedData(ds, [self.data.public]), LocalSGD(), local,
                                    loss_fn=loss_for(ds))
            start = layout.flatten(m)
            result = trainer.train([0], start, {}, [{}], mix_seed(self.seed, 0xEA), round_index)
            assert result.deltas is not None
            layout.load_into(m, start + result.deltas[0])
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)

    def evaluate(self) -> tuple[float, float]:
        ds = self.data.dataset
        return evaluate(self.mixture, self.layout, self.params, ds.x_test, ds.y_test)

    def evaluate_domains(self) -> tuple[list[float], list[float]] | None:
        """Accuracy and loss of the mixture on each owner's domain (None without domains)."""
        return domain_metrics(self.mixture, self.layout, self.params, self.domains)

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {"mixture": self.params}
        out.update({f"owner/{i}": p for i, p in enumerate(self.owner_params)})
        out.update({f"uplink/{k}": v for k, v in self.uplink.state_dict().items()})
        return out

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.layout.load_into(self.mixture, tensors["mixture"])
        self.owner_params = [tensors[f"owner/{i}"].clone() for i in range(self.mixture.num_owners)]
        self.uplink.load_state_dict({k[len("uplink/"):]: v for k, v in tensors.items() if k.startswith("uplink/")},
                                    self.ship_layouts)

    def fit(self, rounds: int, eval_every: int = 1) -> list[Any]:
        from koinon.topology.base import fit_rounds

        return fit_rounds(self, rounds, eval_every)

    def close(self) -> None:
        return None


def build_experts(cfg: Config) -> Experts:
    """The experts topology from a config (keys checked first: one-line ConfigErrors). Writes
    the resolved per-owner model options back into `topology.expert_models`, so the run's
    config.toml rebuilds the same mixture (`koinon predict`)."""
    from koinon.compress import CODECS
    from koinon.topology.experts.options import check_unused, local_training, owners_data, parse

    options: ExpertsOptions = parse(ExpertsOptions, cfg)
    check_unused(cfg)
    data = owners_data(cfg, options)
    ds = data.dataset
    local = local_training(cfg)
    CODECS.get(cfg.codec.name, key="codec.name")
    CODECS.get(cfg.downlink.name, key="downlink.name")
    public = build_model(cfg.model.name, cfg.model.options, ds.input_shape, ds.num_classes, cfg.seed)
    output_layer(public)
    pretrain(public, ds, data.public, options.pretrain_epochs, options.pretrain_lr, cfg.seed)
    per_owner = per_owner_models(options, difficulty(public, data))
    mixture = build_mixture(cfg, options, ds.input_shape, ds.num_classes, per_owner, public)
    cfg.topology.options["expert_models"] = per_owner

    def codec(layout: Layout) -> Any:
        return CODECS.build(cfg.codec.name, cfg.codec.options, "codec", layout=layout)

    def downlink(layout: Layout) -> Any:
        return CODECS.build(cfg.downlink.name, cfg.downlink.options, "downlink", layout=layout)

    codec(Layout.from_module(public))  # a bad codec option fails now, before training
    return Experts(data, mixture, local, options, codec, downlink, cfg.seed)
