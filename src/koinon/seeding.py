"""Seeds: every random choice in koinon comes from a generator seeded by public integers.

`mix_seed(seed, round, client, stream)` hashes any tuple of integers into a 63-bit seed
(splitmix64 over the parts), so a client's batches, its codec's randomness or an attacker's
draw depend only on who and when, never on which runtime, chunk or process computes them. Both
ends of the wire call the same function: a server can regenerate what a client drew (SPSA's
directions, a sketch's hash) from the same parts.
"""

from __future__ import annotations

import numpy as np
import torch

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)  # splitmix64's increment, as a signed int64


def shr(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's `>>` is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def hash64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 tensors (multiplication wraps modulo 2^64)."""
    z = (z ^ shr(z, 30)) * (0xBF58476D1CE4E5B9 - (1 << 64))
    z = (z ^ shr(z, 27)) * (0x94D049BB133111EB - (1 << 64))
    return z ^ shr(z, 31)


def _absorb(h: int, part: int) -> int:
    h = (h ^ (part & MASK64)) & MASK64
    h = (h + 0x9E3779B97F4A7C15) & MASK64
    z = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def mix_seed(*parts: int) -> int:
    """Deterministic 63-bit seed from integers (splitmix64 over the parts)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = _absorb(h, p)
    return h >> 1


def mix_seeds(seed: int, round_index: int, clients: torch.Tensor) -> torch.Tensor:
    """`mix_seed(seed, round_index, c)` for every c in `clients` at once (int64 tensor ops,
    which wrap modulo 2^64 as the scalar version's masks do); equal values, tested."""
    h = 0x9E3779B97F4A7C15
    for part in (seed, round_index):
        h = _absorb(h, part)
    signed = h - (1 << 64) if h >= 1 << 63 else h
    mixed = (torch.as_tensor(clients, dtype=torch.long) ^ signed) + GOLDEN
    return shr(hash64(mixed), 1)


def generator(*parts: int) -> torch.Generator:
    """A torch generator seeded with `mix_seed(*parts)`."""
    return torch.Generator().manual_seed(mix_seed(*parts))


def hash64_array(z: np.ndarray) -> np.ndarray:
    """`hash64` on an int64 NumPy array (its multiplications wrap modulo 2^64 too); equal values."""
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * np.int64(0xBF58476D1CE4E5B9 - (1 << 64))
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * np.int64(0x94D049BB133111EB - (1 << 64))
    return z ^ ((z >> 31) & ((1 << 33) - 1))


def mix_seeds_array(seed: int, round_index: int, clients: np.ndarray) -> np.ndarray:
    """`mix_seeds` on an int64 NumPy array of clients (for code that stays in NumPy); equal values."""
    h = 0x9E3779B97F4A7C15
    for part in (seed, round_index):
        h = _absorb(h, part)
    signed = h - (1 << 64) if h >= 1 << 63 else h
    mixed = (np.asarray(clients, dtype=np.int64) ^ np.int64(signed)) + np.int64(GOLDEN)
    return (hash64_array(mixed) >> 1) & ((1 << 63) - 1)
