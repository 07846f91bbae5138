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
from koinon.data import DATASETS, Dataset, partition_dataset
from koinon.errors import ConfigError, KoinonError
from koinon.islands.spec import IslandsSpec
from koinon.models import build_model
from koinon.params import Entry, Layout


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


def spec_from_options(options: dict[str, Any]) -> IslandsSpec:
    """`[diloco]` keys -> a checked `IslandsSpec` (unknown key or wrong type: ConfigError)."""
    defaults = IslandsSpec()
    fields = {f.name for f in dataclasses.fields(IslandsSpec)}
    clean: dict[str, Any] = {}
    for key, value in options.items():
        if key not in fields:
            raise ConfigError(f"unknown key diloco.{key}; allowed: {', '.join(sorted(fields))}")
        default = getattr(defaults, key)
        if isinstance(default, bool) or isinstance(value, bool):
            ok = isinstance(default, bool) and isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float))
            value = float(value) if ok else value
        else:
            ok = isinstance(value, type(default))
        if not ok:
            raise ConfigError(f"diloco.{key} = {value!r}: expected {type(default).__name__}")
        clean[key] = value
    return IslandsSpec(**clean).check()


def build_parts(cfg: Config) -> IslandsParts:
    """Check and build everything a DiLoCo run needs; writes resolved [diloco] keys into cfg."""
    options = dict(cfg.diloco.options)
    if options.get("lr_schedule") == "cosine" and not options.get("total_steps"):
        # one round of `koinon run` is inner_steps inner steps
        options["total_steps"] = cfg.server.rounds * int(
            options.get("inner_steps", IslandsSpec.inner_steps))
    spec = spec_from_options(options)
    cfg.diloco.options = dataclasses.asdict(spec)
    d = cfg.data
    DATASETS.get(d.name, key="data.name")
    try:
        dataset = DATASETS.build(d.name, d.options, "data", seed=cfg.seed,
                                 test_fraction=d.test_fraction, num_clients=d.num_clients)
        fed = partition_dataset(dataset, d.partition, d.num_clients, cfg.seed,
                                {"alpha": d.alpha, "classes_per_client": d.classes_per_client,
                                 "power": d.power})
    except KoinonError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"data ({d.name!r}, partition {d.partition!r}): {exc}") from None
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
