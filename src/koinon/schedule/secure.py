"""FedBuff with secure aggregation: a full buffer is summed by one SecAgg+ session.

When the buffer holds K updates, its K clients (each online, having just delivered) run the
protocol together (`koinon.privacy.secure.SecureAggregation.run`, the simulation's real message
exchange); the server learns the buffer's sum only and steps with it as `close_round` does
with a secure round (`FederatedServer.apply_secure_buffer`). Each client scales its decoded
update by its staleness weight s(tau) before encoding (tau is public: the server knows which
model version it sent), so the sum is sum_i w_i s_i x_i, which is exactly what FedBuff's plain
buffer step aggregates (weights w_i = samples, the mean over sum_i w_i), up to fixed point.

Parties of a session are the buffer's slots, not client ids: a client that finished twice
before the buffer filled takes part twice, with two independent keys and inputs.
"""

from __future__ import annotations

from typing import Any

import torch

from koinon.errors import ConfigError
from koinon.topology.server import RoundResult

__all__ = ["check_secure_schedule", "secure_buffer"]


def check_secure_schedule(name: str, schedule: Any) -> None:
    """Only FedBuff sums more than one update per server step; refuse the others in one line."""
    if name != "fedbuff":
        raise ConfigError(f"privacy.secagg = true with schedule.name = {name!r}: secure aggregation sums a buffer of "
                          "updates, which only schedule.name = 'fedbuff' keeps (or remove [clock]/[schedule])")
    if schedule.buffer < 2:
        raise ConfigError("privacy.secagg = true with schedule.buffer = 1: the sum of one update is that update; "
                          "use schedule.buffer >= 2")


def secure_buffer(driver: Any, tasks: list[Any], staleness: list[float], downlink_bytes: int) -> RoundResult:
    """One FedBuff server step over `tasks` (the full buffer) by secure aggregation."""
    fed = driver.federation
    server = fed.server
    privacy = server.privacy
    assert privacy is not None and privacy.secure is not None
    slots, rows, weights = [], [], []
    samples: dict[int, int] = {}
    losses: dict[int, float] = {}
    failed: dict[int, str] = {}
    for i, (task, s) in enumerate(zip(tasks, staleness)):
        samples[task.client] = task.num_samples
        losses[task.client] = task.train_loss
        if not task.payloads:  # training failed (e.g. NaN): nothing to sum
            failed[task.client] = task.result.failed.get(task.client, "no update")
            continue
        slots.append(i)
        rows.append(fed.codec.decode(task.payloads[0]) * s)
        weights.append(task.num_samples)
    updates = torch.stack(rows) if rows else torch.zeros(0, fed.layout.numel)
    secure = privacy.secure.run(slots, updates, weights, server.round_index, privacy.client_clip())
    # Slots back to clients (a client twice in the buffer: its bytes add up, it survives twice).
    client = [t.client for t in tasks]
    uplink: dict[int, int] = {}
    downlink: dict[int, int] = {}
    for slot, n in secure.uplink.items():
        uplink[client[slot]] = uplink.get(client[slot], 0) + n
    for slot, n in secure.downlink.items():
        downlink[client[slot]] = downlink.get(client[slot], 0) + n
    secure.survivors = [client[slot] for slot in secure.survivors]
    secure.uplink, secure.downlink = uplink, downlink
    secure.rejected = {client[slot]: why for slot, why in secure.rejected.items()}
    secure.rejected.update({c: f"could not encode its update ({why})" for c, why in failed.items()})
    return server.apply_secure_buffer(secure, samples, losses, downlink_bytes)
