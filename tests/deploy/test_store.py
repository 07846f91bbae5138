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
    store.reject(0, "client-7", 7, "rejected", "NaN", 0, window=0)
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


def _committed_folder(path):
    """A state folder with round 1 committed (and its checkpoint), closed again."""
    store = Store(path)
    store.put("config_toml", "seed = 0\n")
    store.commit_round(1, store.write_checkpoint(1, {"params": torch.arange(64.0)}), {"round": 1}, {})
    store.close()
    (path / "metrics.jsonl").write_text('{"round": 1}\n')
    return {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}


@pytest.mark.parametrize("damage", ["deleted", "empty", "foreign"])
def test_a_run_without_its_database_is_refused_and_nothing_is_deleted(tmp_path, damage):
    from koinon.errors import KoinonError

    before = _committed_folder(tmp_path)
    db = tmp_path / "state.db"
    for name in ("state.db", "state.db-wal", "state.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    if damage == "empty":
        db.write_bytes(b"")
    elif damage == "foreign":  # a valid SQLite database that holds no run
        import sqlite3

        sqlite3.connect(db).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(KoinonError, match="refusing to start over") as err:
        Store(tmp_path)
    assert "\n" not in str(err.value) and "ckpt-000001.safetensors" in str(err.value)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after["ckpt-000001.safetensors"] == before["ckpt-000001.safetensors"]
    assert after["metrics.jsonl"] == before["metrics.jsonl"]


@pytest.mark.parametrize("damage", ["flipped", "truncated", "missing"])
def test_a_damaged_checkpoint_is_refused_in_one_line(tmp_path, damage):
    from koinon.errors import KoinonError

    _committed_folder(tmp_path)
    ckpt = tmp_path / "ckpt-000001.safetensors"
    data = bytearray(ckpt.read_bytes())
    if damage == "flipped":  # one bit of a tensor value: still a valid file, other numbers
        data[-5] ^= 0x01
        ckpt.write_bytes(bytes(data))
    elif damage == "truncated":
        ckpt.write_bytes(bytes(data[: len(data) // 2]))
    else:
        ckpt.unlink()
    store = Store(tmp_path)
    with pytest.raises(KoinonError, match="ckpt-000001.safetensors") as err:
        store.load_checkpoint()
    message = str(err.value)
    assert "\n" not in message and ("damaged" in message or "missing" in message)
    assert "backup" in message
    store.close()


def test_a_damaged_database_page_is_refused_in_one_line(tmp_path):
    import sqlite3

    from koinon.errors import KoinonError

    store = Store(tmp_path)
    for i in range(200):  # a few pages of rows
        store.reject(0, f"client-{i}", i, "rejected", "x" * 200, 0, window=i)
    store.close()
    db = sqlite3.connect(tmp_path / "state.db")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    path = tmp_path / "state.db"
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 4 * page
    data[2 * page : 3 * page] = b"\xa5" * page
    path.write_bytes(bytes(data))
    with pytest.raises(KoinonError, match="state.db is damaged") as err:
        Store(tmp_path)
    assert "\n" not in str(err.value) and "backup" in str(err.value)


def test_refusals_are_bounded_per_client_and_round_and_the_rest_counted(tmp_path):
    from koinon.deploy.store import MAX_REASON, REFUSALS_KEPT

    store = Store(tmp_path)
    stored = [store.reject(0, "flood", 1, "rejected", "y" * 10_000, 0, window=0) for _ in range(100)]
    assert 0 < sum(stored) <= REFUSALS_KEPT
    assert store.reject(0, "honest", 2, "rejected", "NaN", 0, window=0)  # another client: its own budget
    rows = store._query("SELECT client, LENGTH(reason) FROM updates")
    assert all(n <= MAX_REASON for _, n in rows) and sum(c == "flood" for c, _ in rows) == sum(stored)
    assert store.suppressed() == {"flood": 100 - sum(stored)}
    store.commit_round(1, store.write_checkpoint(1, {"p": torch.zeros(1)}), {"round": 1}, {})
    assert store.reject(1, "flood", 1, "rejected", "again", 0, window=1)  # a new round, a new budget
    store.close()
    assert Store(tmp_path).suppressed() == {"flood": 100 - sum(stored)}  # counted durably


def test_pending_files_of_committed_rounds_are_cleared_on_restart(tmp_path):
    # A kill between a round's commit and its clean-up leaves its pending files behind.
    store = Store(tmp_path)
    store.begin_round(0, [1])
    store.accept(0, "a", 1, [b"x"], 1, 0.0)
    ckpt = store.write_checkpoint(1, {"p": torch.zeros(1)})
    with store._transaction() as db:  # the commit, without the clean-up after it
        db.execute("INSERT OR REPLACE INTO meta VALUES ('round', '1')")
    (tmp_path / "pending" / "r000001-c1.tmp").write_bytes(b"half")
    store.accept(1, "a", 1, [b"y"], 1, 0.0)  # the open round's upload stays
    store.close()
    assert ckpt.name == "ckpt-000001.safetensors"
    Store(tmp_path).close()
    assert sorted(p.name for p in (tmp_path / "pending").iterdir()) == ["r000001-c1.bin"]


def test_a_pending_file_written_as_it_streams_in_equals_one_written_at_once(tmp_path):
    store = Store(tmp_path)
    payloads = [b"abcdef" * 1000, b"", b"xyz"]
    size, digest = store.write_pending(0, 1, payloads)
    whole = (tmp_path / "pending" / "r000000-c1.bin").read_bytes()
    writer = store.open_pending(0, 2, [len(p) for p in payloads])
    joined = b"".join(payloads)
    for start in range(0, len(joined), 1000):
        writer.write(joined[start : start + 1000])
    assert not (tmp_path / "pending" / "r000000-c2.bin").exists()  # not visible before finish
    assert writer.finish() == (size, digest)
    assert (tmp_path / "pending" / "r000000-c2.bin").read_bytes() == whole
    broken = store.open_pending(0, 3, [10])
    broken.write(b"12345")
    broken.abort()
    assert sorted(p.name for p in (tmp_path / "pending").iterdir()) == ["r000000-c1.bin", "r000000-c2.bin"]
