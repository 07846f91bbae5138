"""An append-only Merkle tree as Certificate Transparency defines it (RFC 6962 / RFC 9162).

leaf = SHA-256(0x00 || entry), node = SHA-256(0x01 || left || right); the tree of n leaves
splits at the largest power of two below n. Inclusion proofs (an entry is in the tree of a given
size) and consistency proofs (the tree of size m is a prefix of the tree of size n) follow the
RFC's PATH and SUBPROOF definitions; the verifiers follow RFC 9162 sections 2.1.3.2 and
2.1.4.2. Written here (about 100 lines) because the Python CT libraries are either unmaintained
or tied to X.509 certificate parsing, and the algorithms are short and fully specified.
"""

from __future__ import annotations

import hashlib

EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(entry: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly below n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def root(leaves: list[bytes]) -> bytes:
    """The tree head of leaf hashes `leaves`: pairs left to right, an unpaired last node moves up
    unchanged, which builds the same tree as the RFC's split at the largest power of two."""
    if not leaves:
        return EMPTY_ROOT
    level = list(leaves)
    while len(level) > 1:
        nxt = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


class Frontier:
    """The root of a growing tree in O(log n) per leaf: the perfect subtrees of the binary
    decomposition of n, largest (leftmost) first; the RFC's root folds them from the right."""

    def __init__(self) -> None:
        self.subtrees: list[tuple[int, bytes]] = []  # (size, hash)
        self.size = 0

    def append(self, leaf: bytes) -> None:
        size, h = 1, leaf
        while self.subtrees and self.subtrees[-1][0] == size:
            left = self.subtrees.pop()[1]
            size, h = size * 2, node_hash(left, h)
        self.subtrees.append((size, h))
        self.size += 1

    def root(self) -> bytes:
        if not self.subtrees:
            return EMPTY_ROOT
        acc = self.subtrees[-1][1]
        for _, h in reversed(self.subtrees[:-1]):
            acc = node_hash(h, acc)
        return acc


def inclusion_proof(index: int, leaves: list[bytes]) -> list[bytes]:
    """RFC 6962 PATH(index, leaves): the sibling hashes from leaf `index` up to the root."""
    n = len(leaves)
    if not 0 <= index < n:
        raise ValueError(f"leaf {index} is not in a tree of {n} leaves")
    if n == 1:
        return []
    k = _split(n)
    if index < k:
        return inclusion_proof(index, leaves[:k]) + [root(leaves[k:])]
    return inclusion_proof(index - k, leaves[k:]) + [root(leaves[:k])]


def consistency_proof(old_size: int, leaves: list[bytes]) -> list[bytes]:
    """RFC 6962 PROOF(old_size, leaves): shows the tree of `old_size` leaves is a prefix."""
    if not 0 < old_size <= len(leaves):
        raise ValueError(f"no consistency proof from size {old_size} to {len(leaves)}")
    return [] if old_size == len(leaves) else _subproof(old_size, leaves, True)


def _subproof(m: int, leaves: list[bytes], complete: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if complete else [root(leaves)]
    k = _split(n)
    if m <= k:
        return _subproof(m, leaves[:k], complete) + [root(leaves[k:])]
    return _subproof(m - k, leaves[k:], False) + [root(leaves[:k])]


def verify_inclusion(leaf: bytes, index: int, size: int, proof: list[bytes], expected_root: bytes) -> bool:
    """RFC 9162 2.1.3.2: does `leaf` (a leaf hash) sit at `index` in the tree of `size` with `expected_root`?"""
    if not 0 <= index < size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and r == expected_root


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: list[bytes]) -> bool:
    """RFC 9162 2.1.4.2: is the tree (`old_size`, `old_root`) a prefix of (`new_size`, `new_root`)?"""
    if not 0 < old_size <= new_size:
        return False
    if old_size == new_size:
        return not proof and old_root == new_root
    if old_size & (old_size - 1) == 0:  # a power of two: the old root is the first node
        proof = [old_root, *proof]
    if not proof:
        return False
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = proof[0]
    for c in proof[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    return fr == old_root and sr == new_root and sn == 0
