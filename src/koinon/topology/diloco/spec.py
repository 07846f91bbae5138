"""`IslandsSpec`: every setting of DiLoCo, Streaming DiLoCo, CO2 and the synchronous baseline.

One frozen dataclass, checked once (`check`), shared by the simulation and the worker
processes, so both modes run from the very same numbers. Streaming DiLoCo is DiLoCo with
`fragments > 1` and/or `overlap > 0`; it is not a separate mode because with one fragment and
no overlap its math *is* DiLoCo's.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import torch

from koinon.errors import ConfigError

MODES = ("diloco", "co2", "sync")
INNER_OPTIMIZERS = ("adamw", "sgd")
OUTER_OPTIMIZERS = ("nesterov", "sgd")
FRAGMENT_PATTERNS = ("strided", "sequential")
LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class IslandsSpec:
    """DiLoCo family settings. Links: DiLoCo https://arxiv.org/abs/2311.08105, Streaming DiLoCo
    https://arxiv.org/abs/2501.18512, CO2 https://arxiv.org/abs/2401.16265."""

    mode: str = "diloco"  # diloco (incl. streaming), co2, or sync (all-reduce every step)
    workers: int = 4  # M
    inner_steps: int = 50  # H: inner steps between two syncs of the same parameters
    batch_size: int = 16
    inner_optimizer: str = "adamw"
    inner_lr: float = 3e-3
    # Inner learning-rate schedule over the *global* inner step (the same for every mode, so
    # sync and DiLoCo see the same lr at the same step): linear warm-up for `lr_warmup` steps,
    # then constant, or cosine decay to `lr_min_ratio * inner_lr` at `total_steps`
    # (0 = server.rounds * inner_steps, filled in by the builder).
    lr_schedule: str = "constant"
    lr_warmup: int = 0
    lr_min_ratio: float = 0.1
    total_steps: int = 0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # per-worker gradient norm clip (0 = off)
    outer_optimizer: str = "nesterov"
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    fragments: int = 1  # P (Streaming DiLoCo)
    fragment_pattern: str = "strided"
    overlap: int = 0  # tau: inner steps a fragment's all-reduce is in flight
    alpha: float = 0.0  # merge: local <- alpha * local + (1 - alpha) * global
    co2_penalty: float = 0.0  # gamma of the staleness-gap penalty lambda (0 = no penalty)
    co2_clip: float = 0.0  # max L2 norm of the CO2 outer momentum (0 = no clipping)
    vectorized: bool = True  # simulation: vmap the workers' gradients (false: a loop)
    eval_batches: int = 8  # validation batches of `batch_size * 4` windows per evaluation
    # Where the inner steps run: cpu, cuda, cuda:N or auto. A worker process (`koinon launch`,
    # torchrun) given cuda or auto takes GPU LOCAL_RANK (modulo the GPUs it sees): one per island.
    device: str = "cpu"

    def lr_at(self, step: int) -> float:
        """Inner learning rate of global inner step `step` (0-based)."""
        if step < self.lr_warmup:
            return self.inner_lr * (step + 1) / self.lr_warmup
        if self.lr_schedule == "constant":
            return self.inner_lr
        span = max(self.total_steps - self.lr_warmup, 1)
        progress = min(max(step - self.lr_warmup, 0) / span, 1.0)
        low = self.lr_min_ratio * self.inner_lr
        return low + (self.inner_lr - low) * 0.5 * (1.0 + math.cos(math.pi * progress))

    @property
    def sync_period(self) -> int:
        """Inner steps between two consecutive sync events (of any fragment)."""
        return 1 if self.mode == "sync" else self.inner_steps // self.fragments

    def check(self, section: str = "diloco") -> IslandsSpec:
        """Raise a one-line ConfigError for the first setting that is not allowed."""
        _choice(section, "mode", self.mode, MODES)
        _choice(section, "inner_optimizer", self.inner_optimizer, INNER_OPTIMIZERS)
        _choice(section, "outer_optimizer", self.outer_optimizer, OUTER_OPTIMIZERS)
        _choice(section, "fragment_pattern", self.fragment_pattern, FRAGMENT_PATTERNS)
        _choice(section, "lr_schedule", self.lr_schedule, LR_SCHEDULES)
        if not re.fullmatch(r"cpu|auto|cuda(:\d+)?", str(self.device)):
            raise ConfigError(f"{section}.device = {self.device!r}: allowed: cpu, cuda, cuda:N, auto")
        for key in ("lr_warmup", "total_steps"):
            _at_least(section, key, getattr(self, key), 0)
        if not 0.0 <= self.lr_min_ratio <= 1.0:
            raise ConfigError(f"{section}.lr_min_ratio = {self.lr_min_ratio}: must be in [0, 1]")
        if self.lr_schedule == "cosine" and self.total_steps < 1:
            raise ConfigError(f"{section}.total_steps = {self.total_steps}: lr_schedule = "
                              "'cosine' needs the run's length in inner steps (>= 1)")
        for key in ("workers", "inner_steps", "batch_size", "fragments", "eval_batches"):
            _at_least(section, key, getattr(self, key), 1)
        for key in ("inner_lr", "outer_lr"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{section}.{key} = {getattr(self, key)}: must be > 0")
        for key in ("weight_decay", "grad_clip", "co2_penalty", "co2_clip"):
            if not getattr(self, key) >= 0:
                raise ConfigError(f"{section}.{key} = {getattr(self, key)}: must be >= 0")
        for key in ("beta1", "beta2", "outer_momentum"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"{section}.{key} = {getattr(self, key)}: must be in [0, 1)")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"{section}.alpha = {self.alpha}: must be in [0, 1]")
        if self.inner_steps % self.fragments:
            raise ConfigError(
                f"{section}.fragments = {self.fragments}: must divide "
                f"{section}.inner_steps = {self.inner_steps}"
            )
        if not 0 <= self.overlap < self.sync_period or self.mode == "sync" and self.overlap:
            raise ConfigError(
                f"{section}.overlap = {self.overlap}: must be in [0, inner_steps / fragments = "
                f"{self.sync_period}) (and 0 for mode sync)"
            )
        if self.mode != "diloco" and (self.fragments != 1 or self.overlap):
            raise ConfigError(
                f"{section}.fragments = {self.fragments}, overlap = {self.overlap}: streaming "
                f"(fragments > 1 or overlap > 0) needs {section}.mode = 'diloco', not {self.mode!r}"
            )
        return self


def island_device(spec: str, section: str = "diloco") -> torch.device:
    """The device a `[diloco] device` value gives this process: in a worker process launched
    with a LOCAL_RANK (`koinon launch`, torchrun), `cuda` and `auto` mean that rank's own GPU."""
    from koinon.local.device import resolve_device

    rank = os.environ.get("LOCAL_RANK")
    if spec in ("cuda", "auto") and rank is not None and torch.cuda.is_available():
        return torch.device("cuda", int(rank) % torch.cuda.device_count())
    return resolve_device(spec, f"{section}.device")


def _choice(section: str, key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{section}.{key} = {value!r}: allowed: {', '.join(allowed)}")


def _at_least(section: str, key: str, value: int, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{section}.{key} = {value!r}: must be an integer >= {low}")
