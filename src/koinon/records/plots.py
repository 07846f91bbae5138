"""The plot of a run (`accuracy.png`): accuracy and loss against round, accuracy against bytes.

Drawn from `metrics.jsonl` records only, so any topology's rounds plot the same way: the loss
panel shows test loss (DiLoCo's validation loss) next to the training loss; uplink and downlink
bytes are separate curves (a codec acts on one direction, the sum would hide it); rounds are
integer ticks. Gossip rounds carry per-node accuracy (`min_accuracy`, `max_accuracy`), drawn as
a band, and crashes (`crashed`), drawn as vertical lines. Runs over simulated time (`[clock]`,
records with `sim_time_s`) get a fourth panel: accuracy against simulated seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def plot_run(metrics: list[dict[str, Any]], path: Path, title: str) -> None:
    """`draw_run` saved to `path` (through a temporary file, so a reader never sees half a PNG)."""
    import matplotlib.pyplot as plt

    fig = draw_run(metrics, title)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def draw_run(metrics: list[dict[str, Any]], title: str) -> Figure:
    """Three panels: accuracy by round, loss by round, accuracy by cumulative MB each way."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    evaluated = [m for m in metrics if m.get("test_accuracy") is not None]
    up = down = 0
    cumulative: dict[int, tuple[float, float]] = {}
    for m in metrics:
        up += m["uplink_bytes"]
        down += m["downlink_bytes"]
        cumulative[m["round"]] = (up / 1e6, down / 1e6)
    rounds = [m["round"] for m in evaluated]
    acc = [m["test_accuracy"] for m in evaluated]
    timed = [m for m in evaluated if m.get("sim_time_s") is not None]
    if timed:
        fig, (a, loss_ax, b, clock_ax) = plt.subplots(1, 4, figsize=(18, 4))
        clock_ax.plot([m["sim_time_s"] for m in timed], [m["test_accuracy"] for m in timed], marker=".")
        clock_ax.set_xlabel("simulated time (s)")
        clock_ax.set_ylabel("test accuracy")
        clock_ax.grid(alpha=0.3)
    else:
        fig, (a, loss_ax, b) = plt.subplots(1, 3, figsize=(14, 4))
    a.plot(rounds, acc, marker=".", label="test")
    spread = [m for m in evaluated if m.get("min_accuracy") is not None and m.get("max_accuracy") is not None]
    if spread:
        a.fill_between([m["round"] for m in spread], [m["min_accuracy"] for m in spread],
                       [m["max_accuracy"] for m in spread], alpha=0.25, label="nodes (min to max)")
    for m in metrics:
        if m.get("crashed"):
            a.axvline(m["round"], color="tab:red", alpha=0.4, lw=1)
    a.set_xlabel("round")
    a.set_ylabel("test accuracy")
    loss_ax.plot(rounds, [m.get("test_loss") for m in evaluated], marker=".", label="test loss")
    trained = [m for m in metrics if m.get("train_loss") is not None]
    if trained:
        loss_ax.plot([m["round"] for m in trained], [m["train_loss"] for m in trained], alpha=0.7,
                     label="train loss (clients' mean)")
    loss_ax.set_xlabel("round")
    loss_ax.set_ylabel("loss")
    loss_ax.legend(fontsize=8)
    for ax in (a, loss_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    b.plot([cumulative[r][0] for r in rounds], acc, marker=".", label="uplink")
    b.plot([cumulative[r][1] for r in rounds], acc, marker=".", label="downlink")
    b.set_xlabel("cumulative bytes (MB)")
    b.set_ylabel("test accuracy")
    b.legend(fontsize=8)
    if spread or any(m.get("crashed") for m in metrics):
        a.legend(fontsize=8)
    for ax in (a, loss_ax, b):
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
