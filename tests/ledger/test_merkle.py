"""RFC 6962 Merkle tree: roots by the RFC's recursive definition, proofs verify, tampering fails."""

from __future__ import annotations

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

from koinon.ledger.merkle import (
    EMPTY_ROOT,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root,
    verify_consistency,
    verify_inclusion,
)


def mth(leaves):
    """The RFC's definition, literally."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return node_hash(mth(leaves[:k]), mth(leaves[k:]))


def leaves(n):
    return [leaf_hash(f"entry {i}".encode()) for i in range(n)]


def test_hashing_by_hand():
    assert leaf_hash(b"") == hashlib.sha256(b"\x00").digest()
    a, b, c = leaves(3)
    assert root([a, b, c]) == node_hash(node_hash(a, b), c)
    assert root([]) == EMPTY_ROOT
    # RFC 6962's test vector: the root of the empty leaf alone.
    assert root([leaf_hash(b"")]).hex() == "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.data())
def test_inclusion_and_consistency_proofs(n, data):
    ls = leaves(n)
    assert root(ls) == mth(ls)
    i = data.draw(st.integers(0, n - 1))
    proof = inclusion_proof(i, ls)
    assert verify_inclusion(ls[i], i, n, proof, root(ls))
    assert not verify_inclusion(leaf_hash(b"forged"), i, n, proof, root(ls))
    if proof:
        bad = list(proof)
        bad[0] = bytes(32)
        assert not verify_inclusion(ls[i], i, n, bad, root(ls))
    m = data.draw(st.integers(1, n))
    cproof = consistency_proof(m, ls)
    assert verify_consistency(m, n, root(ls[:m]), root(ls), cproof)
    if m < n:
        assert not verify_consistency(m, n, root(ls[:m]), root(ls), cproof[:-1] + [bytes(32)])
        # A history that differs in one old entry is not a prefix.
        other = list(ls)
        other[0] = leaf_hash(b"rewritten")
        assert not verify_consistency(m, n, root(other[:m]), root(ls), cproof)


def test_frontier_root_equals_the_definition_at_every_size():
    from koinon.ledger.merkle import Frontier

    f = Frontier()
    assert f.root() == EMPTY_ROOT
    ls = leaves(70)
    for n, leaf in enumerate(ls, start=1):
        f.append(leaf)
        assert f.root() == mth(ls[:n])
