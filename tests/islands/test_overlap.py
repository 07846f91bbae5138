"""Real overlap, in one process: an exchange whose result arrives only when waited for (as in
the worker processes) must give the simulation's numbers bit for bit, and the engine must wait
for it exactly where the math needs it: tau inner steps later (Streaming DiLoCo), at the next
sync event (CO2), at once (DiLoCo without overlap)."""

import pytest
import torch

from koinon.topology.diloco import IslandsSpec, LocalExchange
from koinon.topology.diloco.engine import OverlappingExchange


class Deferred(LocalExchange):
    """Like `LocalExchange`, but the gather is handed back as a handle and logged: (sync event,
    inner step at begin, inner step at wait)."""

    overlap = True

    def __init__(self):
        self.log: list[tuple[int, int, int]] = []
        self.in_flight = 0

    def begin(self, sync_index, payloads, engine):
        assert self.in_flight == 0, "one exchange in flight at a time"
        self.in_flight += 1
        got = self.gather(sync_index, payloads, engine)
        began = engine.step
        exchange = self

        class Handle:
            def wait(self):
                exchange.in_flight -= 1
                exchange.log.append((sync_index, began, engine.step))
                return got

        return Handle()


def test_the_deferred_exchange_is_an_overlapping_exchange():
    assert isinstance(Deferred(), OverlappingExchange)
    assert not isinstance(LocalExchange(), OverlappingExchange)


@pytest.mark.parametrize("overlap", [1, 3])
def test_streaming_overlap_waits_tau_steps_later_and_matches_the_simulation(make_engine, overlap):
    spec = IslandsSpec(workers=3, inner_steps=8, fragments=2, overlap=overlap, alpha=0.5)
    sim, real = make_engine(spec, codec="int8"), make_engine(spec, codec="int8")
    exchange = Deferred()
    sim.run_steps(20, LocalExchange())
    real.run_steps(20, exchange)
    # sync events at steps 4, 8, ..., 20; the one at 20 is still in flight
    assert [(s, b) for s, b, _ in exchange.log] == [(0, 4), (1, 8), (2, 12), (3, 16)]
    assert all(w == b + overlap for _, b, w in exchange.log)
    assert not real.settled and sim.settled
    real.flush(exchange)
    assert real.settled and real.background_exchanges == 5
    assert torch.equal(real.theta, sim.theta) and torch.equal(real.outer_state["velocity"],
                                                           sim.outer_state["velocity"])
    assert real.sync_index == sim.sync_index == 5
    assert (real.bytes_sent, real.bytes_received) == (sim.bytes_sent, sim.bytes_received)


def test_streaming_overlap_local_parameters_match_the_simulation_mid_run(make_engine):
    spec = IslandsSpec(workers=2, inner_steps=6, fragments=2, overlap=2, alpha=0.3)
    sim, real = make_engine(spec), make_engine(spec)
    sim.run_steps(14, LocalExchange())  # 14: two steps after sync event 3, its merge is due
    real.run_steps(14, Deferred())
    assert real.settled
    assert torch.equal(real.local, sim.local) and torch.equal(real.theta, sim.theta)


def test_co2_waits_at_the_next_sync_event_and_matches_the_simulation(make_engine):
    spec = IslandsSpec(mode="co2", workers=3, inner_steps=4, outer_lr=1.0, outer_momentum=0.5,
                       co2_clip=0.05, co2_penalty=1.0)
    sim, real = make_engine(spec, codec="int8"), make_engine(spec, codec="int8")
    exchange = Deferred()
    sim.run_steps(16, LocalExchange())
    real.run_steps(16, exchange)
    # each round's average is waited for a whole round later, when it is applied
    assert exchange.log == [(0, 4, 8), (1, 8, 12), (2, 12, 16)]
    assert torch.equal(real.theta, sim.theta) and torch.equal(real.local, sim.local)
    real.flush(exchange)
    assert real.co2_pending is not None and torch.equal(real.co2_pending, sim.co2_pending)
    assert torch.equal(real.theta, sim.theta)  # the last average stays pending, as simulated
    assert real.bytes_sent == sim.bytes_sent


def test_diloco_without_overlap_and_sync_mode_block(make_engine):
    for spec in (IslandsSpec(workers=2, inner_steps=3), IslandsSpec(mode="sync", workers=2)):
        engine = make_engine(spec)
        exchange = Deferred()
        engine.run_steps(6, exchange)
        assert engine.background_exchanges == 0 and exchange.log == [] and engine.sync_index > 0

