"""Gaussian noise for differential privacy from a cryptographically secure stream.

DP noise must be unpredictable to whoever sees the released value: a Mersenne-Twister
generator (torch's or numpy's default) can be reconstructed from its outputs, and one seeded
with the run's public seed is no noise at all. `NoiseSource` draws uniform bits from the
ChaCha20 stream cipher (`cryptography`) keyed with 32 bytes from `os.urandom`, and turns them
into standard normals with the Box-Muller transform in float64. Noise is therefore *not
reproducible by design*: two runs of one config differ by their noise. `NoiseSource(seed=s)`
keys the stream from the public integer `s` instead: reproducible and **not private**, for
tests and for comparing runs only (`privacy.noise_seed`).

Known limit: floating-point Gaussian samples leak through their low-order bits (Mironov 2012);
a discrete Gaussian over a fixed-point grid would close it. Not done here.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

__all__ = ["NoiseSource"]


class NoiseSource:
    """Standard normal draws from a ChaCha20 key stream (secure unless `seed` is given)."""

    def __init__(self, seed: int | None = None) -> None:
        self.secure = seed is None
        if seed is None:
            key = os.urandom(32)
        else:
            key = hashlib.sha256(b"koinon insecure dp noise" + int(seed).to_bytes(16, "little", signed=True)).digest()
        self._stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()

    def bytes(self, n: int) -> bytes:
        return self._stream.update(bytes(n))

    def uniform(self, n: int) -> np.ndarray:
        """n floats uniform in (0, 1): 53 random bits each, never exactly 0."""
        words = np.frombuffer(self.bytes(8 * n), dtype=np.uint64)
        return ((words >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53

    def normal(self, n: int, std: float = 1.0) -> torch.Tensor:
        """n independent N(0, std^2) draws as float32 (Box-Muller, both outputs used)."""
        half = (n + 1) // 2
        u1, u2 = self.uniform(half), self.uniform(half)
        radius = np.sqrt(-2.0 * np.log(u1))
        angle = 2.0 * np.pi * u2
        z = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]
        return torch.from_numpy(z * std).to(torch.float32)
