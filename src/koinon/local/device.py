"""Where local training runs: `runtime.device` and `runtime.precision`.

`cpu` (the default), `cuda`, `cuda:N`, or `auto` (the first GPU when torch sees one, else the
CPU). On a GPU the trainer keeps the training data, the `[K, P]` stacks, the optimizer state and
every per-step tensor on the device; a cohort crosses to the host once per chunk (its updates,
for the codecs and the server), never per client or per step. `precision = "bf16"` runs the
forward and backward passes under autocast with float32 master weights (the parameters, their
gradients and the optimizer state stay float32).
"""

from __future__ import annotations

import re

import torch

from koinon.errors import ConfigError

DEVICES = ("cpu", "cuda", "cuda:N", "auto")
PRECISIONS = ("fp32", "bf16")


def resolve_device(spec: str | torch.device, key: str = "runtime.device") -> torch.device:
    """The `torch.device` a `runtime.device` value names, or a one-line `ConfigError`."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    if not isinstance(spec, str) or not re.fullmatch(r"cpu|auto|cuda(:\d+)?", spec):
        raise ConfigError(f"{key} = {spec!r}: allowed: {', '.join(DEVICES)}")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"{key} = {spec!r}: torch sees no CUDA device on this machine "
                          "(use cpu, or auto to take a GPU only where there is one)")
    device = torch.device(spec)
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ConfigError(f"{key} = {spec!r}: this machine has {count} CUDA device(s) (cuda:0 .. cuda:{count - 1})")
    return device


def check_precision(precision: str, key: str = "runtime.precision") -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"{key} = {precision!r}: allowed: {', '.join(PRECISIONS)}")
    return precision
