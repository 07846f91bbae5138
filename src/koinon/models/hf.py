"""Hugging Face `transformers` causal language models as koinon models (the `finetune` extra).

`hf_causal_lm` builds a model from a config (`model_type` plus `config` keys, e.g. a tiny GPT-2:
no download, seeded like every koinon model) or loads one from a local directory (`path`, never
the network). Its vocabulary is the data's classes (character codes for Shakespeare) and its
context the data's sequence length; every dropout probability is set to 0, because the
vectorized runtime cannot draw per-client dropout masks and koinon's runs are deterministic.
The wrapper returns the logits tensor (`[batch, seq_len, vocab]`), the shape koinon's sequence
loss and evaluation take, so `model.init`, `model.peft` (LoRA on GPT-2's `Conv1D` layers too)
and every topology work as with the built-in char transformer.
"""

from __future__ import annotations

import torch
from torch import nn

from koinon.errors import ConfigError
from koinon.models import MODELS

_MISSING = "model hf_causal_lm needs Hugging Face transformers: pip install 'koinon[finetune]'"


class CausalLM(nn.Module):
    """A `transformers` causal LM that maps `[batch, seq_len]` codes to logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=codes, use_cache=False).logits


def _no_dropout(config: object) -> None:
    for key, value in vars(config).items():
        if isinstance(value, float) and (key.endswith("dropout") or key.endswith("pdrop")):
            setattr(config, key, 0.0)


@MODELS.register("hf_causal_lm")
def hf_causal_lm(input_shape: tuple[int, ...], num_classes: int, model_type: str = "gpt2",
                 config: dict = {}, path: str = "") -> nn.Module:  # noqa: B006
    """A Hugging Face causal LM built from a config (`model_type`, `config`) or a local `path`."""
    if len(input_shape) != 1:
        raise ValueError(f"model hf_causal_lm needs [seq_len] inputs, got {list(input_shape)}")
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        raise ConfigError(_MISSING) from None
    if path:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ValueError(f"path = {path!r}: not a local transformers model ({str(exc).splitlines()[0]})") from None
        vocab = int(getattr(model.get_input_embeddings(), "num_embeddings", num_classes))
        if vocab < num_classes:
            raise ValueError(f"path = {path!r}: the model's vocabulary has {vocab} entries, the data {num_classes}")
        _no_dropout(model.config)
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        return CausalLM(model)
    try:
        defaults = AutoConfig.for_model(model_type)
    except ValueError:
        raise ValueError(f"model_type = {model_type!r} is not a transformers model type") from None
    seq = {k: input_shape[0] for k in ("n_positions", "max_position_embeddings") if hasattr(defaults, k)}
    settings = {"vocab_size": num_classes, **seq, "bos_token_id": None, "eos_token_id": None, **config}
    cfg = AutoConfig.for_model(model_type, **settings)
    _no_dropout(cfg)
    return CausalLM(AutoModelForCausalLM.from_config(cfg))
