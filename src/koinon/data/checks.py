"""Checks that data and a model fit together, before round 1: one line naming what disagrees.

Without them a mistake surfaces late and far from its cause: x and y of different lengths train
on misaligned pairs, float labels are truncated to classes, and a model whose input or output
size does not fit fails inside a vmapped step with a raw `RuntimeError` or an index error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # datasets.py calls these checks, so only the type is imported here
    from koinon.data.datasets import Dataset


def check_labels(name: str, y: torch.Tensor) -> torch.Tensor:
    """`y` as class indices (int64); float labels are accepted only when every value is whole."""
    y = torch.as_tensor(y)
    if y.is_floating_point() or y.is_complex():
        if y.is_complex() or not bool(torch.all(y == y.round())):
            raise ValueError(f"{name} has dtype {y.dtype} with fractional values; labels must be class "
                             "indices 0..C-1 (regression targets need a custom Dataset and loss_fn)")
    elif y.dtype == torch.bool:
        raise ValueError(f"{name} has dtype torch.bool; labels must be class indices 0..C-1")
    return y.to(torch.long)


def check_dataset(ds: Dataset) -> None:
    """Lengths, label dtypes and ranges, and input shapes of train and test agree."""
    for split in ("train", "test"):
        x, y = getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}")
        if len(x) != len(y):
            raise ValueError(f"x_{split} has {len(x)} samples but y_{split} has {len(y)}")
        if y.is_floating_point() or y.dtype == torch.bool:
            check_labels(f"y_{split}", y)
            raise ValueError(f"y_{split} has dtype {y.dtype}; labels must be integer class indices (y.long())")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= ds.num_classes):
            raise ValueError(f"y_{split} holds labels in [{int(y.min())}, {int(y.max())}] but the dataset "
                             f"has {ds.num_classes} classes (labels must be 0..{ds.num_classes - 1})")
    if len(ds.x_train) == 0:
        raise ValueError("x_train is empty")
    if len(ds.x_test) and ds.x_test.shape[1:] != ds.x_train.shape[1:]:
        raise ValueError(f"x_test samples have shape {list(ds.x_test.shape[1:])} but x_train samples "
                         f"{list(ds.x_train.shape[1:])}")


def check_fits(ds: Dataset, like: Dataset) -> None:
    """`ds` can stand in for `like`, the dataset a model was built for (a deployment client's own
    data against the server's config): `ds` is consistent, its samples hold as many values as
    `like`'s (the layout may differ where the model flattens; `check_model` probes that) and its
    labels are classes `like` has."""
    check_dataset(ds)
    if ds.x_train[0].numel() != like.x_train[0].numel():
        raise ValueError(f"samples have shape {list(ds.x_train.shape[1:])} but the model is built for "
                         f"{like.name!r} samples of shape {list(like.x_train.shape[1:])}")
    top = int(ds.y_train.max())
    if top >= like.num_classes:
        raise ValueError(f"labels go up to {top} but the model is built for {like.name!r} with "
                         f"{like.num_classes} classes (labels must be 0..{like.num_classes - 1})")


def check_model(model: nn.Module, ds: Dataset, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                classification: bool = True) -> None:
    """A forward pass and the loss on two training samples succeed, and (for classification
    with the default loss) the model has an output for every class. The probe runs in eval
    mode under a forked RNG, so it changes neither the model nor any random stream."""
    x, y = ds.x_train[:2], ds.y_train[:2]
    was_training = model.training
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model.eval()
            try:
                out = model(x)
            except Exception as exc:  # noqa: BLE001 - any failure: the model does not take this input
                raise ValueError(f"the model cannot take the data's inputs (samples of shape "
                                 f"{list(x.shape[1:])}, dtype {x.dtype}): {_first_line(exc)}") from None
            if not isinstance(out, torch.Tensor):
                raise ValueError(f"the model returns {type(out).__name__}, not a tensor of outputs")
            if classification and out.dim() >= 2 and out.shape[-1] < ds.num_classes:
                raise ValueError(f"the model has {out.shape[-1]} outputs per sample but the data has "
                                 f"{ds.num_classes} classes")
            try:
                loss = loss_fn(out, y)
            except Exception as exc:  # noqa: BLE001
                raise ValueError(f"the loss cannot compare the model's outputs (shape {list(out.shape)}) "
                                 f"with the labels (shape {list(y.shape)}): {_first_line(exc)}") from None
            if loss.shape[:1] != y.shape[:1]:
                raise ValueError(f"loss_fn must return one loss per sample ({len(y)}), got shape {list(loss.shape)}")
    finally:
        model.train(was_training)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
