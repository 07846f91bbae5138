"""`spsa`: one byte per projected-gradient scalar, for "Just One Byte (per gradient)".

Zelikman et al. 2023, https://arxiv.org/abs/2306.10765. The client algorithm (elsewhere) draws
z ~ N(0, I) from a seed shared by everyone and computes g = [L(theta + eps z) - L(theta - eps z)]
/ (2 eps) per sample; only those scalars travel, and every peer regenerates the z's. This codec
is the wire half: unlike the others it encodes a vector of `num_scalars` scalars, not a
layout-sized update. Each scalar is an int8 level (-127..127) rounded stochastically with the
encode rng, so decode is unbiased within the clipping range.
"""

from __future__ import annotations

import numpy as np
import torch

from koinon.compress.base import CODECS, CodecState
from koinon.compress.wire import Reader, check_input, check_size, finite
from koinon.params import Layout


@CODECS.register("spsa")
class SPSA:
    """One byte per zeroth-order (SPSA) scalar; optional per-payload float32 scale.

    Options: `num_scalars` (length of the encoded vector: samples per client per round),
    `scale` (0 = adaptive, a float32 absmax scale precedes the bytes; > 0 = fixed range
    [-scale, scale], values beyond it are clipped, and the payload is exactly one byte per scalar).
    """

    name = "spsa"

    def __init__(self, layout: Layout, num_scalars: int = 1, scale: float = 0.0) -> None:
        if num_scalars < 1 or scale < 0:
            raise ValueError("num_scalars must be >= 1 and scale >= 0")
        self.n, self.scale = num_scalars, scale

    def init_state(self) -> CodecState:
        return {}

    def encode(
        self, x: torch.Tensor, state: CodecState, rng: torch.Generator
    ) -> tuple[bytes, CodecState]:
        x = check_input(self.name, x, self.n)
        scale = self.scale or float(x.abs().max()) or 1.0
        step = scale / 127
        levels = torch.floor(x.clamp(-scale, scale) / step + torch.rand(self.n, generator=rng))
        codes = levels.clamp_(-127, 127).to(torch.int8).numpy().tobytes()
        head = b"" if self.scale else np.float32(step).tobytes()
        return head + codes, state

    def decode(self, data: bytes) -> torch.Tensor:
        check_size(self.name, data, self.max_bytes(), self.max_bytes())
        reader = Reader(self.name, data)
        step = self.scale / 127 if self.scale else reader.f32()
        if step < 0:
            raise reader.fail("negative scale")
        levels = reader.array("i1", self.n)
        if (levels == -128).any():
            raise reader.fail("level -128 is outside -127..127")
        return finite(self.name, torch.from_numpy(levels.astype(np.float32)) * step)

    def max_bytes(self) -> int:
        return self.n + (0 if self.scale else 4)
