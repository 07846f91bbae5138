"""The run plot: titled by what ran, a loss panel, uplink and downlink apart, integer rounds,
gossip's node spread and crashes."""

import matplotlib.pyplot as plt

from koinon.records.plots import draw_run, plot_run


def _metrics(rounds=3, **extra):
    return [{"round": r, "test_accuracy": 0.5 + 0.1 * r, "test_loss": 1.0 / r, "train_loss": 1.2 / r,
             "uplink_bytes": 10_000, "downlink_bytes": 40_000, **extra} for r in range(1, rounds + 1)]


def test_panels_title_and_integer_round_ticks():
    fig = draw_run(_metrics(), "federated fedavg / digits / seed 3")
    acc, loss, by_bytes = fig.axes
    assert fig._suptitle.get_text() == "federated fedavg / digits / seed 3"
    assert loss.get_ylabel() == "loss"
    assert [ln.get_label() for ln in loss.get_lines()] == ["test loss", "train loss (clients' mean)"]
    for ax in (acc, loss):
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)  # 3 rounds: no 0.5, 1.5
    up, down = by_bytes.get_lines()
    assert (up.get_label(), down.get_label()) == ("uplink", "downlink")
    assert list(up.get_xdata()) == [0.01, 0.02, 0.03]  # cumulative MB, each direction on its own
    assert list(down.get_xdata()) == [0.04, 0.08, 0.12]
    plt.close(fig)


def test_gossip_spread_and_crashes_are_drawn(tmp_path):
    metrics = _metrics(min_accuracy=0.4, max_accuracy=0.9)
    metrics[1]["crashed"] = [3, 4]
    fig = draw_run(metrics, "gossip")
    acc = fig.axes[0]
    assert len(acc.collections) == 1  # the min-max band
    assert [list(ln.get_xdata()) for ln in acc.get_lines()[1:]] == [[2, 2]]  # a vertical line at round 2
    plt.close(fig)
    plot_run(metrics, tmp_path / "a.png", "gossip")
    assert (tmp_path / "a.png").stat().st_size > 0 and not list(tmp_path.glob(".*"))


def test_helper_process_draws_the_same_png(tmp_path):
    from koinon.records import plots

    metrics = _metrics(rounds=4)
    plot_run(metrics, tmp_path / "here.png", "federated")
    plots.start_plot_worker(need_idle_core=False)
    worker = plots._worker
    assert worker is not None
    plot_run(metrics, tmp_path / "there.png", "federated")
    assert worker.returncode == 0 and plots._worker is None  # the helper drew it and is done
    assert (tmp_path / "there.png").read_bytes() == (tmp_path / "here.png").read_bytes()
    assert not list(tmp_path.glob(".*"))


def test_a_dead_helper_means_the_plot_is_drawn_here(tmp_path):
    from koinon.records import plots

    plots.start_plot_worker(need_idle_core=False)
    worker = plots._worker
    assert worker is not None
    worker.kill()
    worker.wait()
    plot_run(_metrics(), tmp_path / "a.png", "federated")
    assert (tmp_path / "a.png").stat().st_size > 0 and plots._worker is None
    plots.start_plot_worker(need_idle_core=False)
    plots.stop_plot_worker()  # a run that fails before its plot ends its helper
    assert plots._worker is None


def test_the_helper_does_not_run_modules_of_the_working_directory(tmp_path, monkeypatch):
    """`python -c` puts the working directory first on sys.path; the helper takes it off, so a
    json.py where `koinon run` is started is not executed by it."""
    from koinon.records import plots

    (tmp_path / "json.py").write_text("open('imported', 'w').write('yes')\nraise SystemExit(3)\n")
    monkeypatch.chdir(tmp_path)
    plots.start_plot_worker(need_idle_core=False)
    worker = plots._worker
    assert worker is not None
    plot_run(_metrics(), tmp_path / "a.png", "federated")
    assert worker.returncode == 0 and not (tmp_path / "imported").exists()
