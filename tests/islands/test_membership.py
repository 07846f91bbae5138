"""The coordinator against a live TCPStore, with the workers' side played by the test (the way
torchft tests its manager: real coordination, injected failures, no processes needed)."""

import json
import threading
from datetime import timedelta

import pytest
from torch.distributed import TCPStore

from koinon.islands.membership import Coordinator, MembershipTimeout, wait_key


@pytest.fixture
def store():
    s = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                 timeout=timedelta(seconds=10))
    s.add("next_id", 2)
    return s


def start(store, alive, timeout=5.0):
    coordinator = Coordinator(store, [0, 1], lambda w: alive[w], round_timeout_s=timeout)
    thread = threading.Thread(target=coordinator.run, daemon=True)
    thread.start()
    return coordinator, thread


def test_failed_attempt_is_retried_without_the_dead_worker(store):
    alive = {0: True, 1: True}
    coordinator, thread = start(store, alive)
    store.set("ready/0/0/0", "1")
    store.set("ready/0/0/1", "1")
    assert json.loads(wait_key(store, "quorum/0/0", 5))["members"] == [0, 1]
    store.set("done/0/0/0", "ok")
    store.set("done/0/0/1", "fail")  # worker 1's collective broke ...
    assert wait_key(store, "verdict/0/0", 5) == b"retry"
    alive[1] = False  # ... because it died
    store.set("ready/0/1/0", "1")
    assert json.loads(wait_key(store, "quorum/0/1", 5))["members"] == [0]
    store.set("done/0/1/0", "ok")
    assert wait_key(store, "verdict/0/1", 5) == b"commit"
    store.set("hash/0/0", "abc")
    alive[0] = False  # the run is over
    thread.join(10)
    assert not thread.is_alive() and coordinator.log.error == ""
    assert coordinator.log.retries == 1 and coordinator.log.committed == 1
    assert coordinator.log.dropped == [1] and coordinator.log.hash_mismatches == []


def test_silent_worker_is_dropped_after_the_timeout_and_hashes_are_compared(store):
    alive = {0: True, 1: True}
    coordinator, thread = start(store, alive, timeout=0.5)
    store.set("ready/0/0/0", "1")  # worker 1 is alive but never shows up
    assert json.loads(wait_key(store, "quorum/0/0", 5))["members"] == [0]
    store.set("done/0/0/0", "ok")
    assert wait_key(store, "verdict/0/0", 5) == b"commit"
    coordinator.stop()
    thread.join(10)
    assert coordinator.log.dropped == [1]
    # two members reporting different parameters after a sync event is recorded
    store.set("hash/5/0", "aaa")
    store.set("hash/5/1", "bbb")
    coordinator._check_hashes(5, [0, 1])
    assert coordinator.log.hash_mismatches == [5]


def test_waits_end_with_a_timeout(store):
    with pytest.raises(MembershipTimeout, match="nothing"):
        wait_key(store, "nothing", 0.05)
