"""Hugging Face models built from a config (no download): a tiny GPT-2 trains in a federation,
reloads from safetensors bit for bit, and takes LoRA on its Conv1D layers."""

import pytest
import torch

from koinon.config import Config
from koinon.errors import ConfigError
from koinon.experiment.runner import build_federation
from koinon.models import build_model
from koinon.models.pretrained import save_weights
from koinon.params import Layout

pytest.importorskip("transformers")

TINY = {"name": "hf_causal_lm", "config": {"n_layer": 1, "n_embd": 16, "n_head": 2}}


def _cfg(**extra):
    return Config().with_overrides({
        "data.name": "shakespeare", "data.partition": "natural", "data.num_clients": 2, "data.plays": 2,
        "data.seq_len": 16, "data.test_fraction": 0.1, "model.name": "hf_causal_lm", "model.config": TINY["config"],
        "server.clients_per_round": 2, "client.steps": 2, "client.batch_size": 8, "runtime.name": "inprocess", **extra})


def test_tiny_gpt2_from_a_config_trains_and_reloads(tmp_path):
    fed = build_federation(_cfg())
    assert fed.model(torch.randint(10, (3, 16))).shape[:2] == (3, 16)
    before = fed.params.clone()
    fed.run_round(evaluate=False)
    assert not torch.equal(before, fed.params)
    fed.layout.load_into(fed.model, fed.params)
    path = save_weights(fed.model, tmp_path / "gpt2.safetensors")
    again = build_federation(_cfg(**{"model.init": str(path), "seed": 5}))
    assert torch.equal(again.params, fed.params)


def test_lora_on_gpt2_conv1d_layers_sends_only_the_adapters():
    fed = build_federation(_cfg(**{"model.peft": {"name": "lora", "rank": 2}}))
    # c_attn 16 -> 48, c_proj 16 -> 16, c_fc 16 -> 64, mlp c_proj 64 -> 16 (the head is tied, not adapted)
    assert Layout.from_module(fed.model).numel == 2 * ((16 + 48) + (16 + 16) + (16 + 64) + (64 + 16))
    result = fed.run_round(evaluate=False)
    assert result.uplink_bytes == 2 * 4 * fed.layout.numel


def test_bad_hf_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="not a transformers model type"):
        build_model("hf_causal_lm", {"model_type": "nope"}, (16,), 30, 0)
    with pytest.raises(ConfigError, match="not a local transformers model"):
        build_model("hf_causal_lm", {"path": "/nonexistent/dir"}, (16,), 30, 0)
