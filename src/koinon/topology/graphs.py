"""Communication graphs for decentralized learning and their mixing matrices.

Graph builders return an undirected `networkx.Graph` on nodes `0..N-1` and are registered in
`GRAPHS`, so configs name them (`ring`, `exponential`, `barabasi_albert`, ...). A mixing
matrix is a sparse `[N, N]` float32 COO tensor (COO rather than CSR: CSR still warns "beta" in
torch, and `torch.sparse.mm` on coalesced COO is as fast for our sizes). Both weight rules give
symmetric, doubly stochastic matrices on any undirected graph, so gossip preserves the mean:

- Metropolis-Hastings (default): W_ij = 1 / (1 + max(d_i, d_j)) on each edge,
  W_ii = 1 - sum_j W_ij.
- max-degree ("uniform"): the same weight 1 / (1 + d_max) on every edge.

Given a `live` mask, the matrix is built on the subgraph induced by the live nodes (degrees count
live neighbours only) and dead nodes keep their row as the identity: a crash never breaks double
stochasticity among the survivors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from koinon.registry import Registry

if TYPE_CHECKING:  # networkx takes 0.1-0.2 s to import: the builders import it, so runs
    import networkx as nx  # without a gossip network never load it.

GRAPHS: Registry[nx.Graph] = Registry("graph")
"""Graph builders, called as `factory(num_nodes=..., seed=..., **options)` (context optional)."""

MIXING_RULES = ("metropolis", "max_degree", "uniform")


def _check_size(num_nodes: int, least: int = 1) -> None:
    if num_nodes < least:
        raise ValueError(f"num_nodes must be >= {least}, got {num_nodes}")


@GRAPHS.register("ring")
def ring(num_nodes: int) -> nx.Graph:
    """Cycle: each node talks to its two neighbours (weights 1/3 under Metropolis-Hastings)."""
    import networkx as nx
    _check_size(num_nodes)
    return nx.cycle_graph(num_nodes) if num_nodes > 2 else nx.path_graph(num_nodes)


@GRAPHS.register("torus")
def torus(num_nodes: int, rows: int = 0) -> nx.Graph:
    """2-D torus (wrap-around grid) of rows x (num_nodes / rows); rows = 0 picks the squarest."""
    import networkx as nx
    _check_size(num_nodes)
    if rows == 0:
        rows = max(r for r in range(1, math.isqrt(num_nodes) + 1) if num_nodes % r == 0)
    if rows < 1 or num_nodes % rows:
        raise ValueError(f"torus rows = {rows} must divide num_nodes = {num_nodes}")
    graph = nx.grid_2d_graph(rows, num_nodes // rows, periodic=True)
    return nx.Graph(nx.convert_node_labels_to_integers(graph, ordering="sorted"))


@GRAPHS.register("exponential")
def exponential(num_nodes: int) -> nx.Graph:
    """Exponential graph: node i is linked to i +- 2^k (mod N), so log2(N) neighbours a side."""
    import networkx as nx
    _check_size(num_nodes)
    graph = nx.empty_graph(num_nodes)
    offset = 1
    while offset < num_nodes:
        graph.add_edges_from((i, (i + offset) % num_nodes) for i in range(num_nodes))
        offset *= 2
    graph.remove_edges_from(nx.selfloop_edges(graph))
    return graph


@GRAPHS.register("fully_connected")
def fully_connected(num_nodes: int) -> nx.Graph:
    """Complete graph: one mixing step is the exact average (weights 1/N)."""
    import networkx as nx
    _check_size(num_nodes)
    return nx.complete_graph(num_nodes)


@GRAPHS.register("star")
def star(num_nodes: int) -> nx.Graph:
    """Star: node 0 is linked to every other node (a server without a server)."""
    import networkx as nx
    _check_size(num_nodes)
    return nx.star_graph(num_nodes - 1)


@GRAPHS.register("random_regular")
def random_regular(num_nodes: int, degree: int = 4, seed: int = 0) -> nx.Graph:
    """Random d-regular graph (seeded); degree * num_nodes must be even."""
    import networkx as nx
    _check_size(num_nodes, 2)
    if not 0 < degree < num_nodes or (degree * num_nodes) % 2:
        raise ValueError(f"no {degree}-regular graph on {num_nodes} nodes")
    return nx.random_regular_graph(degree, num_nodes, seed=seed)


@GRAPHS.register("erdos_renyi")
def erdos_renyi(num_nodes: int, p: float = 0.2, seed: int = 0) -> nx.Graph:
    """Erdos-Renyi G(N, p) (seeded), redrawn with the next seeds until it is connected."""
    import networkx as nx
    _check_size(num_nodes)
    if not 0.0 < p <= 1.0:
        raise ValueError(f"erdos_renyi p must be in (0, 1], got {p}")
    for attempt in range(100):  # a disconnected graph never reaches consensus
        graph = nx.gnp_random_graph(num_nodes, p, seed=seed + attempt)
        if nx.is_connected(graph):
            return graph
    raise ValueError(f"G({num_nodes}, {p}) was disconnected in 100 draws; raise p")


@GRAPHS.register("barabasi_albert")
def barabasi_albert(num_nodes: int, m: int = 2, seed: int = 0) -> nx.Graph:
    """Barabasi-Albert preferential attachment, m edges per new node (seeded; scale-free hubs)."""
    import networkx as nx
    _check_size(num_nodes, 2)
    if not 1 <= m < num_nodes:
        raise ValueError(f"barabasi_albert m must be in [1, {num_nodes - 1}], got {m}")
    return nx.barabasi_albert_graph(num_nodes, m, seed=seed)


def from_networkx(graph: nx.Graph) -> nx.Graph:
    """Any networkx graph, undirected, without self-loops, relabelled to 0..N-1 (sorted order)."""
    import networkx as nx
    out = nx.Graph(nx.convert_node_labels_to_integers(nx.Graph(graph), ordering="sorted"))
    out.remove_edges_from(nx.selfloop_edges(out))
    return out


@GRAPHS.register("edge_list")
def edge_list(num_nodes: int, path: str = "") -> nx.Graph:
    """Graph read from a text file of `u v` lines (node ids 0..N-1; '#' starts a comment)."""
    import networkx as nx
    if not path:
        raise ValueError("topology edge_list needs path = 'file with one `u v` pair per line'")
    graph = nx.empty_graph(num_nodes)
    for line_no, line in enumerate(Path(path).read_text().splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        try:
            u, v = int(fields[0]), int(fields[1])
        except (ValueError, IndexError):
            raise ValueError(f"{path}:{line_no}: expected two node ids, got {line!r}") from None
        if not (0 <= u < num_nodes and 0 <= v < num_nodes):
            raise ValueError(f"{path}:{line_no}: node id outside 0..{num_nodes - 1}")
        if u != v:
            graph.add_edge(u, v)
    return graph


def build_graph(name: str, num_nodes: int, seed: int = 0, options: dict | None = None) -> nx.Graph:
    """A registered graph on `num_nodes` nodes with checked options."""
    GRAPHS.get(name, key="topology.graph")
    graph = GRAPHS.build(name, dict(options or {}), "topology.graph", num_nodes=num_nodes, seed=seed)
    if graph.number_of_nodes() != num_nodes:
        raise ValueError(f"graph {name!r} has {graph.number_of_nodes()} nodes, expected {num_nodes}")
    return graph


def mixing_matrix(
    graph: nx.Graph,
    rule: str = "metropolis",
    live: Sequence[bool] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Sparse symmetric doubly stochastic `[N, N]` mixing matrix of `graph` (see module doc)."""
    if rule not in MIXING_RULES:
        raise ValueError(f"mixing rule {rule!r}; allowed: {', '.join(MIXING_RULES)}")
    n = graph.number_of_nodes()
    alive = np.ones(n, dtype=bool) if live is None else np.asarray(live, dtype=bool)
    edges = np.array([(u, v) for u, v in graph.edges() if u != v and alive[u] and alive[v]], dtype=np.int64)
    edges = edges.reshape(-1, 2)
    degree = np.bincount(edges.ravel(), minlength=n)
    if rule == "metropolis":
        weight = 1.0 / (1.0 + np.maximum(degree[edges[:, 0]], degree[edges[:, 1]]))
    else:
        weight = np.full(len(edges), 1.0 / (1.0 + degree.max(initial=0)))
    # Sums in float64 so that the diagonal leaves rows summing to 1 up to float32 rounding.
    ends = np.concatenate([edges[:, 0], edges[:, 1]])
    diagonal = 1.0 - np.bincount(ends, weights=np.concatenate([weight, weight]), minlength=n)
    rows = np.concatenate([ends, np.arange(n)])
    cols = np.concatenate([edges[:, 1], edges[:, 0], np.arange(n)])
    values = np.concatenate([weight, weight, diagonal])
    index = torch.from_numpy(np.stack([rows, cols]))
    return torch.sparse_coo_tensor(
        index, torch.from_numpy(values).float(), (n, n), check_invariants=True
    ).coalesce()


def check_mixing(w: torch.Tensor, atol: float = 1e-5) -> None:
    """Raise `ValueError` unless `w` is non-negative, symmetric and doubly stochastic."""
    dense = w.to_dense() if w.is_sparse else w
    if dense.dim() != 2 or dense.shape[0] != dense.shape[1]:
        raise ValueError(f"mixing matrix must be square, got shape {tuple(dense.shape)}")
    if (dense < -atol).any():
        raise ValueError("mixing matrix has negative entries")
    if not torch.allclose(dense, dense.T, atol=atol):
        raise ValueError("mixing matrix is not symmetric")
    ones = torch.ones(dense.shape[0])
    if not (torch.allclose(dense.sum(0), ones, atol=atol) and torch.allclose(dense.sum(1), ones, atol=atol)):
        raise ValueError("mixing matrix is not doubly stochastic")


def neighbours(graph: nx.Graph, node: int, live: Sequence[bool] | torch.Tensor | None = None) -> list[int]:
    """Live neighbours of `node` (sorted)."""
    alive = None if live is None else np.asarray(live, dtype=bool)
    return sorted(v for v in graph.neighbors(node) if v != node and (alive is None or alive[v]))


def fail_links(graph: nx.Graph, probability: float, rng: np.random.Generator) -> tuple[nx.Graph, int]:
    """A copy of `graph` (same nodes) where every edge failed independently with `probability`.

    Edges are drawn in sorted `(min, max)` order, so the outcome depends only on `rng`'s seed.
    Returns the surviving graph and the number of failed edges.
    """
    import networkx as nx
    edges = sorted((min(u, v), max(u, v)) for u, v in graph.edges() if u != v)
    up = rng.random(len(edges)) >= probability
    out = nx.Graph()
    out.add_nodes_from(graph.nodes())
    out.add_edges_from(e for e, ok in zip(edges, up, strict=True) if ok)
    return out, int((~up).sum())
