"""Fixed-point encoding of updates into Z_(2^m), the ring secure aggregation sums in.

A client's update x (floats) becomes integers: every coordinate is clipped to [-R, R], scaled
by s, stochastically rounded (floor(x s + u), u ~ U[0, 1): unbiased, E[q] = x s) and multiplied
by the client's integer weight w <= W (its samples, capped). Two integers follow the values:
the weight w itself (the server divides by the sum of weights) and one extra count (the
adaptive-clipping bit under DP). Negative values wrap modulo 2^m.

Overflow is impossible by construction: with n <= N clients, |sum of w q| <= N W (floor(R s) + 1),
and s is chosen so that this is <= 2^(m-1) - 1, checked in exact integers on the float64 product
R s that `encode` computes (at 64 bits float64 cannot hold 2^63 - 1: the float bound alone would
let +R wrap to -R); the centred sum then *is* the integer sum. A cohort
larger than N, a weight above W or bits too few for a step of at most 1 are refused with a
`ValueError` (a `ConfigError` when they come from the config).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

__all__ = ["FixedPoint"]

NUM_EXTRAS = 2  # weight, count


@dataclass(frozen=True)
class FixedPoint:
    modulus_bits: int
    clip_range: float
    max_weight: int
    max_clients: int

    def __post_init__(self) -> None:
        if not 8 <= self.modulus_bits <= 64:
            raise ValueError(f"modulus bits = {self.modulus_bits}: allowed 8 to 64")
        if not self.clip_range > 0 or not math.isfinite(self.clip_range):
            raise ValueError(f"clip range = {self.clip_range}: must be a finite number > 0")
        if self.max_weight < 1 or self.max_clients < 1:
            raise ValueError("max weight and max clients must be >= 1")
        if self.scale < 1.0:
            raise ValueError(
                f"modulus 2^{self.modulus_bits} is too small for {self.max_clients} clients x weight "
                f"{self.max_weight} x range {self.clip_range:g} (quantization step would exceed 1): "
                "raise the modulus bits or lower the weight cap / clip range")

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        """The smallest unsigned word that holds m bits: the sum is quantized in the field, so a
        16-bit modulus sends 2 bytes per coordinate (as fp16 would), 8 bits 1 byte (as int8)."""
        for bits, dtype in ((8, np.uint8), (16, np.uint16), (32, np.uint32)):
            if self.modulus_bits <= bits:
                return dtype
        return np.uint64

    @property
    def word_bytes(self) -> int:
        return int(np.dtype(self.dtype).itemsize)

    @property
    def mask(self) -> int:
        return (1 << self.modulus_bits) - 1

    @cached_property
    def scale(self) -> float:
        """Largest float s with N W (floor(R s) + 1) <= 2^(m-1) - 1 (so the centred sum cannot
        wrap), R s computed in float64 as `encode` does and the bound checked in integers."""
        half = (1 << (self.modulus_bits - 1)) - 1
        limit = half // (self.max_clients * self.max_weight) - 1  # the largest floor(R s) allowed
        s = limit / self.clip_range
        while s > 0 and math.floor(self.clip_range * s) > limit:
            s = math.nextafter(s, 0.0)
        return s

    def encode(self, x: torch.Tensor, weight: int, count: int, rng: torch.Generator) -> np.ndarray:
        """[w q(x)..., w, count] in Z_(2^m) (as unsigned words)."""
        if not 0 <= weight <= self.max_weight:
            raise ValueError(f"weight {weight} outside [0, {self.max_weight}]")
        scaled = x.double().clamp(-self.clip_range, self.clip_range) * self.scale
        u = torch.rand(scaled.shape, generator=rng, dtype=torch.float64)
        q = torch.floor(scaled + u).to(torch.int64) * weight
        ints = torch.cat([q, torch.tensor([weight, count], dtype=torch.int64)]).numpy()
        return self.wrap(ints)

    def wrap(self, ints: np.ndarray) -> np.ndarray:
        """Signed integers to words of Z_(2^m)."""
        words = ints.astype(np.int64).view(np.uint64) & np.uint64(self.mask)
        return words.astype(self.dtype)

    def centred(self, words: np.ndarray) -> np.ndarray:
        """Words of Z_(2^m) to the signed integers in [-2^(m-1), 2^(m-1))."""
        shift = np.uint64(64 - self.modulus_bits)  # sign extension: no 2^m constant (63 bits: 2^63 overflows int64)
        w = (words.astype(np.uint64) & np.uint64(self.mask)) << shift
        return w.view(np.int64) >> np.int64(shift)

    def decode_sum(self, words: np.ndarray, num_clients: int) -> tuple[torch.Tensor, int, int]:
        """(sum of w x as float64 [P], sum of weights, sum of counts) from a sum of encodings."""
        if num_clients > self.max_clients:
            raise ValueError(f"{num_clients} inputs summed, the encoding allows at most {self.max_clients}")
        ints = self.centred(words)
        values = torch.from_numpy(ints[:-NUM_EXTRAS].astype(np.float64) / self.scale)
        return values, int(ints[-2]), int(ints[-1])
