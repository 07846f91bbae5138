"""`koinon pretrain CONFIG`: train a model centrally on a public split and write safetensors.

The config is an ordinary experiment config: `[data]` names the public split (for example the
first half of Shakespeare's plays, `plays = 18`), `[model]` the model, `[client]` the optimizer
(`optimizer`, `lr`, `batch_size`, `steps` or `epochs`). All clients' training data are pooled
into one client and trained with the same `CohortTrainer` as local training; `server.rounds`
passes of `client.steps` steps (or `client.epochs` epochs) run, with the validation loss after
each. The file written is keyed like the model's `Layout`, so `model.init = "PATH"` starts any
later run (of any topology) from it, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from koinon.clients import LocalSGD
from koinon.config import Config
from koinon.data import FederatedData
from koinon.errors import ConfigError
from koinon.local.losses import evaluate
from koinon.local.trainer import CohortTrainer
from koinon.models.pretrained import save_weights
from koinon.params import Layout


def pretrain(cfg: Config, out: str | Path, report: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train `cfg`'s model on its pooled training data; write the weights to `out`; return a
    summary (steps, validation loss and accuracy after each pass, parameters, path)."""
    from koinon.topology.build import build_components

    if cfg.model.options.get("peft") not in (None, "none"):
        raise ConfigError("koinon pretrain trains the whole model; remove model.peft (use it when fine-tuning)")
    path = Path(out)
    if path.suffix != ".safetensors":
        raise ConfigError(f"--out {str(path)!r}: expected a path ending in .safetensors")
    cfg.server.clients_per_round = 1  # one pooled client; the federation's cohort size does not apply
    parts = build_components(cfg)
    data = parts.fed_data
    pooled = FederatedData(data.dataset, [torch.cat(data.client_indices).sort().values])
    model = parts.model
    layout = Layout.from_module(model)
    params = layout.flatten(model)
    trainer = CohortTrainer(model, layout, pooled, LocalSGD(), parts.local)
    ds = data.dataset
    history: list[dict[str, float]] = []
    steps = 0
    for r in range(cfg.server.rounds):
        result = trainer.train([0], params, {}, [{}], cfg.seed, r)
        assert result.deltas is not None
        params = params + result.deltas[0]
        steps += int(result.num_steps[0])
        accuracy, loss = evaluate(model, layout, params, ds.x_test, ds.y_test)
        history.append({"pass": r + 1, "steps": steps, "train_loss": float(result.train_loss[0]),
                        "val_loss": loss, "val_accuracy": accuracy})
        if report is not None:
            report(f"pass {r + 1}/{cfg.server.rounds}: {steps} steps, train loss "
                   f"{float(result.train_loss[0]):.4f}, validation loss {loss:.4f}, accuracy {accuracy:.4f}")
    layout.load_into(model, params)
    save_weights(model, path)
    return {"path": str(path), "parameters": layout.numel, "steps": steps, "history": history}
