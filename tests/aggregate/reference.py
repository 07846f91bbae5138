"""Straightforward float64 implementations of the robust rules, written from the papers.

They loop and materialise differences exactly as the definitions read, with none of the Gram
matrix or blocked-sort tricks of `koinon.aggregate`; the tests check the fast rules against them.
"""

from __future__ import annotations

import numpy as np


def median(x: np.ndarray) -> np.ndarray:
    return np.median(x, axis=0)


def trimmed_mean(x: np.ndarray, f: int) -> np.ndarray:
    n = len(x)
    return np.sort(x, axis=0)[f : n - f].mean(axis=0)


def meamed(x: np.ndarray, f: int) -> np.ndarray:
    n, p = x.shape
    med = np.median(x, axis=0)
    out = np.empty(p)
    for j in range(p):
        # Stable order on (distance, value) makes ties go to the lower value, as documented.
        order = sorted(range(n), key=lambda i: (abs(x[i, j] - med[j]), x[i, j]))
        out[j] = x[order[: n - f], j].mean()
    return out


def sq_dist(x: np.ndarray) -> np.ndarray:
    return np.array([[np.sum((a - b) ** 2) for b in x] for a in x])


def krum_scores(x: np.ndarray, f: int) -> np.ndarray:
    n = len(x)
    d = sq_dist(x)
    return np.array([np.sort(np.delete(d[i], i))[: n - f - 2].sum() for i in range(n)])


def krum(x: np.ndarray, f: int) -> np.ndarray:
    return x[np.argmin(krum_scores(x, f))]


def multi_krum(x: np.ndarray, f: int, m: int) -> np.ndarray:
    return x[np.argsort(krum_scores(x, f), kind="stable")[:m]].mean(axis=0)


def bulyan(x: np.ndarray, f: int) -> np.ndarray:
    n = len(x)
    remaining = list(range(n))
    selected = []
    for _ in range(n - 2 * f):
        sub = x[remaining]
        scores = krum_scores(sub, f)
        # Exact ties (few neighbours late on) go to the input closest to all remaining ones.
        order = np.lexsort((sq_dist(sub).sum(1), np.round(scores, 9)))
        selected.append(remaining.pop(int(order[0])))
    return meamed(x[sorted(selected)], 2 * f)


def monna(x: np.ndarray, f: int, pivot: int) -> np.ndarray:
    d = np.array([np.sum((a - x[pivot]) ** 2) for a in x])
    return x[np.argsort(d, kind="stable")[: len(x) - f]].mean(axis=0)


def nnm(x: np.ndarray, f: int) -> np.ndarray:
    d = sq_dist(x)
    return np.stack([x[np.argsort(row, kind="stable")[: len(x) - f]].mean(axis=0) for row in d])


def geometric_median(x: np.ndarray, iters: int, nu: float) -> np.ndarray:
    z = x.mean(axis=0)
    for _ in range(iters):
        w = 1.0 / np.maximum(np.linalg.norm(x - z, axis=1), nu)
        z = (w[:, None] * x).sum(axis=0) / w.sum()
    return z


def centered_clipping(x: np.ndarray, center: np.ndarray, tau: float, iters: int) -> np.ndarray:
    v = center.copy()
    for _ in range(iters):
        diff = x - v
        scale = np.minimum(1.0, tau / np.linalg.norm(diff, axis=1))
        v = v + (scale[:, None] * diff).mean(axis=0)
    return v


def caf(x: np.ndarray, f: int) -> np.ndarray:
    n = len(x)
    c = np.ones(n)
    best, best_val = None, np.inf
    while c.sum() > n - 2 * f:
        mu = (c[:, None] * x).sum(axis=0) / c.sum()
        diffs = x - mu
        cov = (c[:, None, None] * np.einsum("ni,nj->nij", diffs, diffs)).sum(axis=0) / c.sum()
        vals, vecs = np.linalg.eigh(cov)
        if vals[-1] < best_val:
            best, best_val = mu, vals[-1]
        tau = (diffs @ vecs[:, -1]) ** 2
        c = np.maximum(c * (1 - tau / tau[c > 0].max()), 0)
    return best


def fltrust(x: np.ndarray, g0: np.ndarray) -> np.ndarray:
    total, trust_sum = np.zeros_like(g0), 0.0
    for xi in x:
        cos = xi @ g0 / (np.linalg.norm(xi) * np.linalg.norm(g0))
        trust = max(cos, 0.0)
        total += trust * xi * np.linalg.norm(g0) / np.linalg.norm(xi)
        trust_sum += trust
    return total / trust_sum


def clip(x: np.ndarray, c: float) -> np.ndarray:
    return np.stack([xi * min(1.0, c / np.linalg.norm(xi)) for xi in x])


def arc(x: np.ndarray, f: int) -> np.ndarray:
    n = len(x)
    k = int(2 * f / n * (n - f))
    norms = np.linalg.norm(x, axis=1)
    order = np.argsort(-norms, kind="stable")
    out = x.copy()
    if k:
        threshold = norms[order[k]]
        for i in order[:k]:
            out[i] = x[i] * threshold / norms[i]
    return out


def signguard(x: np.ndarray, lower: float = 0.1, upper: float = 3.0) -> np.ndarray:
    """SignGuard on all coordinates, clustering with scikit-learn's MeanShift as the authors."""
    from sklearn.cluster import MeanShift, estimate_bandwidth

    norms = np.linalg.norm(x, axis=1)
    med = np.median(norms)
    by_norm = (norms > lower * med) & (norms < upper * med)
    signs = np.sign(x)
    features = np.stack([(signs == s).mean(axis=1) for s in (1, 0, -1)], axis=1)
    features = features / (features.max(axis=0) + 1e-8)
    bandwidth = estimate_bandwidth(features, quantile=0.5)
    labels = MeanShift(bandwidth=bandwidth, cluster_all=False).fit(features).labels_
    sizes = [np.sum(labels == c) for c in range(labels.max() + 1)]
    kept = np.flatnonzero(by_norm & (labels == np.argmax(sizes)))
    if len(kept) == 0:
        return np.zeros(x.shape[1])
    return (x[kept] * np.minimum(1.0, med / norms[kept])[:, None]).mean(axis=0)


def flag(x: np.ndarray, rank: int, lam: float, iterations: int) -> np.ndarray:
    """Flag median by IRLS in the full space (SVD of all weighted columns), as `irls_flag`."""
    n = len(x)
    norms = np.linalg.norm(x, axis=1)
    v = x / np.maximum(norms, 1e-12)[:, None]

    def sq_sine(y: np.ndarray | None, u: np.ndarray) -> float:
        return 1.0 - (0.0 if y is None else float(np.sum((y.T @ u) ** 2)))

    def objective(y: np.ndarray) -> float:
        return sum(np.sqrt(max(sq_sine(y, vi), 0.0)) for vi in v)

    y, previous, err, diff = None, None, float(n), 1.0
    for _ in range(iterations):
        if diff <= 1e-10 or err <= 1e-10:
            break
        columns = [(abs(sq_sine(y, vi)) + 1e-7) ** -0.25 * vi for vi in v]
        if lam > 0:
            for i in range(n):
                for j in range(n):
                    if i != j:
                        w = (abs(sq_sine(y, v[i] - v[j])) + 1e-7) ** -0.25 * lam / (n * (n - 1))
                        columns.append(w * (v[i] - v[j]))
        new = np.linalg.svd(np.stack(columns, axis=1), full_matrices=False)[0][:, :rank]
        new_err = objective(new)
        diff = err - new_err
        previous, y, err = y, new, new_err
    if diff <= 0:
        y = previous
    if y is None:
        return np.zeros(x.shape[1])
    return np.median(norms) * np.mean([y @ (y.T @ vi) for vi in v], axis=0)
