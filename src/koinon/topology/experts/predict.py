"""Inference with a finished experts run, with owners opted out (`koinon predict`).

`load_experts(RUN)` rebuilds the mixture from the run's `config.toml` (which records every
owner's resolved expert model) and loads `model.safetensors`; the dataset is rebuilt the same
way (seeded), so each owner's domain test split is at hand. Excluding owners drops their
experts with no retraining (`Mixture.exclude`). `ExpertsRun.sade` sets SADE's test-time
weights for a batch of unlabeled inputs from one domain (`koinon.experts.sade`);
`ExpertsRun.student` distills the mixture into one small model for such a batch (Meta-DMoE's
test-time distillation).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from koinon.clients import LocalTraining
from koinon.data.datasets import Dataset
from koinon.errors import ConfigError, KoinonError
from koinon.experts.domains import domain_test_sets
from koinon.experts.mixture import Mixture
from koinon.experts.sade import sade_weights
from koinon.local import evaluate
from koinon.params import Layout
from koinon.seeding import mix_seed


@dataclass
class ExpertsRun:
    """A finished experts run's mixture and data."""

    mixture: Mixture
    layout: Layout
    dataset: Dataset

    def predict(self, x: torch.Tensor, exclude: Iterable[int] = (), weights: torch.Tensor | None = None) -> torch.Tensor:
        """Log-probabilities of the mixture without the owners in `exclude`; with `weights`
        (`[slots]`, e.g. from `sade`) instead of the router's per-input weights."""
        self._exclude(exclude)
        self.mixture.fixed = weights
        try:
            self.mixture.eval()
            with torch.no_grad():
                return self.mixture(x)
        finally:
            self.mixture.exclude(())
            self.mixture.fixed = None

    def sade(self, x: torch.Tensor, exclude: Iterable[int] = (), noise: float = 0.5, steps: int = 100,
             lr: float = 10.0, seed: int = 0) -> torch.Tensor:
        """SADE's test-time weights `[slots]` for unlabeled inputs `x` from one target domain:
        the aggregation most stable between two views with seeded Gaussian noise (`noise` times
        the inputs' standard deviation)."""
        if torch.is_floating_point(x) is False:
            raise ConfigError("sade: needs real-valued inputs to perturb (not token codes)")
        self._exclude(exclude)
        m = self.mixture
        try:
            gen = torch.Generator().manual_seed(mix_seed(seed, 0x5ADE))
            views = [x + noise * x.std() * torch.randn(x.shape, generator=gen) for _ in range(2)]
            with torch.no_grad():
                probs = [self._slot_probs(v) for v in views]
            return sade_weights(probs[0], probs[1], m.included(), steps, lr)
        finally:
            m.exclude(())

    def student(self, x: torch.Tensor, exclude: Iterable[int] = (), epochs: int = 20, lr: float = 0.05,
                seed: int = 0) -> tuple[nn.Module, Layout, torch.Tensor]:
        """Meta-DMoE's test-time step: one small student (a copy of the public model) distilled
        from the mixture on unlabeled inputs `x` of one target domain (forward KL to the
        mixture's predictions). Returns the student module, its layout and its parameters.
        Meta-DMoE's transformer aggregator and meta-training are not reproduced: the mixture's
        router aggregates, and the student starts from the public model."""
        from koinon.experts.distill import kl_loss
        from koinon.topology.experts.common import distill_into

        teacher = self.predict(x, exclude)
        module = copy.deepcopy(self.mixture.public)
        for p in module.parameters():
            p.requires_grad_(True)
        layout = Layout.from_module(module)
        local = LocalTraining(epochs=epochs, batch_size=16, lr=lr, momentum=0.9)
        params, _ = distill_into(module, layout, layout.flatten(module), x, teacher,
                                 lambda out, target: kl_loss(out, target), local, mix_seed(seed, 0xDD), 0)
        return module, layout, params

    def _slot_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Every slot's probabilities `[slots, N, C]` (zeros for excluded owners, never run)."""
        m = self.mixture
        m.eval()
        out = []
        if m.public_expert:
            out.append(m.public(x).softmax(dim=-1))
        for owner, expert in enumerate(m.experts):
            out.append(torch.zeros_like(out[0]) if owner in m.excluded else expert(x).softmax(dim=-1))
        return torch.stack(out)

    def _exclude(self, exclude: Iterable[int]) -> None:
        try:
            self.mixture.exclude(exclude)
        except ValueError as exc:
            raise ConfigError(f"--exclude: {exc}") from None

    def student_metrics(self, exclude: Iterable[int] = ()) -> dict[str, Any]:
        """Per domain, a student distilled from the mixture on the domain's unlabeled test
        inputs (`student`) and evaluated on them; overall: the sample-weighted means."""
        domains = domain_test_sets(self.dataset) or []
        if not domains:
            raise ConfigError("student: needs per-domain test splits (topology.domains or a dataset with them)")
        per = []
        for x, y in domains:
            module, layout, params = self.student(x, exclude)
            per.append(evaluate(module, layout, params, x, y))
        sizes = [len(y) for _, y in domains]
        return {"accuracy": sum(a * n for (a, _), n in zip(per, sizes, strict=True)) / sum(sizes),
                "loss": sum(v * n for (_, v), n in zip(per, sizes, strict=True)) / sum(sizes),
                "domain_accuracy": [a for a, _ in per], "domain_loss": [v for _, v in per]}

    def metrics(self, exclude: Iterable[int] = (), sade: bool = False) -> dict[str, Any]:
        """Accuracy and loss overall and on each owner's domain, without `exclude`. With `sade`,
        each domain's test inputs (their labels unused) first set SADE's weights for that
        domain, and the overall figures are the domains' sample-weighted means."""
        exclude = list(exclude)
        ds = self.dataset
        domains = domain_test_sets(ds) or []
        if sade and not domains:
            raise ConfigError("sade: needs per-domain test splits (topology.domains or a dataset with them)")
        weights = [self.sade(x, exclude) for x, _ in domains] if sade else [None] * len(domains)
        self._exclude(exclude)
        try:
            params = self.layout.flatten(self.mixture)
            per = []
            for (x, y), w in zip(domains, weights, strict=True):
                self.mixture.fixed = w
                per.append(evaluate(self.mixture, self.layout, params, x, y))
            self.mixture.fixed = None
            if sade:
                sizes = [len(y) for _, y in domains]
                acc = sum(a * n for (a, _), n in zip(per, sizes, strict=True)) / sum(sizes)
                loss = sum(v * n for (_, v), n in zip(per, sizes, strict=True)) / sum(sizes)
            else:
                acc, loss = evaluate(self.mixture, self.layout, params, ds.x_test, ds.y_test)
        finally:
            self.mixture.exclude(())
            self.mixture.fixed = None
        return {"accuracy": acc, "loss": loss, "domain_accuracy": [a for a, _ in per],
                "domain_loss": [v for _, v in per]}


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


def opt_out_report(run: str | Path | ExpertsRun, exclude: Iterable[int], sade: bool = False) -> dict[str, Any]:
    """What opting `exclude` out costs: metrics with every owner and without them (with
    `sade`, SADE's test-time weights per domain instead of the router)."""
    loaded = run if isinstance(run, ExpertsRun) else load_experts(run)
    exclude = sorted(set(int(o) for o in exclude))
    return {"exclude": exclude, "all": loaded.metrics((), sade), "without": loaded.metrics(exclude, sade)}
