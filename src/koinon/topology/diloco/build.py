"""From a `Config` to the parts of a DiLoCo run: spec, data shards, model, codec factory.

The simulation, every worker process and the benchmark build through here, so they start from
the same seeded model and the same play-split data.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from koinon.compress.base import CODECS, Codec
from koinon.config import Config
from koinon.data import DATASETS, Dataset, partition_dataset, partition_options
from koinon.errors import ConfigError
from koinon.models import build_model
from koinon.params import Entry, Layout
from koinon.registry import Registry
from koinon.topology.diloco.spec import IslandsSpec


@dataclass
class IslandsParts:
    spec: IslandsSpec
    dataset: Dataset
    client_shards: list[torch.Tensor]  # the data partition: worker w trains on w mod len
    model: nn.Module
    layout: Layout
    codec_name: str
    codec_options: dict

    def shard(self, worker_id: int) -> torch.Tensor:
        return self.client_shards[worker_id % len(self.client_shards)]

    def codec_for(self, numel: int) -> Codec:
        return build_codec_for(self.codec_name, self.codec_options, numel)


def build_codec_for(name: str, options: dict, numel: int) -> Codec:
    """The codec for a flat fragment of `numel` elements (one unnamed entry)."""
    layout = Layout((Entry("fragment", (numel,), torch.float32, 0, True),))
    return CODECS.build(name, options, "codec", layout=layout)


SPECS: Registry[IslandsSpec] = Registry("DiLoCo setting")
"""One entry: the `[diloco]` section is checked as a registry component's options are."""
SPECS.register("diloco")(IslandsSpec)


def spec_from_options(options: dict[str, Any], rounds: int = 0) -> IslandsSpec:
    """`[diloco]` keys -> a checked `IslandsSpec` (unknown key or wrong type: ConfigError).
    `rounds`: the run's rounds, for a cosine schedule without `total_steps` (one round of
    `koinon run` is `inner_steps` inner steps)."""
    spec = SPECS.build("diloco", options, "diloco")
    # TOML writes 1 for 1.0: store floats as floats, so the resolved config reads the same.
    resolved: dict[str, Any] = {f.name: float(getattr(spec, f.name))
                                for f in dataclasses.fields(spec) if isinstance(f.default, float)}
    if spec.lr_schedule == "cosine" and not spec.total_steps:
        resolved["total_steps"] = rounds * spec.inner_steps
    return dataclasses.replace(spec, **resolved).check()


def build_parts(cfg: Config) -> IslandsParts:
    """Check and build everything a DiLoCo run needs; writes resolved [diloco] keys into cfg."""
    spec = spec_from_options(cfg.diloco.options, cfg.server.rounds)
    cfg.diloco.options = dataclasses.asdict(spec)
    d = cfg.data
    dataset = DATASETS.build(d.name, d.options, "data", seed=cfg.seed,
                             test_fraction=d.test_fraction, num_clients=d.num_clients)
    try:
        fed = partition_dataset(dataset, d.partition, d.num_clients, cfg.seed, partition_options(
            d.partition, {"alpha": d.alpha, "classes_per_client": d.classes_per_client, "power": d.power}))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"data.partition = {d.partition!r}: {exc}") from None
    model = build_model(cfg.model.name, cfg.model.options, dataset.input_shape,
                        dataset.num_classes, cfg.seed)
    layout = Layout.from_module(model)
    if layout.has_buffers:
        raise ConfigError(f"model.name = {cfg.model.name!r}: DiLoCo needs a model without "
                          "float buffers (e.g. BatchNorm statistics)")
    parts = IslandsParts(spec, dataset, fed.client_indices, model, layout, cfg.codec.name,
                         dict(cfg.codec.options))
    parts.codec_for(layout.numel)  # unknown codec or bad option: fail now, not mid-run
    return parts
