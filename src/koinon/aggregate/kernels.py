"""Fast kernels shared by the robust rules: column-wise order statistics and the Gram matrix.

Two facts make robust aggregation cheap on a `[n, P]` stack with small n and huge P:

* Order statistics per coordinate need a sort of n values per column. On large float32
  stacks a generated C sorting network (`native`) sorts 8 columns per SIMD instruction with no
  transpose. Otherwise `torch.sort` tracks indices and is slow on such short columns, and
  NumPy's SIMD sort (x86-simd-sort) is about 5x faster: we sort cache-sized column blocks on a
  few threads (NumPy releases the GIL) and reduce each block right away, so no sorted copy of
  the whole stack is ever materialised.
* Every distance-based rule (Krum, Bulyan, NNM, geometric median, CAF, ...) only needs the
  `n x n` Gram matrix: the outputs are combinations `c @ updates` of the inputs. One pass over
  the data builds it; afterwards the rules work on `n x n` matrices and finish with one matmul.
  The Gram matrix is accumulated over column blocks in float64 after subtracting a centre, so
  that distances between nearby inputs do not drown in float32 cancellation. On large float32
  stacks a generated C kernel (`native.gram`) does it with half the flops of `x @ x.T`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from koinon.aggregate import native

# Coordinates per block: 8192 x 50 float32 is 1.6 MB, which stays in a core's L2/L3 while sorted.
_SORT_BLOCK = 8192
# Columns per block for the Gram matrix: large enough for an efficient GEMM per block, small
# enough (50 x 8192 float32 = 1.6 MB) that the centred copy is still in cache for the GEMM.
_GRAM_BLOCK = 8192

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


def _native(x: torch.Tensor, mode: int, lo: int, hi: int, k: int) -> torch.Tensor | None:
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return None
    out = native.order_reduce(x.detach().contiguous().numpy(), mode, lo, hi, k, _pool().map)
    return None if out is None else torch.from_numpy(out)


def _native_columns(
    kernel: Callable[..., Any], x: torch.Tensor, center: torch.Tensor | None
) -> torch.Tensor | None:
    """A `native` column kernel (Gram matrix, row norms) on a CPU float32 stack, else None."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return None
    ref = None
    if center is not None:
        if center.device.type != "cpu":
            return None
        ref = center.detach().to(torch.float32).contiguous().numpy()
    out = kernel(x.contiguous().numpy(), ref, _pool().map)
    return None if out is None else torch.from_numpy(out)


def sorted_rows_mean(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Per coordinate, the mean of the order statistics `lo..hi-1` (median, trimmed mean)."""
    fast = _native(x, 0, lo, hi, 0)
    if fast is not None:
        return fast
    # Summed in float64 like the C kernel, so both paths agree to rounding (and huge finite
    # values do not overflow a float32 sum).
    return sorted_reduce(x, lambda block: _rank_mean(block, lo, hi), x.dtype)


def _rank_mean(block: Any, lo: int, hi: int) -> Any:
    if isinstance(block, np.ndarray):
        return block[:, lo:hi].mean(1, dtype=np.float64)
    return block[:, lo:hi].double().mean(1)


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

    Ties in distance go to the lower values. The k nearest values form a contiguous window of
    the sorted row; it is grown from the middle, taking the nearer of the next value on the
    left and on the right (the left, lower one on a tie). Both sides move away from the median,
    so this merge takes exactly the k nearest, also with repeated values, where comparing the
    windows' radii alone would not. Distances in float64, where float32 differences are exact.
    Works on NumPy arrays and torch tensors alike.
    """
    n = block.shape[1]
    rows = block.shape[0]
    if isinstance(block, np.ndarray):
        wide = block.astype(np.float64)
        med = (wide[:, (n - 1) // 2] + wide[:, n // 2]) / 2
        left = np.full(rows, (n - 1) // 2)
        right = left + 1
        index = np.arange(rows)
        for _ in range(k):
            lval = wide[index, np.maximum(left, 0)]
            rval = wide[index, np.minimum(right, n - 1)]
            go_left = (right >= n) | ((left >= 0) & (med - lval <= rval - med))
            left = left - go_left
            right = right + ~go_left
        # Sum the window itself: a difference of prefix sums would let one huge value outside
        # the window (a Byzantine -1e17) wipe out the honest values inside it.
        cols = np.arange(n)
        inside = (cols > left[:, None]) & (cols < right[:, None])
        return np.where(inside, wide, 0.0).sum(1) / k
    wide_t = block.double()
    med_t = (wide_t[:, (n - 1) // 2] + wide_t[:, n // 2]) / 2
    left_t = torch.full((rows,), (n - 1) // 2, dtype=torch.long, device=block.device)
    right_t = left_t + 1
    index_t = torch.arange(rows, device=block.device)
    for _ in range(k):
        lval_t = wide_t[index_t, left_t.clamp_min(0)]
        rval_t = wide_t[index_t, right_t.clamp_max(n - 1)]
        go = (right_t >= n) | ((left_t >= 0) & (med_t - lval_t <= rval_t - med_t))
        left_t = left_t - go.long()
        right_t = right_t + (~go).long()
    cols_t = torch.arange(n, device=block.device)
    inside_t = (cols_t > left_t[:, None]) & (cols_t < right_t[:, None])
    return torch.where(inside_t, wide_t, 0.0).sum(1) / k


def meamed_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """Per coordinate, the mean of the k values closest to the coordinate-wise median."""
    fast = _native(x, 1, 0, 0, k)
    if fast is not None:
        return fast
    return sorted_reduce(x, lambda block: nearest_window_mean(block, k), x.dtype)


def gram(x: torch.Tensor, center: torch.Tensor | None = None) -> torch.Tensor:
    """Float64 Gram matrix of the rows of `x - center` (`center` defaults to the row mean).

    Distances and convex combinations do not depend on the centre, and centring keeps the
    float32 block products accurate. Callers that need the rows relative to a specific point
    (centered clipping) pass it.
    """
    x = x.detach()
    n, p = x.shape
    fast = _native_columns(native.gram, x, center)
    if fast is not None:
        return fast
    g = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    # Reused block buffers: a fresh `block - ref` per block costs more in page faults than the
    # subtraction itself. The row mean of a block is a [1, n] @ [n, C] product (one read).
    width = min(p, _GRAM_BLOCK)
    buf = torch.empty(n, width, dtype=x.dtype, device=x.device)
    mean_row = torch.full((1, n), 1.0 / n, dtype=x.dtype, device=x.device)
    for start in range(0, p, _GRAM_BLOCK):
        block = x[:, start : start + _GRAM_BLOCK]
        c = block.shape[1]
        if center is None:
            ref = mean_row @ block
        else:
            ref = center[start : start + c].to(x.dtype)
        centred = torch.sub(block, ref, out=buf[:, :c])
        g += (centred @ centred.T).double()
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


def new_stack(rows: int, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised `[rows, P]` output for a stack like `like`.

    On CPU the memory comes from NumPy, which asks the kernel for huge pages on large arrays:
    torch's allocator takes a page fault per 4 KB of a fresh 200 MB stack, which doubled the
    time of NNM, bucketing and clipping (their outputs are whole stacks).
    """
    if like.device.type != "cpu" or like.dtype not in (torch.float32, torch.float64):
        return torch.empty(rows, like.shape[1], dtype=like.dtype, device=like.device)
    dtype = np.float32 if like.dtype == torch.float32 else np.float64
    return torch.from_numpy(np.empty((rows, like.shape[1]), dtype=dtype))


def combine(coefficients: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`coefficients @ x` in the dtype of `x` (one matmul; the single output pass)."""
    c = coefficients.to(x.dtype)
    if c.dim() == 1 or x.requires_grad or x.device.type != "cpu":
        return c @ x
    return torch.mm(c, x, out=new_stack(c.shape[0], x))


def row_sq_norms(x: torch.Tensor, center: torch.Tensor | None = None) -> torch.Tensor:
    """Float64 squared norms of the rows of `x - center`, in one blocked pass (no full copy)."""
    # Blocks keep the float64 accumulation without a float64 copy of the whole stack.
    x = x.detach()
    n, p = x.shape
    fast = _native_columns(native.row_sq_norms, x, center)
    if fast is not None:
        return fast
    out = torch.zeros(n, dtype=torch.float64, device=x.device)
    buf = torch.empty(n, min(p, _GRAM_BLOCK), dtype=x.dtype, device=x.device)
    for start in range(0, p, _GRAM_BLOCK):
        block = x[:, start : start + _GRAM_BLOCK]
        if center is not None:
            c = block.shape[1]
            block = torch.sub(block, center[start : start + c], out=buf[:, :c])
        out += torch.linalg.vector_norm(block, dim=1).double() ** 2
    return out
