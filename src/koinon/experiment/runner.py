"""Build a federation from a `Config`, run it, and write everything a run leaves behind.

Output folder: `config.toml` (resolved, every default spelled out), `metrics.jsonl` (one line
per round, appended as rounds finish), `checkpoint.json` + `ckpt-*.safetensors` (to resume),
and, only once the run has finished, `model.safetensors`, `accuracy.png` and `summary.json`. A
folder without `summary.json` is an unfinished run: `koinon run --resume DIR` continues it and
ends with the same model as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import time
from pathlib import Path
from typing import Any, Protocol

import torch

from koinon.clients import CLIENT_ALGORITHMS, LocalTraining
from koinon.config import Config, load_config, parse_override
from koinon.data import DATASETS, partition_dataset
from koinon.errors import ConfigError, KoinonError
from koinon.experiment.checkpoint import atomic_write_text, load_checkpoint, save_checkpoint
from koinon.models import build_model
from koinon.params import Layout
from koinon.registry import Registry
from koinon.server import SAMPLERS, SERVER_OPTIMIZERS
from koinon.topology import Federation

RUN_FILES = ("config.toml", "metrics.jsonl", "summary.json", "checkpoint.json", "model.safetensors", "accuracy.png")
RESUMABLE_KEYS = {"server.rounds", "server.eval_every", "server.checkpoint_every"}


def _guard(what: str, fn, *args, **kwargs):
    """Turn a component's ValueError into a one-line ConfigError naming the config key."""
    try:
        return fn(*args, **kwargs)
    except KoinonError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{what}: {exc}") from None


def _check_options(registry: Registry, name: str, options: dict, section: str, fixed: list[str]) -> None:
    allowed = [k for k in registry.options(name) if k not in ("seed", "test_fraction", "num_clients")]
    for key in options:
        if key not in allowed:
            raise ConfigError(
                f"unknown key {section}.{key}; allowed: {', '.join(fixed + allowed)}"
            )


class Topology(Protocol):
    """What the runner needs of a topology: `Federation` (a server) or `Gossip` (peers)."""

    layout: Layout
    round_index: int
    uplink_total: int
    downlink_total: int

    @property
    def params(self) -> torch.Tensor: ...

    def run_round(self, evaluate: bool = True) -> Any: ...

    def fit(self, rounds: int, eval_every: int = 1) -> list[Any]: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None: ...

    def close(self) -> None: ...


def build_federation(cfg: Config) -> Topology:
    """Every component of the experiment, checked; raises ConfigError before anything runs."""
    if cfg.topology.name == "diloco":
        return _build_diloco(cfg)
    d = cfg.data
    DATASETS.get(d.name, key="data.name")
    _check_options(DATASETS, d.name, d.options, "data", ["name", "partition", "alpha", "num_clients",
                   "test_fraction", "classes_per_client", "power"])
    dataset = DATASETS.build(
        d.name, d.options, "data", seed=cfg.seed, test_fraction=d.test_fraction, num_clients=d.num_clients
    )
    fed_data = _guard(
        f"data.partition = {d.partition!r}", partition_dataset, dataset, d.partition, d.num_clients,
        cfg.seed, {"alpha": d.alpha, "classes_per_client": d.classes_per_client, "power": d.power},
    )
    model = build_model(cfg.model.name, cfg.model.options, dataset.input_shape, dataset.num_classes, cfg.seed)
    c = cfg.client
    local = _guard(
        "client", LocalTraining, epochs=c.epochs, steps=c.steps, batch_size=c.batch_size, lr=c.lr,
        momentum=c.momentum, nesterov=c.nesterov, weight_decay=c.weight_decay,
        optimizer=c.optimizer, beta1=c.beta1, beta2=c.beta2, eps=c.eps,
    )
    CLIENT_ALGORITHMS.get(c.algorithm, key="client.algorithm")
    algorithm = CLIENT_ALGORITHMS.build(c.algorithm, c.options, "client", mu=c.mu)
    s = cfg.server
    server_context: dict[str, Any] = {"momentum": s.momentum, "beta1": s.beta1, "beta2": s.beta2, "tau": s.tau}
    if s.lr:
        server_context["lr"] = s.lr
    optimizer = SERVER_OPTIMIZERS.build(s.optimizer, {}, "server.optimizer", **server_context)
    s.lr = optimizer.lr  # the resolved config records the learning rate actually used
    sampler = SAMPLERS.build(s.sampler, {}, "server.sampler")
    for key, value in (("server.rounds", s.rounds), ("server.eval_every", s.eval_every),
                       ("server.checkpoint_every", s.checkpoint_every)):
        if value < 1:
            raise ConfigError(f"{key} = {value}: must be >= 1")
    if not 1 <= s.clients_per_round <= fed_data.num_clients:
        raise ConfigError(
            f"server.clients_per_round = {s.clients_per_round}: must be between 1 and "
            f"data.num_clients = {fed_data.num_clients}"
        )
    layout = Layout.from_module(model)
    from koinon.aggregate import build_aggregator
    from koinon.compress import CODECS
    from koinon.runtime import RUNTIMES

    codec = CODECS.build(cfg.codec.name, cfg.codec.options, "codec", layout=layout)
    downlink = CODECS.build(cfg.downlink.name, cfg.downlink.options, "downlink", layout=layout)
    from koinon.attacks import ATTACKS

    a = cfg.attack
    if not 0.0 <= a.fraction < 1.0:
        raise ConfigError(f"attack.fraction = {a.fraction}: must be in [0, 1)")
    if a.fraction > 0 and a.name == "none":
        raise ConfigError("attack.fraction > 0 needs attack.name; see `koinon list` for the attacks")
    attack = ATTACKS.build(a.name, a.options, "attack")
    # Robust rules get f = the number of Byzantine clients in every cohort, unless set.
    agg_options = dict(cfg.aggregator.options)
    f = agg_options.pop("num_byzantine", round(a.fraction * s.clients_per_round))
    if not isinstance(f, int) or isinstance(f, bool) or f < 0:
        raise ConfigError(f"aggregator.num_byzantine = {f!r}: expected an integer >= 0")
    _check_root_options(cfg.aggregator.name, agg_options)
    aggregator = build_aggregator(cfg.aggregator.name, agg_options, f)
    # A throwaway instance aggregates a dummy cohort, so a rule whose assumption (e.g. Bulyan's
    # n >= 4f + 3) this cohort size breaks is refused now, not in the middle of training.
    probe = build_aggregator(cfg.aggregator.name, agg_options, f)
    from koinon.server.root import reference_users

    for part in reference_users(probe):  # FLTrust: any reference, only the cohort size is checked
        part.set_reference(torch.ones(2))
    _guard(f"aggregator.name = {cfg.aggregator.name!r} with server.clients_per_round = "
           f"{s.clients_per_round}", probe.aggregate,
           torch.zeros(s.clients_per_round, 2), torch.ones(s.clients_per_round))
    runtime = RUNTIMES.build(cfg.runtime.name, cfg.runtime.options, "runtime")
    if reference_users(aggregator) and cfg.topology.name == "gossip":
        raise ConfigError(f"aggregator.name = {cfg.aggregator.name!r} needs a server with a root dataset; "
                          f"topology.name = {cfg.topology.name!r} has none (use topology.name = 'federated')")
    if cfg.topology.name == "gossip":
        return _build_gossip(cfg, model, fed_data, local, algorithm, codec, aggregator, runtime, attack)
    if cfg.topology.name != "federated":
        raise ConfigError(f"topology.name = {cfg.topology.name!r}: allowed: federated, gossip, diloco")
    return _guard(
        "federation", Federation, model, fed_data, local=local, algorithm=algorithm,
        server_optimizer=optimizer, sampler=sampler, codec=codec, downlink=downlink,
        aggregator=aggregator, runtime=runtime, clients_per_round=s.clients_per_round, seed=cfg.seed,
        attack=attack, byzantine_fraction=a.fraction, downlink_delta=cfg.downlink.delta,
    )


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


def _build_diloco(cfg: Config) -> Topology:
    """Compute islands (DiLoCo family, simulated in one process); [client] and [server]
    optimizer keys do not apply: the [diloco] section holds the inner and outer optimizers."""
    from koinon.islands import DiLoCo, build_parts

    s = cfg.server
    for key, value in (("server.rounds", s.rounds), ("server.eval_every", s.eval_every),
                       ("server.checkpoint_every", s.checkpoint_every)):
        if value < 1:
            raise ConfigError(f"{key} = {value}: must be >= 1")
    from koinon.runtime.local import set_threads

    parts = build_parts(cfg)
    threads = cfg.runtime.options.get("threads", 0)
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 0:
        raise ConfigError(f"runtime.threads = {threads!r}: expected an integer >= 0 (0 = 1 for small models)")
    set_threads(threads, parts.layout.numel)  # small models: one thread (see set_threads)
    return DiLoCo(parts, cfg.seed)


def _build_gossip(cfg: Config, model, fed_data, local, algorithm, codec, aggregator, runtime, attack) -> Topology:
    """Decentralized training: every client is a node; server-only sections are ignored."""
    import inspect

    from koinon.topology import Gossip

    t = cfg.topology
    failures: dict[int, float] = {}
    for key, value in t.failures.items():
        if not str(key).isdigit() or not isinstance(value, (int, float)):
            raise ConfigError(f"topology.failures = {t.failures!r}: expected {{round = fraction}}, "
                              "e.g. failures = {{ 20 = 0.5 }}")
        failures[int(key)] = float(value)
    accepted = set(inspect.signature(Gossip).parameters)
    extra = {k: v for k, v in t.options.items() if k in accepted}
    graph_options = {k: v for k, v in t.options.items() if k not in accepted}
    robust = None if cfg.aggregator.name == "mean" else aggregator
    if cfg.attack.name != "none":
        if "attack" in extra or "byzantine_fraction" in extra:
            raise ConfigError("gossip attacks: use [attack] name/fraction or topology.options "
                              "attack/byzantine_fraction, not both")
        # [attack] applies to gossip as to a federation: Byzantine peers forge what they send.
        extra.update(attack=attack, byzantine_fraction=cfg.attack.fraction)
    return _guard(
        "topology", Gossip, model, fed_data, graph=t.graph, graph_options=graph_options,
        mixing=t.mixing, local=local, algorithm=algorithm, codec=codec, compress_delta=t.compress_delta,
        aggregator=robust, runtime=runtime, final_merge_every=t.final_merge_every, failures=failures,
        failure_choice=t.failure_choice, eval_nodes=t.eval_nodes, seed=cfg.seed, **extra,
    )


def _versions() -> dict[str, str]:
    import numpy

    from koinon import __version__

    return {"koinon": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version()}


def model_sha256(params: torch.Tensor) -> str:
    return hashlib.sha256(params.detach().contiguous().numpy().tobytes()).hexdigest()


def _prepare_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(
                f"output folder {str(out)!r} is not empty; pass --overwrite, another --out, "
                f"or --resume {out} to continue it"
            )
        if not (out / "config.toml").is_file():
            raise ConfigError(f"refusing to overwrite {str(out)!r}: it does not look like a koinon run")
        for child in out.iterdir():
            if child.name in RUN_FILES or child.name.startswith(("ckpt-", ".")):
                if child.is_dir():
                    shutil.rmtree(child)
                else:
                    child.unlink()
    out.mkdir(parents=True, exist_ok=True)


def run_experiment(
    cfg: Config, out_dir: str | Path, *, overwrite: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Run `cfg` from scratch into `out_dir`; returns the summary."""
    fed = build_federation(cfg)
    out = Path(out_dir)
    _prepare_dir(out, overwrite)
    atomic_write_text(out / "config.toml", cfg.to_toml())
    (out / "metrics.jsonl").write_text("")
    return _train(fed, cfg, out, wall_offset=0.0, progress=progress)


def resume_experiment(out_dir: str | Path, overrides: list[str] | None = None, *, progress: bool = True) -> dict[str, Any]:
    """Continue the unfinished (or extend the finished) run in `out_dir` from its checkpoint."""
    out = Path(out_dir)
    if not (out / "config.toml").is_file():
        raise ConfigError(f"--resume {out}: no config.toml there, not a koinon run folder")
    for text in overrides or []:
        key, _ = parse_override(text)
        if key not in RESUMABLE_KEYS:
            raise ConfigError(
                f"--set {key}: cannot change when resuming (it would change the run); "
                f"allowed: {', '.join(sorted(RESUMABLE_KEYS))}"
            )
    cfg = load_config(out / "config.toml", overrides)
    fed = build_federation(cfg)
    meta, tensors = load_checkpoint(out)
    if meta["layout_hash"] != fed.layout.hash():
        raise KoinonError(f"{out}: checkpoint layout {meta['layout_hash']} does not match the model")
    if meta["round"] > cfg.server.rounds:
        raise ConfigError(f"server.rounds = {cfg.server.rounds} is below the checkpoint's round {meta['round']}")
    fed.load_state_dict(tensors)
    fed.round_index = meta["round"]
    fed.uplink_total = meta["uplink_total"]
    fed.downlink_total = meta["downlink_total"]
    metrics_path = out / "metrics.jsonl"
    lines = [ln for ln in metrics_path.read_text().splitlines() if ln.strip()] if metrics_path.exists() else []
    kept = [ln for ln in lines if json.loads(ln)["round"] <= meta["round"]]
    atomic_write_text(metrics_path, "".join(ln + "\n" for ln in kept))
    (out / "summary.json").unlink(missing_ok=True)
    atomic_write_text(out / "config.toml", cfg.to_toml())
    return _train(fed, cfg, out, wall_offset=meta["wall_s"], progress=progress)


def _checkpoint(fed: Topology, out: Path, wall: float) -> None:
    save_checkpoint(out, fed.state_dict(), {
        "round": fed.round_index, "uplink_total": fed.uplink_total,
        "downlink_total": fed.downlink_total, "wall_s": wall, "layout_hash": fed.layout.hash(),
    })


def _train(fed: Topology, cfg: Config, out: Path, wall_offset: float, progress: bool) -> dict[str, Any]:
    from tqdm import tqdm

    s = cfg.server
    start = time.perf_counter()
    bar = tqdm(total=s.rounds, initial=fed.round_index, disable=not progress, unit="round",
               dynamic_ncols=True, leave=True)
    last_acc: float | None = None
    try:
        with (out / "metrics.jsonl").open("a") as log:
            while fed.round_index < s.rounds:
                upcoming = fed.round_index + 1
                do_eval = upcoming % s.eval_every == 0 or upcoming == s.rounds
                result = fed.run_round(evaluate=do_eval)
                wall = wall_offset + time.perf_counter() - start
                record = result.as_dict()
                record["wall_s"] = round(wall, 4)
                log.write(json.dumps(record) + "\n")
                log.flush()
                if upcoming % s.checkpoint_every == 0 or upcoming == s.rounds:
                    _checkpoint(fed, out, wall)
                if result.test_accuracy is not None:
                    last_acc = result.test_accuracy
                bar.update(1)
                bar.set_postfix_str(
                    f"acc={last_acc if last_acc is None else round(last_acc, 4)} "
                    f"up={fed.uplink_total / 1e6:.2f}MB down={fed.downlink_total / 1e6:.2f}MB"
                )
    finally:
        bar.close()
        fed.close()
    wall = wall_offset + time.perf_counter() - start
    return finish_run(fed, cfg, out, wall)


def finish_run(fed: Topology, cfg: Config, out: Path, wall: float) -> dict[str, Any]:
    from safetensors.torch import save_file

    from koinon.experiment.report import plot_run

    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    evaluated = [m for m in metrics if m["test_accuracy"] is not None]
    best = max(evaluated, key=lambda m: m["test_accuracy"])
    tmp = out / ".model.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in fed.layout.views(fed.params).items()}, str(tmp))
    tmp.replace(out / "model.safetensors")
    plot_run(metrics, out / "accuracy.png", f"{cfg.data.name} / {cfg.data.partition} / {cfg.client.algorithm}")
    summary = {
        "final_accuracy": evaluated[-1]["test_accuracy"],
        "final_test_loss": evaluated[-1]["test_loss"],
        "best_accuracy": best["test_accuracy"],
        "best_round": best["round"],
        "rounds": fed.round_index,
        "uplink_bytes_total": fed.uplink_total,
        "downlink_bytes_total": fed.downlink_total,
        "wall_s": round(wall, 3),
        "seed": cfg.seed,
        "num_parameters": fed.layout.numel,
        "layout_hash": fed.layout.hash(),
        "model_sha256": model_sha256(fed.params),
        "versions": _versions(),
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    return summary
