"""Losses and evaluation of flat parameters, shared by every driver."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from koinon.params import Layout


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample loss (`reduction='none'`); the default loss of classification tasks. Sequence
    models (`[N, T, V]` outputs, e.g. next-character prediction) get each sample's mean over its
    positions; their targets may come as `[N, T]` or flattened."""
    if outputs.dim() > 2:
        flat = F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1), reduction="none")
        return flat.view(outputs.shape[0], -1).mean(dim=1)
    return F.cross_entropy(outputs, targets, reduction="none")


@torch.no_grad()
def evaluate(
    module: nn.Module,
    layout: Layout,
    params: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn=cross_entropy,
    batch_size: int = 4096,
) -> tuple[float, float]:
    """(accuracy, mean loss) of the flat `params` on `(x, y)`, per predicted label: one per sample
    for classification (`[B, C]` outputs), one per position for sequence models (`[B, T, V]`
    outputs against `[B, T]` targets, e.g. next-character prediction)."""
    module.eval()
    views = layout.views(params)
    correct = 0
    total_loss = 0.0
    count = 0
    for start in range(0, len(y), batch_size):
        out = functional_call(module, views, (x[start : start + batch_size],))
        target = y[start : start + batch_size]
        if out.dim() > 2:  # a prediction per position
            out, target = out.reshape(-1, out.shape[-1]), target.reshape(-1)
        total_loss += loss_fn(out, target).sum().item()
        correct += (out.argmax(dim=1) == target).sum().item()
        count += len(target)
    module.train()
    n = max(count, 1)
    return correct / n, total_loss / n
