"""The plot of a run (`accuracy.png`): accuracy and loss against round, accuracy against bytes.

Drawn from `metrics.jsonl` records only, so any topology's rounds plot the same way: the loss
panel shows test loss (DiLoCo's validation loss) next to the training loss; uplink and downlink
bytes are separate curves (a codec acts on one direction, the sum would hide it); rounds are
integer ticks. Gossip rounds carry per-node accuracy (`min_accuracy`, `max_accuracy`), drawn as
a band, and crashes (`crashed`), drawn as vertical lines. Runs over simulated time (`[clock]`,
records with `sim_time_s`) get a fourth panel: accuracy against simulated seconds.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Importing matplotlib takes about 0.3 s, as long as a short run's training (measured on the
# demo with 30 rounds on a 2-core machine: 0.3 s import, 0.14 s drawing, ~2 s in all). A command
# line run starts a helper process that imports it on another core while this one trains, then
# hands it the metrics to draw; anything wrong with the helper (it died, timed out, drew
# nothing) and the plot is drawn here as before. Only with a core to spare: on a machine whose
# cores are all busy the helper competes with training (measured on the 2-core machine at a
# load average of 15-20: the wait for the plot fell from 1.9-2.3 s to 1.1-1.4 s, the whole run
# took longer). The helper loads this file by path, not `koinon`, whose import loads torch.
_WORKER_CODE = """
import sys
sys.path.pop(0)  # `python -c` puts the working directory first: its json.py must not run here
import importlib.util, json
from pathlib import Path
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot
from matplotlib.ticker import MaxNLocator
spec = importlib.util.spec_from_file_location("_koinon_plots", sys.argv[1])
plots = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plots)
line = sys.stdin.readline()
if line:
    job = json.loads(line)
    plots.plot_run(job["metrics"], Path(job["path"]), job["title"])
    print("drawn")
"""
_worker: subprocess.Popen[str] | None = None


def idle_cores() -> float:
    """Cores this process may use minus the load average of the last minute (0 if unknown)."""
    try:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return cores - os.getloadavg()[0]
    except (OSError, AttributeError):  # no load average here (e.g. Windows)
        return 0.0


def start_plot_worker(need_idle_core: bool = True) -> None:
    """Start importing matplotlib in a helper process now; `plot_run` hands it the drawing.
    With `need_idle_core`, only when a core is idle (else the helper would slow training)."""
    global _worker
    if _worker is not None or (need_idle_core and idle_cores() < 1.0):
        return
    try:
        _worker = subprocess.Popen([sys.executable, "-c", _WORKER_CODE, __file__], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except OSError:
        return
    atexit.register(stop_plot_worker)


def stop_plot_worker() -> None:
    """End an unused helper (a run that failed before its plot)."""
    global _worker
    worker, _worker = _worker, None
    if worker is not None and worker.poll() is None:
        worker.kill()
        worker.communicate()


def _plot_in_worker(metrics: list[dict[str, Any]], path: Path, title: str) -> bool:
    """The plot drawn by the helper process, if one was started; False when it did not draw it."""
    global _worker
    worker, _worker = _worker, None
    if worker is None:
        return False
    job = json.dumps({"metrics": metrics, "path": str(path), "title": title})
    try:
        out, _ = worker.communicate(job + "\n", timeout=120)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        worker.kill()
        worker.communicate()
        return False
    return worker.returncode == 0 and out.strip() == "drawn" and path.exists()


def plot_run(metrics: list[dict[str, Any]], path: Path, title: str) -> None:
    """`draw_run` saved to `path` (through a temporary file, so a reader never sees half a PNG);
    by the helper process when `start_plot_worker` started one."""
    if _plot_in_worker(metrics, path, title):
        return
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
