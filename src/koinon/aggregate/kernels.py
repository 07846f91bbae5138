"""Fast kernels shared by the robust rules: column-wise order statistics and the Gram matrix.

Two facts make robust aggregation cheap on a `[n, P]` stack with small n and huge P:

* Order statistics per coordinate need a sort of n values per column. `torch.sort` tracks
  indices and is slow on such short columns; NumPy's SIMD sort (x86-simd-sort) is about 5x
  faster. We sort cache-sized column blocks on a few threads (NumPy releases the GIL) and reduce
  each block right away, so no sorted copy of the whole stack is ever materialised.
* Every distance-based rule (Krum, Bulyan, NNM, geometric median, CAF, ...) only needs the
  `n x n` Gram matrix: the outputs are combinations `c @ updates` of the inputs. One pass over
  the data builds it; afterwards the rules work on `n x n` matrices and finish with one matmul.
  The Gram matrix is accumulated over column blocks in float64 after subtracting a centre, so
  that distances between nearby inputs do not drown in float32 cancellation.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

# Coordinates per block: 8192 x 50 float32 is 1.6 MB, which stays in a core's L2/L3 while sorted.
_SORT_BLOCK = 8192
# Columns per block for the Gram matrix: large enough for an efficient GEMM per block.
_GRAM_BLOCK = 16384

_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(
            max_workers=max(1, min(torch.get_num_threads(), os.cpu_count() or 1))
        )
    return _POOL


def _numpy_ok(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)


def sorted_reduce(
    x: torch.Tensor, reduce: Callable[[Any], Any], out_dtype: torch.dtype
) -> torch.Tensor:
    """Apply `reduce` to blocks of coordinates sorted across inputs; concatenate the results.

    `reduce` gets a block `[C, n]` (one row per coordinate, sorted ascending; a NumPy array on
    CPU, otherwise a torch tensor) and returns `[C]`. The transposed copy makes each row
    contiguous, which is what NumPy's SIMD sort needs to be fast and to release the GIL, so the
    independent blocks run in parallel on a thread pool.
    """
    n, p = x.shape
    x = x.detach()
    if not _numpy_ok(x):
        # Accelerators and exotic dtypes: torch's sort is the portable path.
        return torch.as_tensor(reduce(x.T.sort(dim=1).values)).to(out_dtype)
    arr = x.contiguous().numpy()
    out = np.empty(p, dtype=torch.empty((), dtype=out_dtype).numpy().dtype)

    def work(start: int) -> None:
        block = np.sort(arr[:, start : start + _SORT_BLOCK].T.copy(), axis=1)
        out[start : start + block.shape[0]] = reduce(block)

    list(_pool().map(work, range(0, p, _SORT_BLOCK)))
    return torch.from_numpy(out)


def sorted_rows_mean(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Per coordinate, the mean of the order statistics `lo..hi-1` (median, trimmed mean)."""
    return sorted_reduce(x, lambda block: block[:, lo:hi].mean(1), x.dtype)


def coordinate_median(x: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median; the average of the two middle values for even n (as NumPy)."""
    n = x.shape[0]
    return sorted_rows_mean(x, (n - 1) // 2, n // 2 + 1)


def median_of(values: torch.Tensor) -> torch.Tensor:
    """Median of a small 1-D tensor, averaging the two middle values for even n (as NumPy)."""
    s = values.sort().values
    n = len(s)
    return (s[(n - 1) // 2] + s[n // 2]) / 2


def nearest_window_mean(block: Any, k: int) -> Any:
    """Per row of a sorted block `[C, n]`: mean of the k values closest to the row's median.

    The k values closest to any point form a contiguous window of the sorted row, so we only
    compare the n-k+1 windows by their radius around the median (ties: the lowest window).
    Works on NumPy arrays and torch tensors alike.
    """
    n = block.shape[1]
    is_np = isinstance(block, np.ndarray)
    med = (block[:, (n - 1) // 2] + block[:, n // 2]) / 2
    starts = n - k + 1
    left = med[:, None] - block[:, :starts]
    right = block[:, k - 1 :] - med[:, None]
    radius = np.maximum(left, right) if is_np else torch.maximum(left, right)
    best: Any = radius.argmin(1)[:, None]
    csum: Any
    take: Callable[..., Any]
    if is_np:
        csum = np.zeros((block.shape[0], n + 1), dtype=np.float64)
        np.cumsum(block, axis=1, dtype=np.float64, out=csum[:, 1:])
        take = np.take_along_axis
    else:
        csum = torch.nn.functional.pad(block.double().cumsum(1), (1, 0))
        take = torch.take_along_dim
    total = take(csum, best + k, 1) - take(csum, best, 1)
    return total[:, 0] / k


def meamed_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """Per coordinate, the mean of the k values closest to the coordinate-wise median."""
    return sorted_reduce(x, lambda block: nearest_window_mean(block, k), x.dtype)


def gram(x: torch.Tensor, center: torch.Tensor | None = None) -> torch.Tensor:
    """Float64 Gram matrix of the rows of `x - center` (`center` defaults to the row mean).

    Distances and convex combinations do not depend on the centre, and centring keeps the
    float32 block products accurate. Callers that need the rows relative to a specific point
    (centered clipping) pass it.
    """
    x = x.detach()
    n, p = x.shape
    g = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    for start in range(0, p, _GRAM_BLOCK):
        block = x[:, start : start + _GRAM_BLOCK]
        ref = block.mean(0) if center is None else center[start : start + _GRAM_BLOCK].to(x.dtype)
        block = block - ref
        g += (block @ block.T).double()
    return g


def sq_distances_from_gram(g: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances from a Gram matrix (clamped at 0, exact 0 diagonal)."""
    diag = g.diagonal()
    d2 = (diag[:, None] + diag[None, :] - (g + g.T)).clamp_min(0)  # exactly symmetric
    d2.fill_diagonal_(0)
    return d2


def pairwise_sq_distances(x: torch.Tensor) -> torch.Tensor:
    """`[n, n]` float64 squared distances between the rows of `x`, in one pass over the data."""
    return sq_distances_from_gram(gram(x))


def combine(coefficients: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`coefficients @ x` in the dtype of `x` (one matmul; the single output pass)."""
    return coefficients.to(x.dtype) @ x


def row_sq_norms(x: torch.Tensor, center: torch.Tensor | None = None) -> torch.Tensor:
    """Float64 squared norms of the rows of `x - center`, in one blocked pass (no full copy)."""
    # Blocks keep the float64 accumulation without a float64 copy of the whole stack.
    x = x.detach()
    n, p = x.shape
    out = torch.zeros(n, dtype=torch.float64, device=x.device)
    for start in range(0, p, _GRAM_BLOCK):
        block = x[:, start : start + _GRAM_BLOCK]
        if center is not None:
            block = block - center[start : start + _GRAM_BLOCK]
        out += torch.linalg.vector_norm(block, dim=1).double() ** 2
    return out
