"""Experiment configuration: typed dataclasses read from TOML, with `--set key=value` overrides.

Sections and keys are stable names that later features extend. Fixed keys are checked for
name, type and range here; component sections (`[model]`, `[codec]`, `[downlink]`,
`[aggregator]`, `[runtime]`) take `name` plus that component's own options, which the component
registry checks when the experiment is built. Every problem is a `ConfigError` naming the key,
the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import tomli_w

from koinon.errors import ConfigError


@dataclass
class DataConfig:
    name: str = "digits"
    partition: str = "dirichlet"
    alpha: float = 0.5  # Dirichlet concentration (partition = "dirichlet")
    num_clients: int = 100
    test_fraction: float = 0.2
    classes_per_client: int = 2  # partition = "shards"
    power: float = 1.5  # partition = "quantity"
    client_test_fraction: float = 0.0  # each client's held-out share: personalized metrics (koinon.personal)
    holdout_clients: float = 0.0  # clients kept out of training (count >= 1, or share < 1): new-client metrics
    feature_shift: str = "none"  # per-client input transform: none, rotation, noise, contrast, permute
    shift_groups: int = 0  # clients sharing a transform (0 = each client its own)
    shift_strength: float = 1.0  # how strong the transform is, in [0, 1]
    unlabeled_clients: float = 0.0  # clients whose training labels are hidden (share < 1 or count): koinon.personal.labels
    label_fraction: float = 1.0  # share of every other client's training samples that keep their label
    unseen_classes: list = field(default_factory=list)  # classes never labeled on any client (open-world)
    public_samples: int = 0  # training samples the server holds, taken from the clients' pool (FedConv's kernels)
    options: dict = field(default_factory=dict)  # dataset options, e.g. num_samples for mnist1d


@dataclass
class ComponentConfig:
    name: str
    options: dict = field(default_factory=dict)


@dataclass
class DownlinkConfig:
    name: str = "identity"
    delta: bool = False  # send the compressed change of the model instead of the model
    options: dict = field(default_factory=dict)


@dataclass
class TopologyConfig:
    name: str = "federated"  # "federated" (a server), "gossip" (D-PSGD) or "diloco" ([diloco])
    graph: str = "ring"  # gossip: a registered graph (see `koinon list`)
    mixing: str = "metropolis"  # gossip: metropolis, max_degree or uniform mixing weights
    compress_delta: bool = False  # gossip: send the change since the last send through the codec
    final_merge_every: int = 0  # gossip: average all live nodes every k rounds (0 = never)
    failures: dict = field(default_factory=dict)  # gossip: {round = fraction of nodes that crash}
    failure_choice: str = "random"  # gossip: random, degree or central
    eval_nodes: int = 20  # gossip: nodes evaluated each round (a seeded sample when more)
    options: dict = field(default_factory=dict)  # graph options (e.g. degree, m, p) and more


@dataclass
class AttackConfig:
    name: str = "none"
    fraction: float = 0.0  # share of the population that is Byzantine, chosen by seed
    options: dict = field(default_factory=dict)


@dataclass
class ClientConfig:
    algorithm: str = "fedavg"
    epochs: int = 1
    steps: int = 0  # > 0: this many local steps instead of epochs
    batch_size: int = 16
    lr: float = 0.05
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    optimizer: str = "sgd"  # local optimizer: sgd or adamw
    beta1: float = 0.9  # adamw
    beta2: float = 0.999  # adamw
    eps: float = 1e-8  # adamw
    lr_schedule: str = "constant"  # local lr over a round's steps: constant, cosine or linear (needs steps > 0)
    lr_warmup: int = 0  # local steps of linear warm-up at the start of each round
    mu: float = 0.01  # FedProx proximal weight
    options: dict = field(default_factory=dict)  # the algorithm's own options (e.g. spsa epsilon)


@dataclass
class ServerConfig:
    optimizer: str = "fedavg"
    lr: float = 0.0  # 0 = the optimizer's own default (1.0 for fedavg/fedavgm, 0.01 adaptive)
    momentum: float = 0.9  # fedavgm
    beta1: float = 0.9  # fedadam / fedyogi / fedadagrad
    beta2: float = 0.99
    tau: float = 1e-3
    rounds: int = 30
    clients_per_round: int = 10
    sampler: str = "uniform"
    sampler_options: dict = field(default_factory=dict)  # the sampler's own options, e.g. {c = 0.5} for ucb
    eval_every: int = 1
    checkpoint_every: int = 1


@dataclass
class DiLoCoSection:
    """`[diloco]`: settings of `topology.name = "diloco"` (see `koinon.topology.diloco.IslandsSpec`).

    Every key lives in `options` and is checked (name, type, range) by the islands builder,
    which then writes the resolved values back, so a run's config.toml spells out all of them.
    """

    options: dict = field(default_factory=dict)


@dataclass
class DeployConfig:
    """Real deployment (`koinon server` / `koinon client`); simulation runs ignore it."""

    min_clients: int = 0  # updates that close a round (0 = server.clients_per_round)
    wait_clients_s: float = 600.0  # how long a round waits for enough connected clients
    round_timeout_s: float = 120.0  # deadline for a round's updates once the cohort is asked
    max_message_mb: float = 0.0  # largest accepted upload (0 = 4x the model's fp32 size + 1 MB)
    min_connected: int = 0  # connected clients a round waits for before sampling (0 = min_clients)
    max_update_norm: float = 0.0  # refuse model updates with a larger L2 norm (0 = no bound)


@dataclass
class ClockConfig:
    """`[clock]`: simulated time (see `koinon.schedule.clock`). Off unless `speed` or `trace` is set."""

    speed: str = "none"  # per-client compute speed: none (no clock), constant, lognormal or uniform
    sigma: float = 1.0  # lognormal speed: sigma of log(speed) (median 1)
    low: float = 0.5  # uniform speed: range [low, high]
    high: float = 2.0
    sample_s: float = 0.001  # seconds of compute per training sample at speed 1
    bandwidth: str = "constant"  # per-client link: constant, lognormal or uniform (multiplies bandwidth_mbps)
    bandwidth_mbps: float = 10.0  # median link bandwidth in megabits per second (both directions)
    bandwidth_sigma: float = 1.0
    bandwidth_low: float = 0.5
    bandwidth_high: float = 2.0
    trace: str = ""  # a JSON or CSV file of speeds, bandwidths and availability windows
    dropout: float = 0.0  # fraction of clients that leave for good at a random time
    dropout_within_s: float = 100.0  # ... drawn uniformly in [0, dropout_within_s]


@dataclass
class ScheduleConfig:
    """`[schedule]`: when updates are applied (`koinon.schedule`); needs `[clock]` unless sync."""

    name: str = "sync"  # sync, fedasync, fedbuff, fedcompass or fedamd
    options: dict = field(default_factory=dict)  # the schedule's own options (see `koinon list`)


@dataclass
class LogConfig:
    """What a run logs besides metrics.jsonl."""

    tensorboard: bool = False  # TensorBoard event files in DIR/tensorboard (the tensorboard extra)


@dataclass
class LedgerConfig:
    """`[ledger]`: contribution scores, the verifiable round log and payouts (`koinon.ledger`)."""

    contribution: str = "none"  # none, or a contribution method: gtg, tmc, loo, exact, shapfed, cosine, trust
    utility: str = "loss"  # of a coalition model on the validation set: loss (minus the mean loss) or accuracy
    validation_fraction: float = 0.5  # share of the test split the owner commits to (seeded)
    budget_s: float = 0.0  # per round, seconds a sampling method may spend (0 = no limit)
    budget_evals: int = 0  # per round, coalition models a sampling method may evaluate (0 = no limit)
    payout_cents: int = 0  # the escrowed budget, integer cents, split by the scores at the end
    min_quality: float = 0.1  # paid only if the total score >= this x the mean positive total
    detect_fraction: float = 0.5  # excluded in at least this share of its rounds: an attacker, paid nothing
    min_update_norm: float = 0.01  # an update shorter than this x the round's median: a free rider
    options: dict = field(default_factory=dict)  # the method's own options (e.g. gtg tolerance)


@dataclass
class PrivacyConfig:
    """`[privacy]`: secure aggregation and differential privacy (`koinon.privacy`); all off by
    default. Checked by `koinon.privacy.check_privacy` when the experiment is built."""

    secagg: bool = False  # SecAgg+ (Bell et al. 2020): the server learns only the cohort's sum
    dp: str = "none"  # none, central (user-level DP-FedAvg), local (noise on each client), sample (DP-SGD)
    noise_multiplier: float = 0.0  # z: noise std = z * clip (0 with target_epsilon: calibrated)
    clip: float = 1.0  # L2 bound of a client's update (the initial bound with adaptive clipping)
    target_quantile: float = 0.0  # adaptive clipping (Andrew et al. 2021): quantile in (0, 1); 0 = fixed
    clip_lr: float = 0.2  # adaptive clipping: geometric learning rate eta
    clip_count_stddev: float = 0.0  # adaptive clipping: noise on the unclipped count (0 = cohort / 20)
    target_epsilon: float = 0.0  # privacy budget for server.rounds rounds (0 = no budget)
    delta: float = 1e-5
    accountant: str = "rdp"  # rdp or pld (dp-accounting)
    noise_seed: int = -1  # -1: noise from os.urandom; >= 0: reproducible noise, NOT private (tests)
    secagg_degree: int = 0  # neighbours per client in the SecAgg+ graph (0 = O(log n), sized for the dropout)
    secagg_threshold: float = 0.5  # Shamir threshold t = floor(fraction * degree) + 1
    secagg_modulus_bits: int = 32  # sums are taken modulo 2^bits
    secagg_clip_range: float = 8.0  # each coordinate is clipped to [-range, range] before encoding
    secagg_max_weight: int = 1000  # a client's aggregation weight (its samples) is capped here
    secagg_dropout: float = 0.0  # simulation: fraction of clients that drop out at each protocol step
    secagg_consistency: bool = False  # clients sign the survivor list before unmasking (malicious-server check)
    secagg_step_timeout_s: float = 30.0  # koinon server: how long each protocol step waits for the cohort


@dataclass
class Config:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ComponentConfig = field(default_factory=lambda: ComponentConfig("mlp"))
    client: ClientConfig = field(default_factory=ClientConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    codec: ComponentConfig = field(default_factory=lambda: ComponentConfig("identity"))
    downlink: DownlinkConfig = field(default_factory=lambda: DownlinkConfig())
    aggregator: ComponentConfig = field(default_factory=lambda: ComponentConfig("mean"))
    runtime: ComponentConfig = field(default_factory=lambda: ComponentConfig("vectorized"))
    attack: AttackConfig = field(default_factory=lambda: AttackConfig())
    topology: TopologyConfig = field(default_factory=lambda: TopologyConfig())
    deploy: DeployConfig = field(default_factory=lambda: DeployConfig())
    diloco: DiLoCoSection = field(default_factory=lambda: DiLoCoSection())
    log: LogConfig = field(default_factory=lambda: LogConfig())
    clock: ClockConfig = field(default_factory=lambda: ClockConfig())
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig())
    ledger: LedgerConfig = field(default_factory=lambda: LedgerConfig())
    privacy: PrivacyConfig = field(default_factory=lambda: PrivacyConfig())

    # ---------------------------------------------------------------- (de)serialize

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"seed": self.seed}
        for f in dataclasses.fields(self):
            if f.name == "seed":
                continue
            section = getattr(self, f.name)
            d = {k: v for k, v in dataclasses.asdict(section).items() if k != "options"}
            if f.name == "server" and not d["sampler_options"]:
                del d["sampler_options"]  # written only when set, as before the key existed
            d.update(getattr(section, "options", {}))
            if f.name in ("clock", "schedule") and section == type(section)():
                continue  # a run without simulated time writes the config it always did
            if f.name == "ledger" and self.ledger.contribution == "none":
                continue  # a run without a ledger writes the config it always wrote
            if d or f.name != "diloco" or self.topology.name == "diloco":
                out[f.name] = d  # no empty [diloco] table in a run that is not DiLoCo
        return out

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    @staticmethod
    def from_dict(raw: dict[str, Any]) -> Config:
        cfg = Config()
        for key, value in raw.items():
            if key == "seed":
                cfg.seed = _check_type("seed", value, 0)
                continue
            if key not in SECTIONS:
                raise ConfigError(
                    f"unknown config key {key!r}; allowed: seed, {', '.join(SECTIONS)}"
                )
            if not isinstance(value, dict):
                raise ConfigError(f"[{key}] must be a table of keys, got {value!r}")
            section = getattr(cfg, key)
            for sub, v in value.items():
                _set_in_section(key, section, sub, v)
        return cfg

    def with_overrides(self, overrides: dict[str, Any]) -> Config:
        raw = self.to_dict()
        for dotted, value in overrides.items():
            if dotted == "seed":
                continue
            section, _, key = dotted.partition(".")
            if not key or "." in key:
                raise ConfigError(f"--set {dotted}: use section.key (e.g. server.rounds) or seed")
            if section not in SECTIONS:
                raise ConfigError(
                    f"--set {dotted}: unknown section {section!r}; allowed: {', '.join(SECTIONS)}"
                )
            # A different component discards the options that belonged to the old one (a
            # resolved config spells out all of them) and keeps the section's fixed keys.
            raw.setdefault(section, {})
            if key == NAME_KEYS.get(section) and raw[section].get(key) != value:
                fixed = {f.name for f in dataclasses.fields(getattr(self, section))}
                raw[section] = {k: v for k, v in raw[section].items() if k in fixed}
        for dotted, value in overrides.items():
            if dotted == "seed":
                raw["seed"] = value
            else:
                section, _, key = dotted.partition(".")
                raw[section][key] = value
        return Config.from_dict(raw)


SECTIONS = ("data", "model", "client", "server", "codec", "downlink", "aggregator", "runtime", "attack",
            "topology", "deploy", "diloco", "log", "clock", "schedule", "ledger", "privacy")
COMPONENT_SECTIONS = ("model", "codec", "downlink", "aggregator", "runtime", "attack")
NAME_KEYS = {**{s: "name" for s in COMPONENT_SECTIONS}, "data": "name", "client": "algorithm",
             "schedule": "name", "ledger": "contribution"}
"""The key that names a section's component; the section's other keys are its fixed keys plus
that component's options (see `koinon list`)."""


def _check_type(key: str, value: Any, default: Any) -> Any:
    ok: bool
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, dict):
        ok = isinstance(value, dict)
    else:
        ok = True
    if not ok:
        raise ConfigError(f"{key} = {value!r}: expected {type(default).__name__}")
    return value


def _set_in_section(section_name: str, section: Any, key: str, value: Any) -> None:
    names = [f.name for f in dataclasses.fields(section) if f.name != "options"]
    if key in names:
        setattr(section, key, _check_type(f"{section_name}.{key}", value, getattr(section, key)))
    elif hasattr(section, "options"):
        section.options[key] = value  # checked against the component / dataset when built
    else:
        raise ConfigError(
            f"unknown key {section_name}.{key}; allowed: {', '.join(names)}"
        )


def parse_override(text: str) -> tuple[str, Any]:
    """`section.key=value` with a TOML value (`5`, `0.1`, `true`, `[64, 64]`) or a bare string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        raw = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML ({exc})") from None
    cfg = Config.from_dict(raw)
    if overrides:
        cfg = cfg.with_overrides(dict(parse_override(o) for o in overrides))
    return cfg


def describe_keys() -> list[tuple[str, Any]]:
    """(key, default) for every fixed key, for `koinon run --help` and the README."""
    cfg = Config()
    out: list[tuple[str, Any]] = [("seed", cfg.seed)]
    for name in SECTIONS:
        section = getattr(cfg, name)
        for f in dataclasses.fields(section):
            if f.name == "options":
                continue
            out.append((f"{name}.{f.name}", getattr(section, f.name)))
    return out
