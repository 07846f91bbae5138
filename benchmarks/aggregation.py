"""Speed of the aggregators on n = 50 inputs of dimension 1,000,000 (float32), median of 5.

Prints each rule's time next to the ByzFL 0.0.11 figure from issue 5 (the goal is 5x faster),
and the peak memory it needs beyond the input stack. Each rule runs in its own subprocess so
the peak resident set (VmHWM) is the rule's own. `--quick` uses P = 100,000.

    .venv/bin/python benchmarks/aggregation.py [--quick] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

N, F = 50, 10
# ByzFL 0.0.11 on n = 50, P = 1e6, median of 5 (issue 5); None: no ByzFL figure.
BYZFL_MS = {
    "mean": 13,
    "median": 770,
    "trimmed_mean": 160,
    "geometric_median": 350,
    "krum": 400,
    "multi_krum": 520,
    "centered_clipping": 100,
    "nnm": 4000,
    "meamed": 1700,
    "bulyan": None,
    "monna": None,
    "caf": None,
    "fltrust": None,
    "signguard": None,
    "flag": None,
    "clipping": None,
    "arc": None,
    "bucketing": None,
    "nnm+trimmed_mean": None,
}


def _vm_hwm_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _child(name: str, p: int, repeats: int, threads: int) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)

    from koinon.aggregate import PRE_AGGREGATORS, build_aggregator

    updates = torch.randn(N, p, generator=torch.Generator().manual_seed(0))
    weights = torch.ones(N)
    if name in PRE_AGGREGATORS:
        step = build_aggregator(f"{name}+mean", {}, num_byzantine=F).steps[0]  # type: ignore[attr-defined]
        run = lambda: step.transform(updates, weights)  # noqa: E731
    else:
        rule = build_aggregator(name, {}, num_byzantine=F)
        if name == "fltrust":
            rule.set_reference(updates[:5].mean(0))  # type: ignore[attr-defined]
        run = lambda: rule.aggregate(updates, weights)  # noqa: E731
    baseline = _vm_hwm_mb()
    run()  # warm-up: thread pools, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    print(json.dumps({"ms": 1e3 * statistics.median(times), "peak_mb": _vm_hwm_mb() - baseline}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="P = 100,000 instead of 1,000,000")
    parser.add_argument("--only", nargs="*", default=None, help="aggregator names to run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (0: default); 1 on a busy machine"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    p = 100_000 if args.quick else 1_000_000
    if args.child:
        _child(args.child, p, args.repeats, args.threads)
        return
    names = args.only or list(BYZFL_MS)
    print(
        f"n = {N}, P = {p:,}, f = {F}, float32, median of {args.repeats}, threads {args.threads or 'default'}"
    )
    print(f"{'aggregator':<20}{'ours ms':>10}{'ByzFL ms':>10}{'speedup':>9}{'peak MB':>9}")
    for name in names:
        cmd = [sys.executable, __file__, "--child", name, "--repeats", str(args.repeats)]
        cmd += ["--threads", str(args.threads)]
        if args.quick:
            cmd.append("--quick")
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{name:<20} failed: {out.stderr.strip().splitlines()[-1]}")
            continue
        result = json.loads(out.stdout.strip().splitlines()[-1])
        target = BYZFL_MS.get(name)
        # ByzFL's figures are for P = 1e6; with --quick the comparison is not meaningful.
        shown = "-" if target is None or args.quick else f"{target:,}"
        speedup = "-" if shown == "-" else f"{target / result['ms']:.1f}x"
        print(f"{name:<20}{result['ms']:>10.0f}{shown:>10}{speedup:>9}{result['peak_mb']:>9.0f}")


if __name__ == "__main__":
    main()
