"""Column order statistics in generated C: a sorting network on SIMD vectors of 8 or 16 coordinates.

Why C: the coordinate-wise rules (median, trimmed mean, Meamed) sort n values per coordinate.
NumPy and torch sort along a row, so a `[n, P]` stack must first be transposed, and that copy
alone costs more than the sort. A comparator network sorts 16 (AVX-512) or 8 (AVX) adjacent coordinates at once
straight from the row-major stack, with no branch and no transpose. Neither NumPy nor torch
has such a kernel, and Numba does not vectorise min/max across two rows of one array, so we
generate it: for each n, Batcher's odd-even merge sort unrolled into AVX min/max instructions.

The library is compiled with the system C compiler (`$CC`, else `cc`) into a per-user cache
(`$KOINON_CACHE`, else `~/.cache/koinon`), keyed by the source, the flags and the CPU, so each
n is built once per machine (about a second for n = 50, some seconds for n in the hundreds).
Without a compiler or AVX, or with `KOINON_NATIVE=0`, `order_reduce` returns None and the callers use NumPy's sort: the same
selection, with sums in float64 on both paths, so results agree to rounding.

The distance-based rules need the `n x n` Gram matrix of the centred rows (`gram`) or only the
row norms (`row_sq_norms`). A general GEMM computes both triangles of the symmetric product and
needs the centred block written out first; the generated kernel centres a cache-sized block
once, then accumulates only the upper triangle in 4 x 4 register tiles of FMAs (SYRK-style:
half the flops of `x @ x.T`), and adds each block's float32 sums into float64. It is not
specialised per n, so one library serves every n.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

_FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-std=gnu11"]
MAX_N = 256  # a network of n inputs is about n log^2 n / 4 lines of C
MIN_COLUMNS = 16384  # below this NumPy's sort is cheap and a build would not pay off

# The kernel for one n; {n} and {network} are filled in. mode 0: per column, the mean of the
# sorted ranks lo..hi-1 (median, trimmed mean), summed in double. mode 1: the mean of the k
# values closest to the median (ties to the lower values), as Meamed. NaN would break the
# network's order: the call returns 1 and the caller falls back to NumPy.
_TEMPLATE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#define N {n}

/* L adjacent coordinates per vector: 16 with AVX-512, else 8 (AVX). */
#if defined(__AVX512F__)
typedef __m512 vf;
#define L 16
#define VLOAD _mm512_loadu_ps
#define VSTORE _mm512_storeu_ps
#define VMIN _mm512_min_ps
#define VMAX _mm512_max_ps
static inline int any_nan(vf v) {{ return _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) != 0; }}
#else
typedef __m256 vf;
#define L 8
#define VLOAD _mm256_loadu_ps
#define VSTORE _mm256_storeu_ps
#define VMIN _mm256_min_ps
#define VMAX _mm256_max_ps
static inline int any_nan(vf v) {{ return _mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)) != 0; }}
#endif

static inline void sort_network(vf *v) {{
    vf a, b;
{network}
}}

int koinon_order_reduce(const float *x, int64_t p, int64_t c_begin, int64_t c_end,
                        int32_t mode, int64_t lo, int64_t hi, int64_t k, float *out) {{
    vf v[N];
    float rows[N][L], lane_out[L];
    for (int64_t c = c_begin; c < c_end; c += L) {{
        int64_t width = c_end - c < L ? c_end - c : L;
        int nan = 0;
        for (int r = 0; r < N; r++) {{
            if (width == L) {{
                v[r] = VLOAD(x + r * p + c);
            }} else {{
                float tail[L] = {{0}};
                memcpy(tail, x + r * p + c, (size_t)width * sizeof(float));
                v[r] = VLOAD(tail);
            }}
            nan |= any_nan(v[r]);
        }}
        if (nan) return 1;
        sort_network(v);
        if (mode == 0) {{
            /* The mean of ranks lo..hi-1, summed in double, 4 lanes at a time. */
            for (int64_t r = lo; r < hi; r++) VSTORE(rows[r], v[r]);
            __m256d count = _mm256_set1_pd((double)(hi - lo));
            for (int h = 0; h < L; h += 4) {{
                __m256d s = _mm256_setzero_pd();
                for (int64_t r = lo; r < hi; r++) s = _mm256_add_pd(s, _mm256_cvtps_pd(_mm_loadu_ps(rows[r] + h)));
                _mm_storeu_ps(lane_out + h, _mm256_cvtpd_ps(_mm256_div_pd(s, count)));
            }}
        }} else {{
            /* The k nearest values form a window [s, s + k) of the sorted column. Order values
             * by (distance to the median, side), the left (lower) side first on equal
             * distance, as the reference does. A window is right iff the larger of its end
             * keys is at most the smaller key just outside it; two windows that both pass
             * differ only by equal values, so the first passing one is taken. No loop-carried
             * dependence: each start is tested on its own. In double, 4 lanes at a time. */
            for (int r = 0; r < N; r++) VSTORE(rows[r], v[r]);
            const __m256d sign = _mm256_set1_pd(-0.0);
            for (int h = 0; h < L; h += 4) {{
                __m256d d[N], value[N];
                for (int r = 0; r < N; r++) value[r] = _mm256_cvtps_pd(_mm_loadu_ps(rows[r] + h));
                __m256d med = _mm256_mul_pd(_mm256_add_pd(value[(N - 1) / 2], value[N / 2]),
                                            _mm256_set1_pd(0.5));
                for (int r = 0; r < N; r++) d[r] = _mm256_andnot_pd(sign, _mm256_sub_pd(value[r], med));
                __m256d found = _mm256_setzero_pd(), start = _mm256_setzero_pd();
                for (int64_t s = 0; s + k <= N; s++) {{
                    __m256d ok = _mm256_castsi256_pd(_mm256_set1_epi64x(-1));
                    int64_t inner[2] = {{s, s + k - 1}}, outer[2] = {{s - 1, s + k}};
                    for (int a = 0; a < 2; a++)
                        for (int b = 0; b < 2; b++) {{
                            int64_t in = inner[a], out_ = outer[b];
                            if (out_ < 0 || out_ >= N) continue;
                            /* key(in) <= key(out): nearer, or as near and not on a later side */
                            int side_ok = (in <= (N - 1) / 2) || (out_ > (N - 1) / 2);
                            __m256d le = side_ok ? _mm256_cmp_pd(d[in], d[out_], _CMP_LE_OQ)
                                                 : _mm256_cmp_pd(d[in], d[out_], _CMP_LT_OQ);
                            ok = _mm256_and_pd(ok, le);
                        }}
                    __m256d take = _mm256_andnot_pd(found, ok);
                    start = _mm256_blendv_pd(start, _mm256_set1_pd((double)s), take);
                    found = _mm256_or_pd(found, ok);
                }}
                __m256d total = _mm256_setzero_pd(), end = _mm256_add_pd(start, _mm256_set1_pd((double)k));
                for (int r = 0; r < N; r++) {{
                    __m256d at = _mm256_set1_pd((double)r);
                    __m256d inside = _mm256_and_pd(_mm256_cmp_pd(at, start, _CMP_GE_OQ),
                                                   _mm256_cmp_pd(at, end, _CMP_LT_OQ));
                    total = _mm256_add_pd(total, _mm256_and_pd(value[r], inside));
                }}
                _mm_storeu_ps(lane_out + h,
                              _mm256_cvtpd_ps(_mm256_div_pd(total, _mm256_set1_pd((double)k))));
            }}
        }}
        memcpy(out + c, lane_out, (size_t)width * sizeof(float));
    }}
    return 0;
}}
"""

# Gram matrix and row norms of `x - ref`, over a column range; built once for every n. ref is
# `center` when given, else the mean of each column over the rows. Blocks of B columns are
# centred into a scratch buffer (rows padded with zeros to a multiple of 4), then 4 x 4 tiles
# of the upper triangle accumulate FMAs in registers; each block's float32 sums are added
# into the caller's float64 output. AVX-512 where the CPU has it, else AVX2 (8 lanes).
_LINALG = r"""
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__)
typedef __m512 vec;
#define W 16
#define VLOAD _mm512_loadu_ps
#define VSTORE _mm512_storeu_ps
#define VZERO _mm512_setzero_ps
#define VSET1 _mm512_set1_ps
#define VADD _mm512_add_ps
#define VSUB _mm512_sub_ps
#define VMUL _mm512_mul_ps
#define VFMA _mm512_fmadd_ps
static inline float vsum(vec v) { return _mm512_reduce_add_ps(v); }
#else
typedef __m256 vec;
#define W 8
#define VLOAD _mm256_loadu_ps
#define VSTORE _mm256_storeu_ps
#define VZERO _mm256_setzero_ps
#define VSET1 _mm256_set1_ps
#define VADD _mm256_add_ps
#define VSUB _mm256_sub_ps
#define VMUL _mm256_mul_ps
#if defined(__FMA__)
#define VFMA _mm256_fmadd_ps
#else
#define VFMA(a, b, c) _mm256_add_ps(_mm256_mul_ps(a, b), c)
#endif
static inline float vsum(vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(s);
}
#endif

#define B 1024 /* columns per block: 52 rows x 1024 floats = 208 KB, in L2 */
#define T 4    /* tile side */

/* buf[r * B + j] = x[r, c + j] - ref[c + j] for j < width, 0 up to the next multiple of W
 * and on the padding rows n <= r < rows. */
static void centre_block(const float *x, int64_t n, int64_t p, int64_t c, int64_t width,
                         const float *center, float *buf, int64_t rows) {
    int64_t padded = (width + W - 1) / W * W;
    float inv = 1.0f / (float)n;
    for (int64_t j = 0; j < padded; j += W) {
        if (j + W <= width) {
            vec ref;
            if (center) {
                ref = VLOAD(center + c + j);
            } else {
                vec s = VZERO();
                for (int64_t r = 0; r < n; r++) s = VADD(s, VLOAD(x + r * p + c + j));
                ref = VMUL(s, VSET1(inv));
            }
            for (int64_t r = 0; r < n; r++) VSTORE(buf + r * B + j, VSUB(VLOAD(x + r * p + c + j), ref));
        } else {
            for (int64_t jj = j; jj < j + W; jj++) {
                if (jj >= width) {
                    for (int64_t r = 0; r < n; r++) buf[r * B + jj] = 0.0f;
                    continue;
                }
                float ref = 0.0f;
                if (center) {
                    ref = center[c + jj];
                } else {
                    for (int64_t r = 0; r < n; r++) ref += x[r * p + c + jj];
                    ref *= inv;
                }
                for (int64_t r = 0; r < n; r++) buf[r * B + jj] = x[r * p + c + jj] - ref;
            }
        }
    }
    for (int64_t r = n; r < rows; r++) memset(buf + r * B, 0, (size_t)padded * sizeof(float));
}

/* g[i * n + k] += sum over columns [c0, c1) of (x_i - ref)(x_k - ref), for i <= k only. */
int koinon_gram(const float *x, int64_t n, int64_t p, int64_t c0, int64_t c1,
                const float *center, double *g) {
    int64_t rows = (n + T - 1) / T * T;
    float *buf = aligned_alloc(64, (size_t)(rows * B) * sizeof(float));
    if (!buf) return 1;
    for (int64_t c = c0; c < c1; c += B) {
        int64_t width = c1 - c < B ? c1 - c : B;
        int64_t padded = (width + W - 1) / W * W;
        centre_block(x, n, p, c, width, center, buf, rows);
        for (int64_t ti = 0; ti < rows; ti += T) {
            for (int64_t tj = ti; tj < rows; tj += T) {
                vec acc[T][T];
#pragma GCC unroll 4
                for (int a = 0; a < T; a++)
#pragma GCC unroll 4
                    for (int b = 0; b < T; b++) acc[a][b] = VZERO();
                const float *ra = buf + ti * B, *rb = buf + tj * B;
                for (int64_t j = 0; j < padded; j += W) {
                    vec va[T], vb[T];
#pragma GCC unroll 4
                    for (int a = 0; a < T; a++) {
                        va[a] = VLOAD(ra + a * B + j);
                        vb[a] = VLOAD(rb + a * B + j);
                    }
#pragma GCC unroll 4
                    for (int a = 0; a < T; a++)
#pragma GCC unroll 4
                        for (int b = 0; b < T; b++) acc[a][b] = VFMA(va[a], vb[b], acc[a][b]);
                }
                for (int a = 0; a < T; a++)
                    for (int b = 0; b < T; b++) {
                        int64_t i = ti + a, k = tj + b;
                        if (i < n && k < n && i <= k) g[i * n + k] += (double)vsum(acc[a][b]);
                    }
            }
        }
    }
    free(buf);
    return 0;
}

/* out[i] += sum over columns [c0, c1) of (x_i - center)^2 (center may be NULL: zero). */
int koinon_sq_norms(const float *x, int64_t n, int64_t p, int64_t c0, int64_t c1,
                    const float *center, double *out) {
    for (int64_t i = 0; i < n; i++) {
        const float *row = x + i * p;
        for (int64_t c = c0; c < c1; c += B) {
            int64_t end = c1 - c < B ? c1 : c + B;
            vec acc0 = VZERO(), acc1 = VZERO();
            int64_t j = c;
            for (; j + 2 * W <= end; j += 2 * W) {
                vec d0 = VLOAD(row + j), d1 = VLOAD(row + j + W);
                if (center) {
                    d0 = VSUB(d0, VLOAD(center + j));
                    d1 = VSUB(d1, VLOAD(center + j + W));
                }
                acc0 = VFMA(d0, d0, acc0);
                acc1 = VFMA(d1, d1, acc1);
            }
            double total = (double)vsum(VADD(acc0, acc1));
            for (; j < end; j++) {
                /* float32 like the vector body, so one huge entry overflows alike anywhere */
                float d = row[j] - (center ? center[j] : 0.0f);
                total += (double)(d * d);
            }
            out[i] += total;
        }
    }
    return 0;
}
"""


def sorting_network(n: int) -> list[tuple[int, int]]:
    """Comparator pairs of Batcher's odd-even merge sort for n inputs (403 for n = 50).

    Built for the next power of two and pruned: a comparator that touches an index >= n would
    compare against a +inf pad and never swap.
    """
    m = 1
    while m < n:
        m *= 2
    pairs = []
    p = 1
    while p < m:
        k = p
        while k >= 1:
            for j in range(k % p, m - k, 2 * k):
                for i in range(min(k, m - j - k)):
                    a, b = i + j, i + j + k
                    if a // (2 * p) == b // (2 * p) and b < n:
                        pairs.append((a, b))
            k //= 2
        p *= 2
    return pairs


def rank_network(n: int, lo: int, hi: int) -> list[tuple[int, int]]:
    """Comparators that leave the lo smallest values on wires [0, lo), the n - hi largest on
    [hi, n) and the rest in between, each group in any order: all a rank-window mean needs.

    When each half holds both tails (n // 2 >= lo + n - hi, as in a trimmed mean with f <= n/4)
    the halves are sorted on their own and their tails merged by half-cleaners: the lo smallest
    of all are the lo smallest of the two halves' lo smallest, min(a_i, b_{lo-1-i}) on sorted
    a, b; the values in a half's middle are in the overall middle and need no further
    comparison. Then every comparator whose two wires can only end in the same group is dropped
    (backwards, so the ones it feeds are known). n = 50, f = 10: 294 comparators, not 403.
    """
    top = n - hi
    half = n // 2
    if lo + top == 0:
        return []
    if half >= lo + top:
        pairs = sorting_network(half) + [(a + half, b + half) for a, b in sorting_network(n - half)]
        pairs += [(i, half + lo - 1 - i) for i in range(lo)]
        pairs += [(half - top + i, n - 1 - i) for i in range(top)]
    else:
        pairs = sorting_network(n)
    # groups[w]: the groups a value on wire w can still end in, given the kept comparators after.
    groups = [frozenset([0 if w < lo else 1 if w < hi else 2]) for w in range(n)]
    kept = []
    for i, j in reversed(pairs):
        if len(groups[i]) == 1 and groups[i] == groups[j]:
            continue  # both values end in one group whichever way they go
        groups[i] = groups[j] = groups[i] | groups[j]
        kept.append((i, j))
    return kept[::-1]


def _cpu_key() -> str:
    # -march=native code must not be reused on a CPU with other instructions (shared homes).
    try:
        with open("/proc/cpuinfo") as info:
            return next((line for line in info if line.startswith("flags")), "")
    except OSError:
        return ""


def _source(n: int, lo: int, hi: int) -> str:
    # lo < 0: a full sort (Meamed reads the whole sorted column); else only the rank groups.
    pairs = sorting_network(n) if lo < 0 else rank_network(n, lo, hi)
    network = "\n".join(
        f"    a = v[{i}]; b = v[{j}]; v[{i}] = VMIN(a, b); v[{j}] = VMAX(a, b);"
        for i, j in pairs
    )
    return _TEMPLATE.format(n=n, network=network)


def _build(compiler: str, source: str, cache_dir: Path, target: Path) -> Path:
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Write and build under temporary names, then rename: processes building the same kernel
    # at once never load a half-written library.
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        c_file = Path(tmp) / "order.c"
        c_file.write_text(source)
        built = Path(tmp) / "order.so"
        subprocess.run(
            [compiler, *_FLAGS, "-o", str(built), str(c_file)],
            check=True,
            capture_output=True,
            timeout=300,
        )
        os.replace(built, target)
    return target


def _library(stem: str, source: str, what: str) -> Any:
    """The compiled `source` (built once into the cache), or None with a warning naming `what`."""
    if os.environ.get("KOINON_NATIVE", "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        return None
    key = hashlib.sha256((source + " ".join(_FLAGS) + _cpu_key()).encode()).hexdigest()[:16]
    cache_dir = Path(os.environ.get("KOINON_CACHE", Path.home() / ".cache" / "koinon"))
    target = cache_dir / f"{stem}-{key}.so"
    try:
        try:
            return ctypes.CDLL(str(_build(compiler, source, cache_dir, target)))
        except OSError:
            # A cached library that does not load (truncated by a full disk, say) is rebuilt once.
            target.unlink(missing_ok=True)
            return ctypes.CDLL(str(_build(compiler, source, cache_dir, target)))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", b"") or b""
        reason = detail.decode(errors="replace").strip().splitlines()[:1] or [str(error)]
        warnings.warn(f"koinon: no C {what} ({reason[0]})", RuntimeWarning, stacklevel=5)
        return None


@cache
def _kernel(n: int, lo: int = -1, hi: int = -1) -> Any:
    lib = _library(
        f"order-n{n}-{lo}-{hi}",
        _source(n, lo, hi),
        f"order-statistics kernel for n = {n}; using NumPy's sort",
    )
    if lib is None:
        return None
    fn = lib.koinon_order_reduce
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, i64, i64, i64, ctypes.c_int32, i64, i64, i64, ptr]
    fn.restype = ctypes.c_int
    return fn


@cache
def _linalg() -> Any:
    lib = _library("linalg", _LINALG, "Gram kernel; using torch")
    if lib is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for fn in (lib.koinon_gram, lib.koinon_sq_norms):
        fn.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr]
        fn.restype = ctypes.c_int
    return lib


# Columns per thread-pool task of the Gram and norm kernels (a multiple of the C block, 1024).
_LINALG_STEP = 64 * 1024


def _column_reduce(
    name: str, x: np.ndarray, center: np.ndarray | None, shape: tuple[int, ...],
    map_fn: Callable[..., Any],
) -> np.ndarray | None:
    n, p = x.shape
    if x.dtype != np.float32 or p < MIN_COLUMNS or n < 1:
        return None
    if center is not None and (center.dtype != np.float32 or center.shape != (p,)):
        return None
    lib = _linalg()
    if lib is None:
        return None
    fn = getattr(lib, name)
    x = np.ascontiguousarray(x)
    center_keep = None if center is None else np.ascontiguousarray(center)
    c_ptr = None if center_keep is None else center_keep.ctypes.data

    # At most 8 tasks: enough to even out the threads, few partial n x n sums to hold.
    step = max(_LINALG_STEP, -(-p // 8 // 1024) * 1024)

    def work(start: int) -> np.ndarray:
        part = np.zeros(shape, dtype=np.float64)
        code = fn(x.ctypes.data, n, p, start, min(p, start + step), c_ptr, part.ctypes.data)
        if code:
            raise MemoryError(f"koinon: {name} could not allocate its block buffer")
        return part

    return np.sum(list(map_fn(work, range(0, p, step))), axis=0)


def gram(
    x: np.ndarray, center: np.ndarray | None, map_fn: Callable[..., Any]
) -> np.ndarray | None:
    """Float64 Gram matrix of the rows of `x - ref` (`ref`: `center`, else each column's mean),
    or None when the kernel does not apply (dtype, P below MIN_COLUMNS, no compiler)."""
    n = x.shape[0]
    upper = _column_reduce("koinon_gram", x, center, (n, n), map_fn)
    if upper is None:
        return None
    return upper + np.triu(upper, 1).T


def row_sq_norms(
    x: np.ndarray, center: np.ndarray | None, map_fn: Callable[..., Any]
) -> np.ndarray | None:
    """Float64 squared norms of the rows of `x - center` (`center` None: of `x`), or None."""
    return _column_reduce("koinon_sq_norms", x, center, (x.shape[0],), map_fn)


def order_reduce(
    x: np.ndarray, mode: int, lo: int, hi: int, k: int, map_fn: Callable[..., Any]
) -> np.ndarray | None:
    """Per column of `x [n, P]`: mean of sorted ranks lo..hi-1 (mode 0) or of the k values
    nearest the median (mode 1). None when the kernel does not apply (dtype, n, P, no
    compiler) or a NaN is present; the caller then sorts with NumPy.

    Column ranges run through `map_fn` (the callers' thread pool): ctypes releases the GIL.
    """
    n, p = x.shape
    if x.dtype != np.float32 or not 2 <= n <= MAX_N or p < MIN_COLUMNS:
        return None
    fn = _kernel(n, lo, hi) if mode == 0 else _kernel(n)
    if fn is None:
        return None
    x = np.ascontiguousarray(x)
    out = np.empty(p, dtype=np.float32)
    step = 8 * 4096  # columns per task: many tasks even out the threads
    starts = range(0, p, step)

    def work(start: int) -> int:
        end = min(p, start + step)
        return int(fn(x.ctypes.data, p, start, end, mode, lo, hi, k, out.ctypes.data))

    codes = list(map_fn(work, starts))
    return None if any(codes) else out
