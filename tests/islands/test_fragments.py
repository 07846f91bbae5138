import pytest
import torch

from koinon.errors import ConfigError
from koinon.models import build_model
from koinon.params import Layout
from koinon.topology.diloco.fragments import fragment_at, fragment_indices


@pytest.fixture(scope="module")
def layout():
    model = build_model("char_transformer", {"dim": 8, "layers": 4, "heads": 2}, (16,), 30, 0)
    return Layout.from_module(model)


@pytest.mark.parametrize("pattern", ["strided", "sequential"])
@pytest.mark.parametrize("num_fragments", [1, 2, 3, 4, 8])
def test_a_cycle_of_fragments_covers_every_parameter_exactly_once(layout, pattern, num_fragments):
    frags = fragment_indices(layout, num_fragments, pattern)
    counts = torch.zeros(layout.numel, dtype=torch.long)
    for p in range(num_fragments):  # one cycle = P consecutive sync events
        counts[frags[fragment_at(p, num_fragments)]] += 1
    assert (counts == 1).all()
    assert all(len(f) > 0 for f in frags)


def test_strided_spreads_blocks_and_sequential_keeps_them_together(layout):
    names = {e.name: e for e in layout.entries}

    def owner(frags, name):
        off = names[name].offset
        return next(p for p, f in enumerate(frags) if off in set(f.tolist()))

    strided = fragment_indices(layout, 2, "strided")
    sequential = fragment_indices(layout, 2, "sequential")
    block = "blocks.{}.qkv.weight"
    assert owner(strided, block.format(0)) != owner(strided, block.format(1))
    assert owner(sequential, block.format(0)) == owner(sequential, block.format(1))


def test_too_many_fragments_is_a_config_error(layout):
    with pytest.raises(ConfigError, match="diloco.fragments = 20"):
        fragment_indices(layout, 20, "strided")
