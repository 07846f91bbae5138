"""A small character-level transformer language model (GPT-style, pre-LayerNorm, causal).

Attention is written with plain tensor operations rather than `nn.MultiheadAttention`, whose
fused fast paths do not run under `torch.func.vmap`; the DiLoCo simulation vmaps this model over
a stack of worker parameter copies. Input: `[batch, seq_len]` character codes; output:
`[batch, seq_len, vocab]` logits for the next character at every position.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from koinon.models import MODELS


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 4 * dim)
        self.out = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        shape = (b, t, self.heads, d // self.heads)
        q, k, v = (z.reshape(shape).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.heads)
        att = att.masked_fill(mask[:t, :t], float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class CharTransformer(nn.Module):
    """Token + position embeddings, `layers` transformer blocks, LayerNorm, linear head."""

    def __init__(self, vocab: int, seq_len: int, dim: int, layers: int, heads: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(seq_len, dim))
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)
        # The mask is a constant, not state: recomputed, never averaged or checkpointed.
        self.register_buffer("mask", torch.ones(seq_len, seq_len).triu(1).bool(), persistent=False)
        nn.init.normal_(self.pos, std=0.02)
        nn.init.normal_(self.tok.weight, std=0.02)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        x = self.tok(codes) + self.pos[: codes.shape[-1]]
        for block in self.blocks:
            x = block(x, self.mask)
        return self.head(self.ln(x))


@MODELS.register("char_transformer")
def char_transformer(
    input_shape: tuple[int, ...], num_classes: int, dim: int = 64, layers: int = 2, heads: int = 4
) -> nn.Module:
    """Character-level causal transformer LM (input `[seq_len]` codes, `num_classes` = vocabulary)."""
    if len(input_shape) != 1:
        raise ValueError(f"model char_transformer needs [seq_len] inputs, got {list(input_shape)}")
    for key, value in (("dim", dim), ("layers", layers), ("heads", heads)):
        if value < 1:
            raise ValueError(f"model.{key} = {value}: must be >= 1")
    if dim % heads:
        raise ValueError(f"model.dim = {dim} must be a multiple of model.heads = {heads}")
    return CharTransformer(num_classes, input_shape[0], dim, layers, heads)
