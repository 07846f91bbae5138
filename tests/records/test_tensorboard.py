"""`[log] tensorboard = true` and `koinon.records.TensorBoard`: each round's metrics as scalars."""

import pytest

from koinon.config import Config
from koinon.experiment import run_experiment

pytest.importorskip("tensorboard")


def _scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return events


def test_a_run_with_log_tensorboard_writes_event_files_beside_metrics(tmp_path):
    cfg = Config().with_overrides({"data.num_clients": 10, "server.clients_per_round": 2, "server.rounds": 3,
                                   "client.steps": 2, "log.tensorboard": True})
    run_experiment(cfg, tmp_path, progress=False)
    events = _scalars(tmp_path / "tensorboard")
    assert {"test_accuracy", "train_loss", "uplink_bytes"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train_loss")] == [1, 2, 3]
    assert "tensorboard = false" in Config().to_toml()  # off unless asked for
