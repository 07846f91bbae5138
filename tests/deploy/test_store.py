"""Server state: a round counts once committed, pending uploads survive a restart, damage is caught."""

import pytest
import torch

from koinon.deploy.store import Store


def test_commit_makes_a_round_the_truth(tmp_path):
    store = Store(tmp_path)
    assert store.load_checkpoint() is None
    name = store.write_checkpoint(1, {"params": torch.ones(3)})
    store.commit_round(1, name, {"round": 1}, {"uplink_total": 5})
    # A crash after writing round 2's file but before its commit: round 1 stays the truth.
    store.write_checkpoint(2, {"params": torch.full((3,), 2.0)})
    store.close()
    again = Store(tmp_path)
    assert again.get("round") == 1 and again.get("uplink_total") == 5
    assert torch.equal(again.load_checkpoint()["params"], torch.ones(3))
    assert again.records() == [{"round": 1}]


def test_pending_uploads_survive_a_restart_and_damage_is_dropped(tmp_path):
    store = Store(tmp_path)
    store.begin_round(0, [3, 5, 7])
    store.accept(0, "client-3", 3, [b"abc", b""], 10, 0.5)
    store.accept(0, "client-5", 5, [b"defg", b"h"], 20, 0.25)
    store.reject(0, "client-7", 7, "rejected", "NaN", 0)
    store.close()
    again = Store(tmp_path)
    assert again.open_round() == (0, [3, 5, 7])
    (tmp_path / "pending" / "r000000-c5.bin").write_bytes(b"torn")
    pending = again.pending(0)
    assert [(p.client, p.payloads, p.num_samples) for p in pending] == [("client-3", [b"abc", b""], 10)]
    assert again.counts() == {"accepted": 1, "lost": 1, "rejected": 1}


def test_commit_clears_the_open_round_and_its_files(tmp_path):
    store = Store(tmp_path)
    store.begin_round(0, [1])
    store.accept(0, "a", 1, [b"x"], 1, 0.0)
    store.commit_round(1, store.write_checkpoint(1, {"p": torch.zeros(1)}), {"round": 1}, {})
    assert store.open_round() is None
    assert not list((tmp_path / "pending").iterdir())
    assert [p.name for p in tmp_path.glob("ckpt-*")] == ["ckpt-000001.safetensors"]


def test_a_restart_may_change_deadlines_and_rounds_but_not_the_run():
    from koinon.config import Config
    from koinon.deploy.server import _changed_keys

    base = Config.from_dict({"server": {"rounds": 5}, "client": {"lr": 0.1}})
    later = Config.from_dict({"server": {"rounds": 9}, "client": {"lr": 0.1}, "deploy": {"round_timeout_s": 5.0}})
    assert _changed_keys(base.to_toml(), later) == []
    other = Config.from_dict({"server": {"rounds": 5}, "client": {"lr": 0.2}, "seed": 3})
    assert _changed_keys(base.to_toml(), other) == ["client.lr", "seed"]


def test_one_server_per_state_folder(tmp_path):
    from koinon.errors import KoinonError

    first = Store(tmp_path / "s")
    with pytest.raises(KoinonError, match="in use by another running server"):
        Store(tmp_path / "s")
    first.close()
    Store(tmp_path / "s").close()  # free again once the first one is gone
    (tmp_path / "file").write_text("x")
    with pytest.raises(KoinonError, match="cannot use it as a state folder"):
        Store(tmp_path / "file")
