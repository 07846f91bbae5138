"""The `[topology]` keys of `experts` and `distillation`, checked into typed options, and the
parts both build the same way: the owners' data (with per-owner domain shifts), the public
split, and pretraining a model on it.

Every bad key or value is one `ConfigError` line naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from koinon.clients import LocalSGD, LocalTraining
from koinon.config import Config
from koinon.data import DATASETS, FederatedData, partition_dataset, partition_options
from koinon.data.datasets import Dataset
from koinon.errors import ConfigError, KoinonError
from koinon.experts.distill import LOSSES
from koinon.experts.domains import check_shifts, shift_domains
from koinon.local import CohortTrainer
from koinon.params import Layout
from koinon.seeding import mix_seed
from koinon.topology.bristle import reserve_public
from koinon.topology.experts.common import loss_for

R = TypeVar("R")


def guard(what: str, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
    """A component's ValueError or TypeError as a one-line ConfigError naming the config key
    (as `koinon.topology.build.guard`, which this package cannot import: build imports it)."""
    try:
        return fn(*args, **kwargs)
    except KoinonError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{what}: {exc}") from None


def build_named(what: str, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
    """`guard`, and a component's own ConfigError (which names its section, e.g. `model`) is
    prefixed by `what`, the key that chose it (`topology.expert_models[2]`)."""
    try:
        return guard(what, fn, *args, **kwargs)
    except ConfigError as exc:
        if str(exc).startswith(what):
            raise
        raise ConfigError(f"{what}: {exc}") from None


@dataclass(frozen=True)
class Shared:
    """Keys both topologies take."""

    public_fraction: float = 0.1  # of every owner's samples, set aside as the public split
    pretrain_epochs: int = 20  # the public seed model's training on the public split
    pretrain_lr: float = 0.05
    domains: list = field(default_factory=list)  # per-owner feature shift names (see SHIFTS)


@dataclass(frozen=True)
class ExpertsOptions(Shared):
    """`topology.name = "experts"`: one expert per owner, a router, opt-out at inference."""

    expert: str = "full"  # "full": a whole model per owner; "lora": an adapter on the frozen public model
    lora_rank: int = 4
    router: str = "domain"  # "domain" (FlexOlmo) or "learned" (trained on public data)
    temperature: float = 0.1  # domain router: cosine scores over this temperature
    public_expert: bool = True  # the frozen public model is itself an expert
    top_k: int = 0  # route each input to its k best experts (0 = all)
    router_epochs: int = 30  # learned router: epochs on the public split
    router_lr: float = 0.1
    interface: str = "none"  # "thoughts": Mixture of Thoughts' latent interface, trained on public data
    latent: int = 32
    interface_epochs: int = 20
    interface_lr: float = 0.05
    expert_models: list = field(default_factory=list)  # per owner: model options over [model]
    sizes: list = field(default_factory=list)  # HDEE: model options, small to large, by difficulty


@dataclass(frozen=True)
class DistillOptions(Shared):
    """`topology.name = "distillation"`: parties exchange predictions on the public split."""

    loss: str = "kl"  # kl, bdkd, taid or knfu
    temperature: float = 3.0
    proxy_size: int = 0  # proxy samples a round (a seeded draw from the public split; 0 = all)
    distill_epochs: int = 5
    distill_lr: float = 0.0  # 0 = client.lr
    balance: float = 2.0  # bdkd: weight of the divergence that corrects the student's confidence
    t_start: float = 0.4  # taid
    taid_alpha: float = 0.1
    taid_beta: float = 0.9
    taid_rounds: int = 0  # rounds over which t reaches 1 (0 = server.rounds; recorded resolved)
    neighbours: int = 2  # knfu: peers each party fuses
    relevance_temperature: float = 1.0  # knfu
    party_models: list = field(default_factory=list)  # per party: a [model] table (name + options)


def _typed(name: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, list):
        ok = isinstance(value, list)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"topology.{name} = {value!r}: expected {type(default).__name__}")
    return value


def parse(kind: type, cfg: Config) -> Any:
    """`kind`'s options from `cfg.topology.options`; unknown keys and bad values are refused."""
    allowed = [f.name for f in dataclasses.fields(kind)]
    defaults = kind()
    values = {}
    for key, value in cfg.topology.options.items():
        if key not in allowed:
            raise ConfigError(f"unknown key topology.{key} for topology.name = {cfg.topology.name!r}; "
                              f"allowed: {', '.join(allowed)}")
        values[key] = _typed(key, value, getattr(defaults, key))
    opts = kind(**values)
    _check(opts, cfg)
    return opts


def _check(o: Shared, cfg: Config) -> None:
    n = cfg.data.num_clients
    if not 0.0 < o.public_fraction < 1.0:
        raise ConfigError(f"topology.public_fraction = {o.public_fraction}: must be in (0, 1)")
    if o.pretrain_epochs < 0 or o.pretrain_lr <= 0:
        raise ConfigError("topology.pretrain_epochs must be >= 0 and topology.pretrain_lr > 0")
    if o.domains:
        try:
            check_shifts(o.domains, n)
        except ValueError as exc:
            raise ConfigError(f"topology.domains: {exc}") from None
    if isinstance(o, ExpertsOptions):
        if o.expert not in ("full", "lora"):
            raise ConfigError(f"topology.expert = {o.expert!r}: allowed: full, lora")
        if o.expert == "lora" and (o.lora_rank < 1 or o.sizes or any(o.expert_models)):
            raise ConfigError("topology.expert = 'lora' adapts the public model: it takes lora_rank >= 1, "
                              "not expert_models or sizes")
        if o.interface not in ("none", "thoughts"):
            raise ConfigError(f"topology.interface = {o.interface!r}: allowed: none, thoughts")
        if o.latent < 1 or o.interface_epochs < 1 or o.interface_lr <= 0:
            raise ConfigError("topology needs latent >= 1, interface_epochs >= 1 and interface_lr > 0")
        if o.router not in ("domain", "learned"):
            raise ConfigError(f"topology.router = {o.router!r}: allowed: domain, learned")
        if o.temperature <= 0 or o.top_k < 0 or o.router_epochs < 1 or o.router_lr <= 0:
            raise ConfigError("topology needs temperature > 0, top_k >= 0, router_epochs >= 1, router_lr > 0")
        if o.router == "learned" and o.public_expert:
            raise ConfigError("topology.router = 'learned' routes between owners' partitions; "
                              "set topology.public_expert = false with it")
        if o.expert_models and len(o.expert_models) != n:
            raise ConfigError(f"topology.expert_models has {len(o.expert_models)} entries for "
                              f"{n} owners (data.num_clients); give one table per owner ({{}} = [model])")
        for key, tables in (("expert_models", o.expert_models), ("sizes", o.sizes)):
            if not all(isinstance(t, dict) for t in tables):
                raise ConfigError(f"topology.{key}: expected a list of tables of model options, e.g. "
                                  "[{ hidden = [32] }, { hidden = [128] }]")
    if isinstance(o, DistillOptions):
        if o.loss not in LOSSES:
            raise ConfigError(f"topology.loss = {o.loss!r}: allowed: {', '.join(LOSSES)}")
        if o.temperature <= 0 or o.proxy_size < 0 or o.distill_epochs < 1 or o.distill_lr < 0:
            raise ConfigError("topology needs temperature > 0, proxy_size >= 0, distill_epochs >= 1, distill_lr >= 0")
        if o.loss == "knfu" and (n < 2 or o.neighbours < 1 or o.relevance_temperature <= 0):
            raise ConfigError("topology.loss = 'knfu' needs >= 2 parties, neighbours >= 1, relevance_temperature > 0")
        if o.taid_rounds < 0:
            raise ConfigError(f"topology.taid_rounds = {o.taid_rounds}: must be >= 0 (0 = server.rounds)")
        if o.balance <= 0 or not 0.0 <= o.t_start < 1.0 or not 0 <= o.taid_alpha <= 1 or not 0 <= o.taid_beta < 1:
            raise ConfigError("topology needs balance > 0, t_start in [0, 1), taid_alpha in [0, 1], taid_beta in [0, 1)")
        if o.party_models and len(o.party_models) != n:
            raise ConfigError(f"topology.party_models has {len(o.party_models)} entries for {n} parties "
                              "(data.num_clients); give one [model] table per party")
        if not all(isinstance(t, dict) and isinstance(t.get("name", ""), str) for t in o.party_models):
            raise ConfigError('topology.party_models: expected tables such as { name = "mlp", hidden = [32] }')


@dataclass
class OwnersData:
    """The owners' private data, the public split and which owner each public sample came from."""

    private: FederatedData
    public: torch.Tensor  # indices into dataset.x_train
    public_owner: torch.Tensor  # [len(public)] owner of origin of each public sample

    @property
    def dataset(self) -> Dataset:
        return self.private.dataset


def owners_data(cfg: Config, shared: Shared) -> OwnersData:
    """The dataset partitioned as `[data]` says, shifted per owner (`topology.domains`), with a
    public split set aside from every owner (as Bristle does)."""
    d = cfg.data
    DATASETS.get(d.name, key="data.name")
    fixed = [f.name for f in dataclasses.fields(d) if f.name != "options"]
    allowed = fixed + [k for k in DATASETS.options(d.name) if k not in ("seed", "test_fraction", "num_clients")]
    for key in d.options:
        if key not in allowed:
            raise ConfigError(f"unknown key data.{key}; allowed: {', '.join(allowed)}")
    dataset = DATASETS.build(d.name, d.options, "data", seed=cfg.seed, test_fraction=d.test_fraction,
                             num_clients=d.num_clients)
    fed = guard(f"data.partition = {d.partition!r}", partition_dataset, dataset, d.partition, d.num_clients,
                cfg.seed, partition_options(d.partition, {"alpha": d.alpha, "classes_per_client": d.classes_per_client,
                                                          "power": d.power}))
    if shared.domains:
        fed = guard("topology.domains", shift_domains, fed, shared.domains, cfg.seed)
    owner_of = torch.full((len(fed.dataset.y_train),), -1, dtype=torch.long)
    for owner, idx in enumerate(fed.client_indices):
        owner_of[idx] = owner
    private, public = reserve_public(fed, shared.public_fraction, cfg.seed)
    return OwnersData(private, public, owner_of[public])


def pretrain(model: nn.Module, data: Dataset, public: torch.Tensor, epochs: int, lr: float, seed: int) -> None:
    """Train `model` in place on the public split (SGD, momentum 0.9, batch 16): the public seed
    model every owner starts from (FedMD's transfer-learning step for distillation parties)."""
    if epochs == 0:
        return
    layout = Layout.from_module(model)
    local = LocalTraining(epochs=epochs, batch_size=16, lr=lr, momentum=0.9)
    trainer = CohortTrainer(model, layout, FederatedData(data, [public]), LocalSGD(), local, loss_fn=loss_for(data))
    start = layout.flatten(model)
    result = trainer.train([0], start, {}, [{}], mix_seed(seed, 0xE0), 0)
    assert result.deltas is not None
    layout.load_into(model, start + result.deltas[0])


def local_training(cfg: Config) -> LocalTraining:
    c = cfg.client
    return guard("client", LocalTraining, epochs=c.epochs, steps=c.steps, batch_size=c.batch_size, lr=c.lr,
                 momentum=c.momentum, nesterov=c.nesterov, weight_decay=c.weight_decay, optimizer=c.optimizer,
                 beta1=c.beta1, beta2=c.beta2, eps=c.eps, lr_schedule=c.lr_schedule, lr_warmup=c.lr_warmup)


def check_unused(cfg: Config) -> None:
    """Sections these topologies do not read must stay at their defaults: a robust aggregator
    or an attack would silently do nothing."""
    if cfg.client.algorithm != "fedavg":
        raise ConfigError(f"client.algorithm = {cfg.client.algorithm!r}: topology.name = "
                          f"{cfg.topology.name!r} trains each owner with local SGD (fedavg) only")
    if cfg.aggregator.name != "mean" or cfg.attack.name != "none":
        raise ConfigError(f"topology.name = {cfg.topology.name!r} averages no updates: "
                          "[aggregator] and [attack] do not apply")
    s = cfg.server
    for key, value in (("server.rounds", s.rounds), ("server.eval_every", s.eval_every),
                       ("server.checkpoint_every", s.checkpoint_every)):
        if value < 1:
            raise ConfigError(f"{key} = {value}: must be >= 1")
