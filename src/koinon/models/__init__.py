"""Small reference models. Factories take the data's `input_shape` and `num_classes`.

None of them has BatchNorm running statistics, so all of them run on the vectorized runtime;
bring any `nn.Module` of your own through the Python API.
"""

from __future__ import annotations

from math import prod

import torch
from torch import nn

from koinon.errors import ConfigError
from koinon.registry import Registry

MODELS: Registry[nn.Module] = Registry("model")
"""Factories are called as `factory(input_shape=..., num_classes=..., **options)`."""


@MODELS.register("mlp")
def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: list = [64]) -> nn.Module:  # noqa: B006
    """Multi-layer perceptron with ReLU (default one hidden layer of 64: 64-64-10 on digits)."""
    return _mlp(input_shape, num_classes, hidden, "none")


@MODELS.register("mlp_norm")
def mlp_norm(input_shape: tuple[int, ...], num_classes: int, hidden: list = [64], norm: str = "layer") -> nn.Module:  # noqa: B006
    """The MLP with a normalization layer after each hidden Linear (e.g. for FedBN): `"layer"`
    (LayerNorm) or `"batch"` (BatchNorm1d normalizing with the statistics of the batch at
    hand, also in evaluation: no running statistics, so the model stays vectorizable)."""
    if norm not in ("layer", "batch"):
        raise ValueError(f"model.norm must be 'layer' or 'batch', got {norm!r}")
    return _mlp(input_shape, num_classes, hidden, norm)


def _mlp(input_shape: tuple[int, ...], num_classes: int, hidden: list, norm: str) -> nn.Module:
    if not all(isinstance(h, int) and h > 0 for h in hidden):
        raise ValueError(f"model.hidden must be a list of positive integers, got {hidden}")
    dims = [prod(input_shape), *hidden]
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(dims[:-1], dims[1:]):
        layers.append(nn.Linear(a, b))
        if norm == "layer":
            layers.append(nn.LayerNorm(b))
        elif norm == "batch":
            layers.append(nn.BatchNorm1d(b, track_running_stats=False))
        layers.append(nn.ReLU())
    layers.append(nn.Linear(dims[-1], num_classes))
    return nn.Sequential(*layers)


@MODELS.register("logreg")
def logreg(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Multinomial logistic regression (the model of the Synthetic benchmark)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(prod(input_shape), num_classes))


@MODELS.register("cnn")
def cnn(input_shape: tuple[int, ...], num_classes: int, channels: int = 16) -> nn.Module:
    """Small 2-D CNN for image inputs [C, H, W]: two 3x3 conv layers, max-pool, linear head."""
    if len(input_shape) != 3:
        raise ValueError(f"model cnn needs [C, H, W] inputs, the data has shape {list(input_shape)}")
    c, h, w = input_shape
    return nn.Sequential(
        nn.Conv2d(c, channels, 3, padding=1), nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(2 * channels * (h // 2) * (w // 2), num_classes),
    )


@MODELS.register("cnn1d")
def cnn1d(input_shape: tuple[int, ...], num_classes: int, channels: int = 32) -> nn.Module:
    """1-D CNN for sequences [C, L] such as MNIST-1D: three conv layers, linear head."""
    if len(input_shape) != 2:
        raise ValueError(f"model cnn1d needs [C, L] inputs, the data has shape {list(input_shape)}")
    c, length = input_shape
    out_len = length
    layers: list[nn.Module] = []
    in_ch = c
    for _ in range(3):
        layers += [nn.Conv1d(in_ch, channels, 3, stride=2, padding=1), nn.ReLU()]
        in_ch = channels
        out_len = (out_len + 1) // 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * out_len, num_classes))


def build_model(
    name: str, options: dict, input_shape: tuple[int, ...], num_classes: int, seed: int
) -> nn.Module:
    """Build a registered model with seeded initial weights; `options` may also hold `init`
    (a safetensors file to start from, `koinon.models.pretrained`) and `peft` (a
    parameter-efficient fine-tuning method, `koinon.models.tuning`)."""
    options = dict(options)
    init = options.pop("init", "")
    peft = options.pop("peft", None)
    with torch.random.fork_rng(devices=[]):  # seed the initialization, leave the global RNG alone
        torch.manual_seed(seed)
        model = MODELS.build(
            name, options, "model", input_shape=input_shape, num_classes=num_classes
        )
    if init:
        if not isinstance(init, str):
            raise ConfigError(f"model.init = {init!r}: expected the path of a .safetensors file")
        from koinon.models.pretrained import load_weights

        load_weights(model, init)
    if peft is not None and peft != "none":
        from koinon.models.tuning import apply_peft

        model = apply_peft(model, peft, seed)
    return model


from koinon.models import charlm as _charlm  # noqa: E402, F401  (registers char_transformer)
from koinon.models import hf as _hf  # noqa: E402, F401  (registers hf_causal_lm; imports transformers when built)
