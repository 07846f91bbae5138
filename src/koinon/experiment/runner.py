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
    component checked; raises a one-line ConfigError before anything runs."""
    return TOPOLOGIES.get(cfg.topology.name, key="topology.name")(cfg)


def run_experiment(
    cfg: Config, out_dir: str | Path, *, overwrite: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Run `cfg` from scratch into `out_dir`; returns the summary."""
    fed = build_federation(cfg)
    out = Path(out_dir)
    folder.start(out, overwrite, ("config.toml", cfg.to_toml()))
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
    wall = folder.restore(out, fed, cfg.server.rounds, "server.rounds")
    atomic_write_text(out / "config.toml", cfg.to_toml())
    return _train(fed, cfg, out, wall_offset=wall, progress=progress)


def _train(fed: Topology, cfg: Config, out: Path, wall_offset: float, progress: bool) -> dict[str, Any]:
    s = cfg.server
    start = time.perf_counter()
    try:
        callbacks = [folder.TensorBoard(out / "tensorboard")] if cfg.log.tensorboard else []
        folder.run_rounds(fed, s.rounds, s.eval_every, out=out, checkpoint_every=s.checkpoint_every,
                          callbacks=callbacks, progress=progress, wall_offset=wall_offset)
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
    return " / ".join(parts) + f" / seed {c.seed}"


def finish_run(fed: Topology, cfg: Config, out: Path, wall: float) -> dict[str, Any]:
    """The finished run's model, plot and summary (also the deployment server's last step)."""
    return folder.finish(fed, out, wall, title=run_title(cfg), seed=cfg.seed)
