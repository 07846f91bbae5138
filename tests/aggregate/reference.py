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
