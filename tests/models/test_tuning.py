"""Parameter-efficient fine-tuning: only the trainable part is trained, sent and counted; the
frozen weights never change; LoRA and adapters start as the pretrained model."""

import pytest
import torch

from koinon.config import Config
from koinon.errors import ConfigError
from koinon.experiment.runner import build_federation
from koinon.models import build_model
from koinon.models.pretrained import save_weights
from koinon.params import Layout

# Digits MLP 64-16-16-10: linear layers 1 and 3 are adapted (5 is the head).
SIZES = {"bias": 16 + 16 + 10, "lora": 2 * (64 + 16) + 2 * (16 + 16), "adapter": (16 * 4 + 4 + 4 * 16 + 16) * 2}


def _config(tmp_path, peft, **extra):
    path = tmp_path / "base.safetensors"
    if not path.exists():
        save_weights(build_model("mlp", {"hidden": [16, 16]}, (64,), 10, 5), path)
    return Config().with_overrides({
        "model.hidden": [16, 16], "model.init": str(path), "model.peft": peft, "data.num_clients": 6,
        "server.clients_per_round": 3, "client.steps": 3, **extra})


def _constants(module):
    """The frozen weights: tensors held by modules that are neither parameters nor buffers."""
    return {f"{n}.{k}": v.clone() for n, m in module.named_modules() for k, v in vars(m).items()
            if isinstance(v, torch.Tensor) and not isinstance(v, torch.nn.Parameter)}


@pytest.mark.parametrize("peft", [{"name": "bias"}, {"name": "lora", "rank": 2}, {"name": "adapter", "bottleneck": 4}])
@pytest.mark.parametrize("codec, width", [("identity", 4), ("fp16", 2)])
def test_only_the_trainable_part_is_sent_and_the_rest_never_changes(tmp_path, peft, codec, width):
    fed = build_federation(_config(tmp_path, peft, **{"codec.name": codec}))
    count = SIZES[peft["name"]]
    assert fed.layout.numel == fed.layout.num_trainable == count
    frozen = _constants(fed.model)
    assert frozen  # the base weights are constants of the module now
    start = fed.params.clone()
    result = fed.run_round()
    assert result.uplink_bytes == 3 * count * width  # every client sends exactly its trainable part
    assert not torch.equal(fed.params, start)  # and it trained
    after = _constants(fed.model)
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)


@pytest.mark.parametrize("peft", [{"name": "lora", "rank": 2}, {"name": "adapter", "bottleneck": 4}])
def test_adapted_model_starts_as_the_pretrained_one(tmp_path, peft):
    fed = build_federation(_config(tmp_path, peft))
    base = build_model("mlp", {"hidden": [16, 16], "init": str(tmp_path / "base.safetensors")}, (64,), 10, 0)
    x = fed.data.dataset.x_test[:8]
    assert torch.allclose(fed.model(x), base(x), atol=1e-6)


def test_inprocess_and_vectorized_agree_with_lora(tmp_path):
    peft = {"name": "lora", "rank": 2}
    a = build_federation(_config(tmp_path, peft, **{"runtime.name": "inprocess"}))
    b = build_federation(_config(tmp_path, peft, **{"runtime.name": "vectorized"}))
    for _ in range(2):
        a.run_round(evaluate=False)
        b.run_round(evaluate=False)
    assert torch.allclose(a.params, b.params, atol=1e-6)


def test_lora_count_follows_rank_and_targets(tmp_path):
    fed = build_federation(_config(tmp_path, {"name": "lora", "rank": 3, "targets": ["1"], "train": ["5"]}))
    assert fed.layout.numel == 3 * (64 + 16) + (10 * 16 + 10)  # LoRA on layer 1, the head in full


def test_prompt_tuning_trains_only_the_prompt():
    model = build_model("char_transformer", {"dim": 16, "layers": 1, "heads": 2, "peft": {"name": "prompt", "tokens": 3}},
                        (8,), 20, 0)
    layout = Layout.from_module(model)
    assert layout.names == ["prompt"] and layout.numel == 3 * 16
    codes = torch.randint(20, (2, 8))
    assert model(codes).shape == (2, 8, 20)


@pytest.mark.parametrize("peft, message", [
    ("nope", "unknown peft method; allowed: adapter, bias, lora, none, prompt"),
    ({"name": "lora", "rnk": 2}, "model.peft.rnk: not an option"),
    ({"name": "lora", "targets": ["9"]}, "not nn.Linear layers of the model"),
    ({"name": "prompt"}, "needs a model with token embeddings"),
    (3, "expected a method name"),
])
def test_bad_peft_settings_are_one_line_errors(peft, message):
    with pytest.raises(ConfigError, match=message):
        build_model("mlp", {"hidden": [16, 16], "peft": peft}, (64,), 10, 0)
