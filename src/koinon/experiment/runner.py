"""Build a topology from a `Config`, run it, and write everything a run leaves behind.

Output folder: `config.toml` (resolved, every default spelled out), `metrics.jsonl` (one line
per round, appended as rounds finish), `checkpoint.json` + `ckpt-*.safetensors` (to resume),
and, only once the run has finished, `model.safetensors`, `accuracy.png` and `summary.json`. A
folder without `summary.json` is an unfinished run: `koinon run --resume DIR` continues it and
ends with the same model as an uninterrupted run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from koinon.config import Config, load_config, parse_override
from koinon.errors import ConfigError
from koinon.files import atomic_write_text
from koinon.records import folder
from koinon.topology import TOPOLOGIES, Topology

RESUMABLE_KEYS = {"server.rounds", "server.eval_every", "server.checkpoint_every"}


def build_federation(cfg: Config) -> Topology:
    """The topology `cfg` names (`topology.name`: federated, gossip or diloco) with every
    component checked; raises a one-line ConfigError before anything runs. Afterwards `cfg`
    spells out every built component's options, defaults included (see `record_defaults`)."""
    from koinon.schedule import scheduled

    topology = scheduled(cfg, TOPOLOGIES.get(cfg.topology.name, key="topology.name")(cfg))
    record_defaults(cfg)
    return topology


def record_defaults(cfg: Config) -> None:
    """Fill each component section of `cfg` with its component's options, defaults included
    (nested `inner` codecs too), so the run's config.toml alone reproduces it even if a default
    changes. Only what the topology builds is filled (DiLoCo: data, model, codec; its
    `[diloco]` keys are resolved by its builder). Derived values stay out: `aggregator.num_byzantine`
    (from attack.fraction unless set) and the keys a fixed key sets (`client.mu`). Resolving a
    resolved config changes nothing, so a restarted deployment compares it equal."""
    from koinon.clients import CLIENT_ALGORITHMS
    from koinon.data import DATASETS
    from koinon.models import MODELS

    cfg.data.options = DATASETS.resolve(cfg.data.name, cfg.data.options, ("seed", "test_fraction", "num_clients"))
    cfg.model.options = MODELS.resolve(cfg.model.name, cfg.model.options, ("input_shape", "num_classes"))
    cfg.codec.options = _codec_options(cfg.codec.name, cfg.codec.options)
    if cfg.topology.name == "diloco":
        return
    from koinon.attacks import ATTACKS
    from koinon.runtime import RUNTIMES

    cfg.downlink.options = _codec_options(cfg.downlink.name, cfg.downlink.options)
    cfg.client.options = CLIENT_ALGORITHMS.resolve(cfg.client.algorithm, cfg.client.options, ("mu", "seed", "layout"))
    cfg.aggregator.options = _aggregator_options(cfg.aggregator.name, cfg.aggregator.options)
    cfg.runtime.options = RUNTIMES.resolve(cfg.runtime.name, cfg.runtime.options)
    cfg.attack.options = ATTACKS.resolve(cfg.attack.name, cfg.attack.options)
    from koinon.server import SAMPLERS

    cfg.server.sampler_options = SAMPLERS.resolve(cfg.server.sampler, cfg.server.sampler_options)
    if cfg.clock != type(cfg.clock)() or cfg.schedule != type(cfg.schedule)():
        from koinon.schedule import SCHEDULES

        cfg.schedule.options = SCHEDULES.resolve(cfg.schedule.name, cfg.schedule.options)


def _codec_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """A codec's options with defaults; a wrapper's `inner` becomes a full table (name too)."""
    from koinon.compress import CODECS

    resolved = CODECS.resolve(name, options, ("layout",))
    inner = resolved.get("inner")
    if isinstance(inner, str):
        inner = {"name": inner}
    if isinstance(inner, dict) and isinstance(inner.get("name"), str):
        rest = {k: v for k, v in inner.items() if k != "name"}
        resolved["inner"] = {"name": inner["name"], **_codec_options(inner["name"], rest)}
    return resolved


def _aggregator_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """A rule's (or a `pre+...+rule` composition's) options with defaults. One key feeds every
    step that takes it, so a default two steps disagree on stays unset (each keeps its own)."""
    from koinon.aggregate import AGGREGATORS, PRE_AGGREGATORS

    parts = [p.strip() for p in name.split("+")]
    registries = [PRE_AGGREGATORS] * (len(parts) - 1) + [AGGREGATORS]
    defaults: dict[str, Any] = {}
    clashes: set[str] = set()
    for part, registry in zip(parts, registries, strict=True):
        for key, value in registry.resolve(part, {}, ("num_byzantine",)).items():
            if key in defaults and defaults[key] != value:
                clashes.add(key)
            defaults.setdefault(key, value)
    return {**{k: v for k, v in defaults.items() if k not in clashes}, **options}


def run_experiment(
    cfg: Config, out_dir: str | Path, *, overwrite: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Run `cfg` from scratch into `out_dir`; returns the summary."""
    fed = build_federation(cfg)
    out = Path(out_dir)
    ledger = None
    if cfg.ledger.contribution != "none":  # checked, and its options resolved, before the folder is touched
        from koinon.ledger import CONTRIBUTIONS, attach_ledger, checked_settings

        checked_settings(cfg)
        cfg.ledger.options = CONTRIBUTIONS.resolve(cfg.ledger.contribution, cfg.ledger.options)
    folder.start(out, overwrite, ("config.toml", cfg.to_toml()))
    if cfg.ledger.contribution != "none":
        ledger = attach_ledger(fed, cfg, out, cfg.to_toml())
    return _train(fed, cfg, out, wall_offset=0.0, progress=progress, ledger=ledger)


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
    ledger = None
    if cfg.ledger.contribution != "none":  # its log is reopened, checked and cut back to the checkpoint
        from koinon.ledger import attach_ledger
        from koinon.records.checkpoint import load_checkpoint

        fed.round_index = load_checkpoint(out)[0]["round"]
        ledger = attach_ledger(fed, cfg, out, cfg.to_toml(), resume=True)
    wall = folder.restore(out, fed, cfg.server.rounds, "server.rounds")
    atomic_write_text(out / "config.toml", cfg.to_toml())
    return _train(fed, cfg, out, wall_offset=wall, progress=progress, ledger=ledger)


def _train(fed: Topology, cfg: Config, out: Path, wall_offset: float, progress: bool,
           ledger: Any = None) -> dict[str, Any]:
    s = cfg.server
    start = time.perf_counter()
    try:
        callbacks = [folder.TensorBoard(out / "tensorboard")] if cfg.log.tensorboard else []
        folder.run_rounds(fed, s.rounds, s.eval_every, out=out, checkpoint_every=s.checkpoint_every,
                          callbacks=callbacks, progress=progress, wall_offset=wall_offset)
        if ledger is not None:
            ledger.finish(out)
    finally:
        fed.close()
    return finish_run(fed, cfg, out, wall_offset + time.perf_counter() - start)


def run_title(cfg: Config) -> str:
    """What ran, for the plot: topology and algorithm, data and partition, model, codecs,
    aggregator, attack, seed."""
    t, c = cfg.topology.name, cfg
    what = "diloco" if t == "diloco" else f"{t} {c.client.algorithm}"
    parts = [what, f"{c.data.name} ({c.data.partition}, {c.data.num_clients} clients)", c.model.name]
    if t != "diloco":
        parts.append(f"codec {c.codec.name}" + (f", down {c.downlink.name}" if c.downlink.name != "identity" else ""))
        if c.aggregator.name != "mean":
            parts.append(f"aggregator {c.aggregator.name}")
        if c.attack.name != "none":
            parts.append(f"attack {c.attack.name} {c.attack.fraction:.0%}")
    if c.clock.speed != "none" or c.clock.trace:
        parts.append(f"schedule {c.schedule.name}")
    return " / ".join(parts) + f" / seed {c.seed}"


def finish_run(fed: Topology, cfg: Config, out: Path, wall: float) -> dict[str, Any]:
    """The finished run's model, plot and summary (also the deployment server's last step)."""
    return folder.finish(fed, out, wall, title=run_title(cfg), seed=cfg.seed)
