"""Index-set coding and the level-ordered Huffman code."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from koinon.compress.entropy import (
    INDEX_BITMAP,
    INDEX_RICE,
    INDEX_VARINT,
    decode_indices,
    encode_indices,
    huffman_decode,
    huffman_encode,
    huffman_lengths,
    index_bound,
)
from koinon.compress.wire import Reader
from koinon.errors import CodecError


def _round_trip(idx: np.ndarray, numel: int) -> tuple[int, np.ndarray, int]:
    data = encode_indices(idx, numel)
    reader = Reader("test", data)
    out = decode_indices(reader, len(idx), numel)
    reader.finish()
    return data[0], out, len(data)


@settings(max_examples=60, deadline=None)
@given(numel=st.integers(1, 5000), data=st.data())
def test_index_sets_round_trip_within_bound(numel, data) -> None:
    idx = np.array(sorted(data.draw(st.sets(st.integers(0, numel - 1), max_size=200))), np.int64)
    _, out, size = _round_trip(idx, numel)
    np.testing.assert_array_equal(out, idx)
    assert size <= index_bound(len(idx), numel)


@pytest.mark.parametrize(
    ("idx", "numel", "flag"),
    [
        (np.arange(1000), 1000, INDEX_BITMAP),  # dense: 125 bytes beat 1000 one-bit quotients
        (np.array([0, 10**6]), 10**6 + 1, INDEX_VARINT),  # two far apart: 4 varint bytes
        (np.sort(np.random.default_rng(0).choice(10**5, 1000, replace=False)), 10**5, INDEX_RICE),
    ],
)
def test_smallest_index_coding_is_chosen(idx, numel, flag) -> None:
    got, out, size = _round_trip(idx.astype(np.int64), numel)
    assert got == flag
    np.testing.assert_array_equal(out, idx)
    if flag == INDEX_RICE:
        # 1% random: gap entropy is about log2(100) + 1.44 = 8.1 bits; Rice stays within 1 bit
        assert size * 8 / len(idx) < 9.5


def test_index_decode_rejects_out_of_range_and_wrong_count() -> None:
    data = encode_indices(np.array([3, 900], np.int64), 1000)
    assert data[0] != INDEX_BITMAP
    with pytest.raises(CodecError, match="past the layout"):
        decode_indices(Reader("t", data), 2, 800)
    with pytest.raises(CodecError):
        decode_indices(Reader("t", data), 3, 1000)
    bitmap = encode_indices(np.arange(10, dtype=np.int64), 10)
    with pytest.raises(CodecError, match="holds 10 indices"):
        decode_indices(Reader("t", bitmap), 9, 10)


def test_huffman_lengths_fix_fedzip_invalid_code() -> None:
    # FedZip's original used lengths (2, 1, 1), which violates Kraft's inequality
    np.testing.assert_array_equal(huffman_lengths(np.array([1, 1, 2])), [2, 2, 1])
    np.testing.assert_array_equal(huffman_lengths(np.array([0, 5, 0])), [0, 1, 0])


@settings(max_examples=60, deadline=None)
@given(k=st.integers(1, 16), data=st.data())
def test_huffman_round_trip_is_near_entropy(k, data) -> None:
    symbols = np.array(data.draw(st.lists(st.integers(0, k - 1), min_size=1, max_size=300)))
    counts = np.bincount(symbols, minlength=k)
    lengths = huffman_lengths(counts)
    used = counts > 0
    assert (2.0 ** -lengths[used].astype(float)).sum() <= 1.0
    data_bytes = huffman_encode(symbols, lengths)
    reader = Reader("t", data_bytes)
    np.testing.assert_array_equal(huffman_decode(reader, len(symbols), lengths), symbols)
    reader.finish()
    p = counts[used] / len(symbols)
    entropy = float(-(p * np.log2(p)).sum())
    assert (lengths * counts).sum() <= len(symbols) * (entropy + 1) + 1e-9


def test_huffman_decode_rejects_non_prefix_lengths() -> None:
    data = huffman_encode(np.array([0, 1, 2]), np.array([2, 2, 1]))
    with pytest.raises(CodecError, match="prefix code"):
        huffman_decode(Reader("t", data), 3, np.array([2, 1, 1]))
