"""Inference with a finished experts run, with owners opted out (`koinon predict`).

`load_experts(RUN)` rebuilds the mixture from the run's `config.toml` (which records every
owner's resolved expert model) and loads `model.safetensors`; the dataset is rebuilt the same
way (seeded), so each owner's domain test split is at hand. Excluding owners drops their
experts with no retraining (`Mixture.exclude`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from koinon.data.datasets import Dataset
from koinon.errors import ConfigError, KoinonError
from koinon.experts.domains import domain_test_sets
from koinon.experts.mixture import Mixture
from koinon.local import evaluate
from koinon.params import Layout


@dataclass
class ExpertsRun:
    """A finished experts run's mixture and data."""

    mixture: Mixture
    layout: Layout
    dataset: Dataset

    def predict(self, x: torch.Tensor, exclude: Iterable[int] = ()) -> torch.Tensor:
        """Log-probabilities of the mixture without the owners in `exclude`."""
        self._exclude(exclude)
        try:
            self.mixture.eval()
            with torch.no_grad():
                return self.mixture(x)
        finally:
            self.mixture.exclude(())

    def _exclude(self, exclude: Iterable[int]) -> None:
        try:
            self.mixture.exclude(exclude)
        except ValueError as exc:
            raise ConfigError(f"--exclude: {exc}") from None

    def metrics(self, exclude: Iterable[int] = ()) -> dict[str, Any]:
        """Accuracy and loss overall and on each owner's domain, without `exclude`."""
        self._exclude(exclude)
        try:
            params = self.layout.flatten(self.mixture)
            ds = self.dataset
            acc, loss = evaluate(self.mixture, self.layout, params, ds.x_test, ds.y_test)
            domains = [evaluate(self.mixture, self.layout, params, x, y)
                       for x, y in domain_test_sets(ds) or []]
        finally:
            self.mixture.exclude(())
        return {"accuracy": acc, "loss": loss, "domain_accuracy": [a for a, _ in domains],
                "domain_loss": [v for _, v in domains]}


def load_experts(run: str | Path) -> ExpertsRun:
    """The mixture of the finished experts run in folder `run`."""
    from safetensors.torch import load_file

    from koinon.config import load_config
    from koinon.topology.experts.experts import build_mixture
    from koinon.topology.experts.options import ExpertsOptions, owners_data, parse

    run = Path(run)
    if not (run / "config.toml").is_file():
        raise ConfigError(f"{run}: no config.toml there, not a koinon run folder")
    cfg = load_config(run / "config.toml")
    if cfg.topology.name != "experts":
        raise ConfigError(f"{run}: topology.name = {cfg.topology.name!r}; predicting with owners opted out "
                          "needs an experts run (topology.name = 'experts')")
    if not (run / "model.safetensors").is_file():
        raise KoinonError(f"{run}: no model.safetensors (an unfinished run? continue it with koinon run --resume {run})")
    options: ExpertsOptions = parse(ExpertsOptions, cfg)
    data = owners_data(cfg, options)
    ds = data.dataset
    per_owner = [dict(t) for t in options.expert_models] or [{} for _ in range(cfg.data.num_clients)]
    mixture = build_mixture(cfg, options, ds.input_shape, ds.num_classes, per_owner)
    layout = Layout.from_module(mixture)
    tensors = load_file(str(run / "model.safetensors"))
    missing = [e.name for e in layout.entries if e.name not in tensors]
    if missing or len(tensors) != len(layout.entries):
        raise KoinonError(f"{run}/model.safetensors does not match the run's mixture (missing {missing[:3]})")
    layout.load_into(mixture, torch.cat([tensors[e.name].reshape(-1).float() for e in layout.entries]))
    return ExpertsRun(mixture, layout, ds)


def opt_out_report(run: str | Path | ExpertsRun, exclude: Iterable[int]) -> dict[str, Any]:
    """What opting `exclude` out costs: metrics with every owner and without them."""
    loaded = run if isinstance(run, ExpertsRun) else load_experts(run)
    exclude = sorted(set(int(o) for o in exclude))
    return {"exclude": exclude, "all": loaded.metrics(()), "without": loaded.metrics(exclude)}
