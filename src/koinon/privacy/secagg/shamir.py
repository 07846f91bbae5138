"""Shamir t-of-n secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

Written here because `cryptography` has no secret sharing and the small libraries that do
either pickle their shares or work modulo small primes; the field is a Mersenne prime larger
than any 32-byte secret, so a secret is one field element and a share is (x, y) with y written
as 66 big-endian bytes (a fixed encoding: no pickle). Coefficients come from `secrets`.
"""

from __future__ import annotations

import secrets

__all__ = ["PRIME", "SHARE_BYTES", "reconstruct", "split"]

PRIME = (1 << 521) - 1
SHARE_BYTES = 66


def split(secret: bytes, threshold: int, xs: list[int]) -> dict[int, bytes]:
    """Shares of `secret` at the points `xs` (distinct, 1 <= x < PRIME); any `threshold` of
    them reconstruct it, fewer reveal nothing."""
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} needs between 1 and {len(xs)} shares")
    if len(secret) != 32:
        raise ValueError("secrets are 32 bytes")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    out = {}
    for x in xs:
        if not 0 < x < PRIME:
            raise ValueError(f"share point {x} outside the field")
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        out[x] = y.to_bytes(SHARE_BYTES, "big")
    return out


def reconstruct(shares: dict[int, bytes], threshold: int) -> bytes:
    """The secret from at least `threshold` shares (Lagrange interpolation at 0)."""
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} shares, {threshold} needed")
    points = sorted(shares.items())[:threshold]
    xs = [x for x, _ in points]
    secret = 0
    for i, (xi, yb) in enumerate(points):
        yi = int.from_bytes(yb, "big")
        if yi >= PRIME:
            raise ValueError("share value outside the field")
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 1 << 256:
        raise ValueError("shares do not reconstruct a 32-byte secret (inconsistent shares)")
    return secret.to_bytes(32, "big")
