"""Codec benchmark: real payload bytes, ratio vs float32, error, encode/decode throughput.

Run `.venv/bin/python benchmarks/compression.py [--numel N] [--repeats R]`. Two workloads: a
Gaussian vector of N entries shaped as one N/1000 x 1000 matrix, and a real update delta (an
MLP on scikit-learn's digits after a few local SGD steps). Throughput is float32 megabytes of
input per second (1 MB = 1e6 bytes), best of `repeats`. Error is ||decode - x|| / ||x|| for one
encode from a fresh state, so error-feedback codecs show their first-round error only.
`codec_specs()` is the list of configurations, reusable by the end-to-end accuracy benchmark.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from koinon.compress import build_codec
from koinon.params import Entry, Layout


def codec_specs() -> list[tuple[str, dict]]:
    """(label, `[codec]` table) pairs; biased sparsifiers and quantizers come wrapped in `ef`."""
    topk = {"name": "topk", "ratio": 0.01}
    return [
        ("fp32", {"name": "identity"}),
        ("fp16", {"name": "fp16"}),
        ("bf16", {"name": "bf16"}),
        ("int8", {"name": "int8"}),
        ("int8/block256", {"name": "int8", "block": 256}),
        ("int4/block64", {"name": "int4"}),
        ("qsgd s=7", {"name": "qsgd", "levels": 7}),
        ("signsgd+ef", {"name": "signsgd"}),
        ("ef(topk 1%)", {"name": "ef", "inner": topk}),
        ("ef(topk 1% sampled)", {"name": "ef", "inner": topk | {"sampled": True}}),
        ("ef(randomk 1%)", {"name": "ef", "inner": {"name": "randomk", "ratio": 0.01}}),
        ("ef(threshold 1e-3)", {"name": "ef", "inner": {"name": "threshold", "threshold": 1e-3}}),
        ("ef21(topk 1%)", {"name": "ef21", "inner": topk}),
        ("econtrol(topk 1%)", {"name": "econtrol", "inner": topk}),
        ("dgc 0.1%", {"name": "dgc", "ratio": 0.001}),
        ("powersgd r=4", {"name": "powersgd", "rank": 4}),
        ("ef(fedzip)", {"name": "ef", "inner": {"name": "fedzip"}}),
        (
            "ef(zstd(topk 1% int8))",
            {"name": "ef", "inner": {"name": "zstd", "inner": topk | {"values": "int8"}}},
        ),
        (
            "ef(zstd(topk 0.1% int4))",
            {
                "name": "ef",
                "inner": {
                    "name": "zstd",
                    "inner": {"name": "topk", "ratio": 0.001, "values": "int4"},
                },
            },
        ),
    ]


def gaussian_workload(numel: int) -> tuple[Layout, torch.Tensor]:
    cols = 1000 if numel >= 1000 else numel
    layout = Layout((Entry("w", (numel // cols, cols), torch.float32, 0, True),))
    x = torch.randn(layout.numel, generator=torch.Generator().manual_seed(0))
    return layout, x


def mlp_delta_workload(steps: int = 20) -> tuple[Layout, torch.Tensor]:
    """Local params minus global params of a digits MLP after `steps` SGD steps."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    digits = load_digits()
    xs = torch.tensor(digits.data, dtype=torch.float32) / 16
    ys = torch.tensor(digits.target)
    model = nn.Sequential(
        nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )
    layout = Layout.from_module(model)
    start = layout.flatten(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(steps):
        batch = torch.arange(step * 32, step * 32 + 32) % len(xs)
        opt.zero_grad()
        nn.functional.cross_entropy(model(xs[batch]), ys[batch]).backward()
        opt.step()
    return layout, layout.flatten(model) - start


def _best_time(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def measure(label: str, spec: dict, layout: Layout, x: torch.Tensor, repeats: int) -> dict:
    options = {k: v for k, v in spec.items() if k != "name"}
    codec = build_codec(spec["name"], options, layout)
    state = codec.init_state()
    t_enc, (data, _) = _best_time(
        lambda: codec.encode(x, state, torch.Generator().manual_seed(0)), repeats
    )
    t_dec, y = _best_time(lambda: codec.decode(data), repeats)
    megabytes = 4 * x.numel() / 1e6
    return {
        "label": label,
        "bytes": len(data),
        "ratio": 4 * x.numel() / len(data),
        "rel_error": float((y - x).norm() / x.norm()),
        "encode_mb_s": megabytes / t_enc,
        "decode_mb_s": megabytes / t_dec,
    }


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(f"{'codec':<26}{'bytes':>12}{'ratio':>10}{'rel.err':>9}{'enc MB/s':>10}{'dec MB/s':>10}")
    for r in rows:
        print(
            f"{r['label']:<26}{r['bytes']:>12,}{r['ratio']:>9.1f}x{r['rel_error']:>9.3f}"
            f"{r['encode_mb_s']:>10.0f}{r['decode_mb_s']:>10.0f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    workloads = [
        (f"gaussian, P = {args.numel:,}", gaussian_workload(args.numel)),
        ("digits MLP delta", mlp_delta_workload()),
    ]
    for title, (layout, x) in workloads:
        rows = [measure(label, spec, layout, x, args.repeats) for label, spec in codec_specs()]
        print_table(f"{title} (P = {layout.numel:,}, {torch.get_num_threads()} threads)", rows)


if __name__ == "__main__":
    main()
