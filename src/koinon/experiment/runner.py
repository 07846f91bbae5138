"""Build a topology from a `Config`, run it, and write everything a run leaves behind.

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
from typing import Any

import torch

from koinon.config import Config, load_config, parse_override
from koinon.errors import ConfigError, KoinonError
from koinon.experiment.checkpoint import load_checkpoint, save_checkpoint
from koinon.files import atomic_write_text
from koinon.topology import TOPOLOGIES, Topology

RUN_FILES = ("config.toml", "metrics.jsonl", "summary.json", "checkpoint.json", "model.safetensors", "accuracy.png")
RESUMABLE_KEYS = {"server.rounds", "server.eval_every", "server.checkpoint_every"}


def build_federation(cfg: Config) -> Topology:
    """The topology `cfg` names (`topology.name`: federated, gossip or diloco) with every
    component checked; raises a one-line ConfigError before anything runs."""
    return TOPOLOGIES.get(cfg.topology.name, key="topology.name")(cfg)


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
