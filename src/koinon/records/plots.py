"""Plots of a run: accuracy against round and against cumulative bytes on the wire."""

from __future__ import annotations

from pathlib import Path


def plot_run(metrics: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evaluated = [m for m in metrics if m.get("test_accuracy") is not None]
    total = 0
    cumulative = {}
    for m in metrics:
        total += m["uplink_bytes"] + m["downlink_bytes"]
        cumulative[m["round"]] = total
    rounds = [m["round"] for m in evaluated]
    acc = [m["test_accuracy"] for m in evaluated]
    mb = [cumulative[r] / 1e6 for r in rounds]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(rounds, acc, marker=".")
    a.set_xlabel("round")
    a.set_ylabel("test accuracy")
    a.grid(alpha=0.3)
    b.plot(mb, acc, marker=".")
    b.set_xlabel("cumulative bytes, uplink + downlink (MB)")
    b.set_ylabel("test accuracy")
    b.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
