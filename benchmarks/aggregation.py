"""Speed of the aggregators on n = 50 inputs of dimension 1,000,000 (float32), median of 5.

Prints each rule's time next to the ByzFL 0.0.11 figure from issue 5 (the goal is 5x faster),
and the peak memory it needs beyond the input stack. Each rule runs in its own subprocess so
the peak resident set (VmHWM) is the rule's own. `--quick` uses P = 100,000.

Machines differ by 2-3x, so `--byzfl DIR` also times ByzFL itself on the same data, here (the
fairer comparison; each of its rules gets the faster of NumPy and torch input):

    pip install --no-deps --target /tmp/byzfl byzfl==0.0.11
    .venv/bin/python benchmarks/aggregation.py [--quick] [--only NAME ...] [--byzfl /tmp/byzfl]
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


# Our rule -> ByzFL's class (module, name, keyword arguments); its defaults otherwise.
BYZFL_CLASSES = {
    "mean": ("aggregators", "Average", {}),
    "median": ("aggregators", "Median", {}),
    "trimmed_mean": ("aggregators", "TrMean", {"f": F}),
    "geometric_median": ("aggregators", "GeometricMedian", {}),
    "krum": ("aggregators", "Krum", {"f": F}),
    "multi_krum": ("aggregators", "MultiKrum", {"f": F}),
    "centered_clipping": ("aggregators", "CenteredClipping", {}),
    "nnm": ("preaggregators", "NNM", {"f": F}),
    "meamed": ("aggregators", "Meamed", {"f": F}),
    "monna": ("aggregators", "MoNNA", {"f": F}),
    "caf": ("aggregators", "CAF", {"f": F}),
    "clipping": ("preaggregators", "Clipping", {"c": 2.0}),
    "arc": ("preaggregators", "ARC", {"f": F}),
}


def _byzfl_rule(name: str, path: str):  # type: ignore[no-untyped-def]
    """ByzFL's implementation of `name`, imported from `path` without its package __init__
    (which needs torchvision for its training code)."""
    import importlib
    import types
    from pathlib import Path

    package = types.ModuleType("byzfl")
    package.__path__ = [str(Path(path) / "byzfl")]
    sys.modules["byzfl"] = package
    module_name, cls, kwargs = BYZFL_CLASSES[name]
    return getattr(importlib.import_module(f"byzfl.aggregators.{module_name}"), cls)(**kwargs)


def _vm_hwm_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _time(run, repeats: int) -> float:  # type: ignore[no-untyped-def]
    run()  # warm-up: thread pools, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _child(name: str, p: int, repeats: int, threads: int, byzfl: str | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)

    from koinon.aggregate import PRE_AGGREGATORS, build_aggregator

    updates = torch.randn(N, p, generator=torch.Generator().manual_seed(0))
    weights = torch.ones(N)
    if byzfl:
        rule = _byzfl_rule(name, byzfl)
        baseline = _vm_hwm_mb()
        best = float("inf")
        for data in (updates.numpy(), updates):
            try:
                best = min(best, _time(lambda: rule(data), repeats))  # noqa: B023
            except (TypeError, AttributeError):
                continue  # this rule takes only the other input type
        print(json.dumps({"ms": best, "peak_mb": _vm_hwm_mb() - baseline}))
        return
    if name in PRE_AGGREGATORS:
        step = build_aggregator(f"{name}+mean", {}, num_byzantine=F).steps[0]  # type: ignore[attr-defined]
        run = lambda: step.transform(updates, weights)  # noqa: E731
    else:
        rule = build_aggregator(name, {}, num_byzantine=F)
        if name == "fltrust":
            rule.set_reference(updates[:5].mean(0))  # type: ignore[attr-defined]
        run = lambda: rule.aggregate(updates, weights)  # noqa: E731
    baseline = _vm_hwm_mb()
    ms = _time(run, repeats)
    print(json.dumps({"ms": ms, "peak_mb": _vm_hwm_mb() - baseline}))


def _measure(name: str, args: argparse.Namespace, byzfl: str | None = None) -> dict | str:  # type: ignore[type-arg]
    cmd = [sys.executable, __file__, "--child", name, "--repeats", str(args.repeats)]
    cmd += ["--threads", str(args.threads)]
    if args.quick:
        cmd.append("--quick")
    if byzfl:
        cmd += ["--byzfl", byzfl]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return f"failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}"
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="P = 100,000 instead of 1,000,000")
    parser.add_argument("--only", nargs="*", default=None, help="aggregator names to run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (0: default); 1 on a busy machine"
    )
    parser.add_argument(
        "--byzfl", default=None, help="folder with byzfl 0.0.11 (pip --target): time it here too"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    p = 100_000 if args.quick else 1_000_000
    if args.child:
        _child(args.child, p, args.repeats, args.threads, args.byzfl)
        return
    names = args.only or list(BYZFL_MS)
    print(
        f"n = {N}, P = {p:,}, f = {F}, float32, median of {args.repeats}, threads {args.threads or 'default'}"
    )
    header = f"{'aggregator':<20}{'ours ms':>10}{'issue ms':>10}{'speedup':>9}"
    if args.byzfl:
        header += f"{'ByzFL here':>12}{'speedup':>9}{'its MB':>8}"
    print(header + f"{'peak MB':>9}")
    for name in names:
        result = _measure(name, args)
        if isinstance(result, str):
            print(f"{name:<20} {result}")
            continue
        target = BYZFL_MS.get(name)
        # The issue's ByzFL figures are for P = 1e6; with --quick the comparison is not meaningful.
        shown = "-" if target is None or args.quick else f"{target:,}"
        speedup = "-" if shown == "-" else f"{target / result['ms']:.1f}x"
        line = f"{name:<20}{result['ms']:>10.1f}{shown:>10}{speedup:>9}"
        if args.byzfl:
            theirs = _measure(name, args, args.byzfl) if name in BYZFL_CLASSES else "-"
            if isinstance(theirs, str):
                line += f"{'-':>12}{'-':>9}{'-':>8}"
            else:
                ratio = theirs["ms"] / result["ms"]
                line += f"{theirs['ms']:>12.1f}{ratio:>8.1f}x{theirs['peak_mb']:>8.0f}"
        print(line + f"{result['peak_mb']:>9.0f}")

if __name__ == "__main__":
    main()
