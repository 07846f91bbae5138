"""Build a topology from a `Config`: the builders registered in `TOPOLOGIES` (`topology.name`).

`federated` and `gossip` share one recipe for their parts (`build_components`: dataset,
partition, model, local training, client algorithm, server optimizer and sampler, codecs,
attack, aggregator, runtime); `diloco` builds its own (`koinon.topology.diloco.build_parts`) and is
imported only when named, so `import koinon` stays lean. Every builder checks what it reads and
raises a one-line `ConfigError` before anything trains.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, TypeVar

from torch import nn

from koinon.clients import CLIENT_ALGORITHMS, ClientAlgorithm, LocalTraining
from koinon.config import Config, ServerConfig
from koinon.data import DATASETS, FederatedData, partition_dataset, partition_options
from koinon.errors import ConfigError, KoinonError
from koinon.models import build_model
from koinon.params import Layout
from koinon.registry import Registry
from koinon.server import SAMPLERS, SERVER_OPTIMIZERS, Sampler, ServerOptimizer
from koinon.topology.base import TOPOLOGIES, Topology
from koinon.topology.evaluation import Evaluation
from koinon.topology.federated import Federation, check_aggregator
from koinon.topology.gossip import Gossip, split_options

if TYPE_CHECKING:
    from koinon.aggregate import Aggregator
    from koinon.attacks import Attack
    from koinon.compress import Codec
    from koinon.runtime import Runtime

R = TypeVar("R")


def guard(what: str, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
    """Turn a component's ValueError into a one-line ConfigError naming the config key."""
    try:
        return fn(*args, **kwargs)
    except KoinonError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{what}: {exc}") from None


def _check_options(registry: Registry[Any], name: str, section: str, config: Any,
                   context: tuple[str, ...] = ()) -> None:
    """A section that has fixed keys besides the component's own options ([data], [client],
    [downlink], [attack]): an unknown key is refused naming both, not only the options."""
    fixed = [f.name for f in fields(config) if f.name != "options"]
    allowed = fixed + [k for k in registry.options(name) if k not in context and k not in fixed]
    for key in config.options:
        if key not in allowed:
            raise ConfigError(f"unknown key {section}.{key}; allowed: {', '.join(allowed)}")


def _check_schedule(s: ServerConfig) -> None:
    for key, value in (("server.rounds", s.rounds), ("server.eval_every", s.eval_every),
                       ("server.checkpoint_every", s.checkpoint_every)):
        if value < 1:
            raise ConfigError(f"{key} = {value}: must be >= 1")


def _check_root_options(name: str, options: dict[str, Any]) -> None:
    """`root_samples` / `root_steps` set up a server root dataset: only rules that trust one
    (FLTrust) take them, so on any other rule say which do, rather than a bare "not an option"."""
    from koinon.aggregate import AGGREGATORS

    final = name.split("+")[-1].strip()
    for key in ("root_samples", "root_steps"):
        if key not in options or final not in AGGREGATORS:
            continue
        users = [n for n in AGGREGATORS.names() if key in AGGREGATORS.options(n)]
        if key not in AGGREGATORS.options(final):
            raise ConfigError(f"aggregator.{key}: only {', '.join(users)} (or a composition ending "
                              f"in it, e.g. nnm+{users[0]}) takes it, not aggregator.name = {name!r}")


@dataclass
class Components:
    """The parts a federation or a gossip network is made of, built and checked from a config."""

    model: nn.Module
    fed_data: FederatedData
    local: LocalTraining
    algorithm: ClientAlgorithm
    optimizer: ServerOptimizer
    sampler: Sampler
    codec: Codec
    downlink: Codec
    attack: Attack
    aggregator: Aggregator
    runtime: Runtime


def build_components(cfg: Config) -> Components:
    """Every shared component of the experiment, checked; raises ConfigError before anything
    runs. Records the server learning rate actually used in `cfg.server.lr`."""
    from koinon.privacy import check_privacy

    check_privacy(cfg)
    d = cfg.data
    DATASETS.get(d.name, key="data.name")
    _check_options(DATASETS, d.name, "data", d, context=("seed", "test_fraction", "num_clients"))
    dataset = DATASETS.build(
        d.name, d.options, "data", seed=cfg.seed, test_fraction=d.test_fraction, num_clients=d.num_clients
    )
    fed_data = guard(
        f"data.partition = {d.partition!r}", partition_dataset, dataset, d.partition, d.num_clients,
        cfg.seed, partition_options(d.partition, {"alpha": d.alpha, "classes_per_client": d.classes_per_client,
                                                  "power": d.power}),
    )
    from koinon.personal import feature_shift

    fed_data = guard(f"data.feature_shift = {d.feature_shift!r}", feature_shift, fed_data, d.feature_shift,
                     cfg.seed, d.shift_groups, d.shift_strength)
    model = build_model(cfg.model.name, cfg.model.options, dataset.input_shape, dataset.num_classes, cfg.seed)
    c = cfg.client
    local = guard(
        "client", LocalTraining, epochs=c.epochs, steps=c.steps, batch_size=c.batch_size, lr=c.lr,
        momentum=c.momentum, nesterov=c.nesterov, weight_decay=c.weight_decay,
        optimizer=c.optimizer, beta1=c.beta1, beta2=c.beta2, eps=c.eps,
        lr_schedule=c.lr_schedule, lr_warmup=c.lr_warmup,
    )
    CLIENT_ALGORITHMS.get(c.algorithm, key="client.algorithm")
    _check_options(CLIENT_ALGORITHMS, c.algorithm, "client", c, context=("mu", "seed", "layout"))
    algorithm = CLIENT_ALGORITHMS.build(c.algorithm, c.options, "client", mu=c.mu, seed=cfg.seed,
                                        layout=Layout.from_module(model))
    if getattr(algorithm, "plain_sgd", False) and (c.momentum or c.optimizer != "sgd"):
        raise ConfigError(f"client.algorithm = {c.algorithm!r} steps with the server's momentum; it needs "
                          f"client.optimizer = 'sgd' and client.momentum = 0 (got {c.optimizer!r}, {c.momentum})")
    s = cfg.server
    server_context: dict[str, Any] = {"momentum": s.momentum, "beta1": s.beta1, "beta2": s.beta2, "tau": s.tau}
    if s.lr:
        server_context["lr"] = s.lr
    optimizer = SERVER_OPTIMIZERS.build(s.optimizer, {}, "server.optimizer", **server_context)
    s.lr = optimizer.lr  # the resolved config records the learning rate actually used
    SAMPLERS.get(s.sampler, key="server.sampler")
    sampler = SAMPLERS.build(s.sampler, s.sampler_options, "server.sampler_options")
    _check_schedule(s)
    if not 1 <= s.clients_per_round <= fed_data.num_clients:
        raise ConfigError(
            f"server.clients_per_round = {s.clients_per_round}: must be between 1 and "
            f"data.num_clients = {fed_data.num_clients}"
        )
    layout = Layout.from_module(model)
    from koinon.aggregate import build_aggregator
    from koinon.compress import CODECS
    from koinon.runtime import RUNTIMES

    if hasattr(algorithm, "decode_update") and cfg.codec.name != "identity":
        hint = " (or client.upload = 'full' to compress the update)" if c.algorithm == "fedconv" else ""
        raise ConfigError(f"codec.name = {cfg.codec.name!r}: client.algorithm = {c.algorithm!r} uploads in its own "
                          f"wire format, which no codec encodes; use codec.name = 'identity'{hint}")
    codec = CODECS.build(cfg.codec.name, cfg.codec.options, "codec", layout=layout)
    CODECS.get(cfg.downlink.name, key="downlink.name")
    _check_options(CODECS, cfg.downlink.name, "downlink", cfg.downlink, context=("layout",))
    downlink = CODECS.build(cfg.downlink.name, cfg.downlink.options, "downlink", layout=layout)
    from koinon.attacks import ATTACKS

    a = cfg.attack
    if not 0.0 <= a.fraction < 1.0:
        raise ConfigError(f"attack.fraction = {a.fraction}: must be in [0, 1)")
    if a.fraction > 0 and a.name == "none":
        raise ConfigError("attack.fraction > 0 needs attack.name; see `koinon list` for the attacks")
    ATTACKS.get(a.name, key="attack.name")
    _check_options(ATTACKS, a.name, "attack", a)
    attack = ATTACKS.build(a.name, a.options, "attack")
    # Robust rules get f = the number of Byzantine clients in every cohort, unless set.
    agg_options = dict(cfg.aggregator.options)
    f = agg_options.pop("num_byzantine", round(a.fraction * s.clients_per_round))
    if not isinstance(f, int) or isinstance(f, bool) or f < 0:
        raise ConfigError(f"aggregator.num_byzantine = {f!r}: expected an integer >= 0")
    _check_root_options(cfg.aggregator.name, agg_options)
    aggregator = build_aggregator(cfg.aggregator.name, agg_options, f)
    # A rule whose assumption (e.g. Bulyan's n >= 4f + 3) this cohort size breaks is refused now.
    check_aggregator(cfg.aggregator.name, agg_options, f, s.clients_per_round)
    runtime = RUNTIMES.build(cfg.runtime.name, cfg.runtime.options, "runtime")
    return Components(model, fed_data, local, algorithm, optimizer, sampler, codec, downlink,
                      attack, aggregator, runtime)


@TOPOLOGIES.register("federated")
def build_federated(cfg: Config, /) -> Topology:
    """A server and simulated clients (FedAvg family, robust aggregation, attacks)."""
    from koinon.privacy import build_privacy

    parts = build_components(cfg)
    s, a = cfg.server, cfg.attack
    if cfg.data.holdout_clients and not cfg.data.client_test_fraction:
        raise ConfigError(f"data.holdout_clients = {cfg.data.holdout_clients} needs data.client_test_fraction > 0 "
                          "(new clients are scored on their held-out share)")
    if cfg.data.public_samples and cfg.data.unseen_classes:
        raise ConfigError(f"data.public_samples with data.unseen_classes = {list(cfg.data.unseen_classes)}: the "
                          "server's public samples would carry labels of classes no client may see; use one of them")
    # The accountant's population and client sizes: what trains, after `Federation` sets new
    # clients, a root dataset and each client's held-out share aside (the same seeded splits).
    from koinon.personal import split_new_clients
    from koinon.server.root import reference_users, reserve_public, reserve_root
    from koinon.topology.evaluation import split_holdout

    train = parts.fed_data
    if cfg.privacy.dp != "none":
        if cfg.data.holdout_clients:
            train = guard("federation", split_new_clients, train, cfg.data.holdout_clients, cfg.seed)[0]
        if users := reference_users(parts.aggregator):
            train = guard("federation", reserve_root, train, getattr(users[-1], "root_samples", 100), cfg.seed)[0]
        if cfg.data.public_samples:
            train = guard("data", reserve_public, train, cfg.data.public_samples, cfg.seed)[0]
        if cfg.data.client_test_fraction:
            train = split_holdout(train, cfg.data.client_test_fraction, cfg.seed)[0]
        if not 1 <= s.clients_per_round <= train.num_clients:
            raise ConfigError(f"server.clients_per_round = {s.clients_per_round}: must be in "
                              f"[1, {train.num_clients}] (the training clients)")
    privacy = build_privacy(cfg, train.num_clients, parts.algorithm, train.sizes, parts.model)
    algorithm = privacy.sample if privacy is not None and privacy.sample is not None else parts.algorithm
    return guard(
        "federation", Federation, parts.model, parts.fed_data, local=parts.local,
        algorithm=algorithm, server_optimizer=parts.optimizer,
        sampler=privacy.sampler if privacy is not None and privacy.sampler is not None else parts.sampler,
        codec=parts.codec, downlink=parts.downlink, aggregator=parts.aggregator,
        runtime=parts.runtime, clients_per_round=s.clients_per_round, seed=cfg.seed,
        attack=parts.attack, byzantine_fraction=a.fraction, downlink_delta=cfg.downlink.delta,
        evaluation=guard("data", Evaluation, holdout=cfg.data.client_test_fraction,
                         new_clients=cfg.data.holdout_clients),
        privacy=privacy, labels=_labels(cfg), public_samples=cfg.data.public_samples,
    )


def _labels(cfg: Config):
    """`[data]`'s hidden labels (unlabeled clients, label fraction, unseen classes), checked."""
    from koinon.personal.labels import setting_from

    d = cfg.data
    return guard("data", setting_from, d.unlabeled_clients, d.label_fraction, d.unseen_classes)


@TOPOLOGIES.register("gossip")
def build_gossip(cfg: Config, /) -> Topology:
    """Decentralized training (D-PSGD): every client is a peer; server-only sections are ignored."""
    from koinon.server.root import reference_users

    parts = build_components(cfg)
    if _labels(cfg) is not None:
        raise ConfigError("data.unlabeled_clients / label_fraction / unseen_classes need topology.name = "
                          f"'federated', not {cfg.topology.name!r}")
    if cfg.data.client_test_fraction or cfg.data.holdout_clients:
        raise ConfigError("data.client_test_fraction / data.holdout_clients (personalized metrics) need "
                          f"topology.name = 'federated', not {cfg.topology.name!r}")
    _no_public_data(cfg)
    if reference_users(parts.aggregator):
        raise ConfigError(f"aggregator.name = {cfg.aggregator.name!r} needs a server with a root dataset; "
                          f"topology.name = {cfg.topology.name!r} has none (use topology.name = 'federated')")
    t = cfg.topology
    failures: dict[int, float] = {}
    for key, value in t.failures.items():
        if not str(key).isdigit() or not isinstance(value, (int, float)):
            raise ConfigError(f"topology.failures = {t.failures!r}: expected {{round = fraction}}, "
                              "e.g. failures = {{ 20 = 0.5 }}")
        failures[int(key)] = float(value)
    robust = None if cfg.aggregator.name == "mean" else parts.aggregator
    typed = {"mixing": t.mixing, "codec": parts.codec, "compress_delta": t.compress_delta,
             "aggregator": robust, "runtime": parts.runtime, "algorithm": parts.algorithm,
             "failures": failures, "failure_choice": t.failure_choice, "eval_nodes": t.eval_nodes}
    clash = sorted(set(typed) & set(t.options))
    if clash:
        raise ConfigError(f"topology.options.{clash[0]}: set by its own config key, not in topology.options")
    if cfg.attack.name != "none":
        if "attack" in t.options or "byzantine_fraction" in t.options:
            raise ConfigError("gossip attacks: use [attack] name/fraction or topology.options "
                              "attack/byzantine_fraction, not both")
        # [attack] applies to gossip as to a federation: Byzantine peers forge what they send.
        typed.update(attack=parts.attack, byzantine_fraction=cfg.attack.fraction)
    options = guard("topology", split_options, {**t.options, **typed})
    return guard(
        "topology", Gossip, parts.model, parts.fed_data, graph=t.graph, local=parts.local,
        final_merge_every=t.final_merge_every, seed=cfg.seed, **options,
    )


@TOPOLOGIES.register("diloco")
def build_diloco(cfg: Config, /) -> Topology:
    """Compute islands (DiLoCo family), simulated in one process.

    The [diloco] section holds the inner and outer optimizers, so the [client] and [server]
    optimizer keys do not apply."""
    from koinon.privacy import check_privacy
    from koinon.runtime.local import set_threads
    from koinon.topology.diloco import DiLoCo, build_parts

    _check_schedule(cfg.server)
    check_privacy(cfg)
    _no_public_data(cfg)
    parts = build_parts(cfg)
    threads = cfg.runtime.options.get("threads", 0)
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 0:
        raise ConfigError(f"runtime.threads = {threads!r}: expected an integer >= 0 (0 = 1 for small models)")
    set_threads(threads, parts.layout.numel)  # small models: one thread (see set_threads)
    return DiLoCo(parts, cfg.seed)


@TOPOLOGIES.register("experts")
def build_experts(cfg: Config, /) -> Topology:
    """Owners' experts from a public seed model, mixed by a router; owners opt out at inference."""
    from koinon.topology.experts import build_experts as build

    _no_public_data(cfg)
    return build(cfg)


@TOPOLOGIES.register("distillation")
def build_distillation(cfg: Config, /) -> Topology:
    """Parties of any architecture exchange predictions on a public proxy set, not weights."""
    from koinon.topology.experts import build_distillation as build

    _no_public_data(cfg)
    return build(cfg)


def _no_public_data(cfg: Config) -> None:
    """`data.public_samples` is a federated server's data (FedConv's learnt kernels); elsewhere
    it would be taken from nobody and used by nothing, so it is refused rather than ignored."""
    if cfg.data.public_samples:
        raise ConfigError(f"data.public_samples (a server's public data) needs topology.name = 'federated', "
                          f"not {cfg.topology.name!r}")
