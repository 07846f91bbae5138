"""Partitioners: how a dataset's training samples are split among clients.

A partitioner maps `(labels, num_clients, rng)` to one index array per client. Every partition
is disjoint; all but `quantity` and `dirichlet` with tiny data are also complete (every sample
belongs to some client) and every client gets at least one sample, so no client is empty.
"""

from __future__ import annotations

import numpy as np

from koinon.registry import Registry

PARTITIONERS: Registry[list[np.ndarray]] = Registry("partition")
"""Factories are called as `f(labels=..., num_clients=..., rng=..., groups=..., **options)`."""


def _check(num_clients: int, n: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be at least 1, got {num_clients}")
    if num_clients > n:
        raise ValueError(f"num_clients = {num_clients} exceeds the {n} training samples")


def _fill_empty(parts: list[list[int]] | list[np.ndarray]) -> list[np.ndarray]:
    """Give every empty client one sample taken from the currently largest client."""
    arrays = [np.asarray(p, dtype=np.int64) for p in parts]
    for i, p in enumerate(arrays):
        if len(p) == 0:
            j = int(np.argmax([len(q) for q in arrays]))
            arrays[i], arrays[j] = arrays[j][-1:], arrays[j][:-1]
    return [np.sort(p) for p in arrays]


@PARTITIONERS.register("iid")
def iid(labels: np.ndarray, num_clients: int, rng: np.random.Generator, groups=None) -> list[np.ndarray]:
    """Uniformly random, equal-sized shares."""
    _check(num_clients, len(labels))
    return [np.sort(p) for p in np.array_split(rng.permutation(len(labels)), num_clients)]


@PARTITIONERS.register("dirichlet")
def dirichlet(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator, groups=None, alpha: float = 0.5
) -> list[np.ndarray]:
    """Label skew: each class split over clients by Dirichlet(alpha) proportions (Hsu et al. 2019)."""
    _check(num_clients, len(labels))
    if alpha <= 0:
        raise ValueError(f"data.alpha must be > 0 for the dirichlet partition, got {alpha}")
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        props = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
        for k, chunk in enumerate(np.split(idx, cuts)):
            parts[k].extend(chunk.tolist())
    return _fill_empty(parts)


@PARTITIONERS.register("shards")
def shards(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    groups=None,
    classes_per_client: int = 2,
) -> list[np.ndarray]:
    """Pathological skew (McMahan et al. 2017): sort by label, deal `classes_per_client` shards each."""
    if classes_per_client < 1:
        raise ValueError(f"data.classes_per_client must be >= 1, got {classes_per_client}")
    num_shards = num_clients * classes_per_client
    _check(num_shards, len(labels))
    order = np.lexsort((rng.random(len(labels)), labels))  # by label, random within a label
    pieces = np.array_split(order, num_shards)
    deal = rng.permutation(num_shards).reshape(num_clients, classes_per_client)
    return [np.sort(np.concatenate([pieces[s] for s in row])) for row in deal]


@PARTITIONERS.register("quantity")
def quantity(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator, groups=None, power: float = 1.5
) -> list[np.ndarray]:
    """Quantity skew: IID labels, client sizes from a power law (size of rank r ~ r^-power)."""
    _check(num_clients, len(labels))
    if power < 0:
        raise ValueError(f"data.power must be >= 0, got {power}")
    weights = (np.arange(1, num_clients + 1, dtype=np.float64) ** -power)[rng.permutation(num_clients)]
    spare = len(labels) - num_clients  # one sample each first, the rest by the power law
    sizes = 1 + np.floor(weights / weights.sum() * spare).astype(int)
    sizes[np.argmax(sizes)] += len(labels) - sizes.sum()
    cuts = np.cumsum(sizes)[:-1]
    return [np.sort(p) for p in np.split(rng.permutation(len(labels)), cuts)]


@PARTITIONERS.register("natural")
def natural(labels: np.ndarray, num_clients: int, rng: np.random.Generator, groups=None) -> list[np.ndarray]:
    """The dataset's own grouping (e.g. Synthetic's devices); only for datasets that have one."""
    if groups is None:
        raise ValueError("this dataset has no natural grouping; use iid, dirichlet, shards or quantity")
    if len(groups) != num_clients:
        raise ValueError(f"the dataset has {len(groups)} natural groups but num_clients = {num_clients}")
    return [np.asarray(g, dtype=np.int64) for g in groups]
