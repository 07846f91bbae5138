import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from koinon.data import PARTITIONERS


def _labels(n=600, classes=10, seed=0):
    return np.random.default_rng(seed).integers(0, classes, n)


def _split(name, labels, k, seed=0, **opts):
    return PARTITIONERS.get(name)(labels=labels, num_clients=k, rng=np.random.default_rng(seed), **opts)


@settings(max_examples=25, deadline=None)
@given(
    st.sampled_from(["iid", "dirichlet", "shards", "quantity"]),
    st.integers(1, 40),
    st.integers(0, 10_000),
)
def test_partitions_are_disjoint_complete_and_nonempty(name, k, seed):
    labels = _labels(400, seed=seed)
    parts = _split(name, labels, k, seed)
    assert len(parts) == k
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)) == len(labels)  # disjoint and complete
    assert all(len(p) >= 1 for p in parts)


def _mean_label_entropy(parts, labels):
    ent = []
    for p in parts:
        counts = np.bincount(labels[p], minlength=10).astype(float)
        q = counts / counts.sum()
        ent.append(-(q[q > 0] * np.log(q[q > 0])).sum())
    return float(np.mean(ent))


def test_dirichlet_alpha_controls_label_skew():
    labels = _labels(5000)
    skewed = _mean_label_entropy(_split("dirichlet", labels, 50, alpha=0.1), labels)
    mild = _mean_label_entropy(_split("dirichlet", labels, 50, alpha=1.0), labels)
    near_iid = _mean_label_entropy(_split("dirichlet", labels, 50, alpha=1000.0), labels)
    assert skewed < mild < near_iid
    assert near_iid > 0.95 * np.log(10)


def test_shards_give_each_client_few_classes():
    labels = np.repeat(np.arange(10), 100)
    parts = _split("shards", labels, 50, classes_per_client=2)
    assert max(len(np.unique(labels[p])) for p in parts) <= 2


def test_quantity_sizes_are_skewed():
    parts = _split("quantity", _labels(5000), 50, power=1.5)
    sizes = sorted(len(p) for p in parts)
    assert sizes[-1] > 10 * sizes[len(sizes) // 2]


def test_natural_needs_groups():
    with pytest.raises(ValueError, match="no natural grouping"):
        _split("natural", _labels(), 5)
    groups = [np.array([0, 1]), np.array([2])]
    assert [list(p) for p in _split("natural", _labels(3), 2, groups=groups)] == [[0, 1], [2]]


def test_same_seed_same_partition():
    labels = _labels()
    a = _split("dirichlet", labels, 20, seed=3)
    b = _split("dirichlet", labels, 20, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_too_many_clients_is_refused():
    with pytest.raises(ValueError, match="exceeds"):
        _split("iid", _labels(10), 11)
