"""A run folder, and the one loop that trains any topology round by round (into a folder or not).

`koinon run` (`koinon.experiment.runner`) and `Federation.fit(out=...)` write the same folder
with this code: the run's description (`config.toml` from the runner, `federation.json` from
the Python API), `metrics.jsonl` (one line per round, appended as rounds finish),
`checkpoint.json` + `ckpt-*.safetensors` (to resume), and, only once the run has finished,
`model.safetensors`, `accuracy.png` and `summary.json`. A folder without `summary.json` is an
unfinished run; `restore` puts a freshly built topology back where its checkpoint stands, and
the run then ends with the same model as an uninterrupted one.

Nothing here imports a topology: it drives any object with the `Trainable` attributes, so the
topologies themselves (`fit`) and the runner share it.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import torch

from koinon.errors import ConfigError, KoinonError
from koinon.files import atomic_write_text
from koinon.params import Layout
from koinon.records.checkpoint import load_checkpoint, save_checkpoint

RUN_FILES = ("config.toml", "federation.json", "metrics.jsonl", "summary.json", "checkpoint.json",
             "model.safetensors", "accuracy.png", "tensorboard", "ledger", "payouts.csv", "payouts.png")

Callback = Callable[[Any], object]
"""Called with each round's result (a `RoundResult` or a topology's own record) as it finishes."""


class Trainable(Protocol):
    """What the loop and the folder need of a topology (see `koinon.topology.base.Topology`)."""

    layout: Layout
    round_index: int
    uplink_total: int
    downlink_total: int

    @property
    def params(self) -> torch.Tensor: ...

    def run_round(self, evaluate: bool = True) -> Any: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None: ...


def model_sha256(params: torch.Tensor) -> str:
    return hashlib.sha256(params.detach().contiguous().numpy().tobytes()).hexdigest()


def save_model(path: str | Path, layout: Layout, params: torch.Tensor) -> Path:
    """The model as safetensors, keyed like the module's `state_dict` (written atomically)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in layout.views(params).items()}, str(tmp))
    tmp.replace(path)
    return path


def prepare(out: Path, overwrite: bool) -> None:
    """Create `out`; a folder that is not empty is refused unless `overwrite` and it holds a run."""
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(
                f"output folder {str(out)!r} is not empty; overwrite it (--overwrite, "
                f"overwrite=True), choose another folder, or resume it (--resume {out}, resume=True)"
            )
        if not ((out / "config.toml").is_file() or (out / "federation.json").is_file()):
            raise ConfigError(f"refusing to overwrite {str(out)!r}: it does not look like a koinon run")
        for child in out.iterdir():
            if child.name in RUN_FILES or child.name.startswith(("ckpt-", ".")):
                if child.is_dir():
                    shutil.rmtree(child)
                else:
                    child.unlink()
    out.mkdir(parents=True, exist_ok=True)


def start(out: Path, overwrite: bool, description: tuple[str, str]) -> None:
    """A fresh run folder holding the run's description (`(file name, text)`)."""
    prepare(out, overwrite)
    atomic_write_text(out / description[0], description[1])
    (out / "metrics.jsonl").write_text("")


def restore(out: Path, topology: Trainable, until: int, rounds_key: str = "rounds") -> float:
    """Put `topology` where the checkpoint in `out` stands and drop the metrics of later rounds;
    returns the run's wall time so far. A checkpoint past round `until` is refused (naming
    `rounds_key`) before anything changes."""
    meta, tensors = load_checkpoint(out)
    if meta["layout_hash"] != topology.layout.hash():
        raise KoinonError(f"{out}: checkpoint layout {meta['layout_hash']} does not match the model")
    if meta["round"] > until:
        raise ConfigError(f"{rounds_key} = {until} is below the checkpoint's round {meta['round']}")
    topology.load_state_dict(tensors)
    topology.round_index = meta["round"]
    topology.uplink_total = meta["uplink_total"]
    topology.downlink_total = meta["downlink_total"]
    metrics_path = out / "metrics.jsonl"
    lines = [ln for ln in metrics_path.read_text().splitlines() if ln.strip()] if metrics_path.exists() else []
    kept = [ln for ln in lines if json.loads(ln)["round"] <= meta["round"]]
    atomic_write_text(metrics_path, "".join(ln + "\n" for ln in kept))
    (out / "summary.json").unlink(missing_ok=True)
    return float(meta["wall_s"])


def checkpoint(topology: Trainable, out: Path, wall: float) -> None:
    save_checkpoint(out, topology.state_dict(), {
        "round": topology.round_index, "uplink_total": topology.uplink_total,
        "downlink_total": topology.downlink_total, "wall_s": wall, "layout_hash": topology.layout.hash(),
    })


def run_rounds(
    topology: Trainable,
    until: int,
    eval_every: int,
    *,
    out: Path | None = None,
    checkpoint_every: int = 1,
    callbacks: Iterable[Callback] = (),
    progress: bool = False,
    wall_offset: float = 0.0,
) -> list[Any]:
    """Rounds until `topology.round_index == until`, evaluating every `eval_every` rounds and at
    `until`; each result goes to the callbacks and, with `out`, to `metrics.jsonl` (with
    `wall_s`), with a checkpoint every `checkpoint_every` rounds and at `until`."""
    from tqdm import tqdm

    if eval_every < 1 or checkpoint_every < 1:
        raise ValueError(f"need eval_every >= 1 and checkpoint_every >= 1, got {eval_every} and {checkpoint_every}")
    callbacks = list(callbacks)
    results = []
    start_time = time.perf_counter()
    bar = tqdm(total=until, initial=topology.round_index, disable=not progress, unit="round",
               dynamic_ncols=True, leave=True)
    last_acc: float | None = None
    log = (out / "metrics.jsonl").open("a") if out is not None else None
    try:
        while topology.round_index < until:
            upcoming = topology.round_index + 1
            result = topology.run_round(evaluate=upcoming % eval_every == 0 or upcoming == until)
            if log is not None and out is not None:
                wall = wall_offset + time.perf_counter() - start_time
                record = result.as_dict()
                record["wall_s"] = round(wall, 4)
                log.write(json.dumps(record) + "\n")
                log.flush()
                if upcoming % checkpoint_every == 0 or upcoming == until:
                    checkpoint(topology, out, wall)
            results.append(result)
            for callback in callbacks:
                callback(result)
            if progress:
                if result.test_accuracy is not None:
                    last_acc = result.test_accuracy
                bar.update(1)
                bar.set_postfix_str(
                    f"acc={last_acc if last_acc is None else round(last_acc, 4)} "
                    f"up={topology.uplink_total / 1e6:.2f}MB down={topology.downlink_total / 1e6:.2f}MB"
                )
    finally:
        bar.close()
        if log is not None:
            log.close()
        for callback in callbacks:
            close = getattr(callback, "close", None)
            if callable(close):
                close()
    return results


class TensorBoard:
    """A callback that writes each round's numeric metrics as TensorBoard scalars (one tag per
    `metrics.jsonl` key, step = round) to `log_dir`; needs the `tensorboard` extra
    (`pip install 'koinon[tensorboard]'`). `[log] tensorboard = true` adds one writing to the
    run folder's `tensorboard/`."""

    def __init__(self, log_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("TensorBoard logging needs the tensorboard package: "
                              "pip install 'koinon[tensorboard]'") from None
        self.writer = SummaryWriter(str(log_dir))

    def __call__(self, result: Any) -> None:
        record = result.as_dict()
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "round":
                self.writer.add_scalar(key, value, record["round"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    import numpy

    return {"koinon": version("koinon"), "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version()}


def finish(topology: Trainable, out: Path, wall: float, *, title: str, seed: int) -> dict[str, Any]:
    """The finished run's model, plot (titled `title`) and `summary.json`; returns the summary."""
    from koinon.records.plots import plot_run

    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    evaluated = [m for m in metrics if m["test_accuracy"] is not None]
    if not evaluated:
        raise KoinonError(f"{out}: no evaluated round in metrics.jsonl; nothing to summarize")
    best = max(evaluated, key=lambda m: m["test_accuracy"])
    save_model(out / "model.safetensors", topology.layout, topology.params)
    plot_run(metrics, out / "accuracy.png", title)
    summary = {
        "final_accuracy": evaluated[-1]["test_accuracy"],
        "final_test_loss": evaluated[-1]["test_loss"],
        "best_accuracy": best["test_accuracy"],
        "best_round": best["round"],
        "rounds": topology.round_index,
        "uplink_bytes_total": topology.uplink_total,
        "downlink_bytes_total": topology.downlink_total,
        "wall_s": round(wall, 3),
        "seed": seed,
        "num_parameters": topology.layout.numel,
        "layout_hash": topology.layout.hash(),
        "model_sha256": model_sha256(topology.params),
        "versions": _versions(),
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    return summary
