"""Tiny DiLoCo setups: a two-layer MLP on random data, small enough to run in milliseconds."""

import pytest
import torch
from torch import nn

from koinon.compress.base import CODECS
from koinon.params import Layout
from koinon.topology.diloco import IslandsEngine, IslandsSpec
from koinon.topology.diloco.build import build_codec_for


def tiny_engine(spec: IslandsSpec, codec: str = "identity", seed: int = 0,
                workers: list[int] | None = None, device: torch.device | None = None) -> IslandsEngine:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(120, 6, generator=gen)
    y = torch.randint(3, (120,), generator=gen)
    ids = list(range(spec.workers)) if workers is None else workers
    shards = {w: torch.arange(w % 4, 120, 4) for w in ids}
    assert codec in CODECS
    return IslandsEngine(spec, model, Layout.from_module(model), x, y, shards,
                         lambda n: build_codec_for(codec, {}, n), seed, device)


@pytest.fixture
def make_engine():
    return tiny_engine


TINY_SHAKESPEARE = """
seed = 3
[data]
name = "shakespeare"
partition = "natural"
num_clients = 3
seq_len = 16
plays = 6
[model]
name = "char_transformer"
dim = 8
layers = 1
heads = 2
[codec]
name = "int8"
[server]
rounds = 4
eval_every = 2
[topology]
name = "diloco"
[diloco]
workers = 2
inner_steps = 4
batch_size = 4
vectorized = false
eval_batches = 1
"""


@pytest.fixture
def tiny_toml(tmp_path):
    """A character transformer on six plays, small enough for worker-process tests."""
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_SHAKESPEARE)
    return path
