"""Heterogeneous clients in time: a simulated clock, and schedules that decide when the server
steps (synchronous rounds with a deadline, FedAsync, FedBuff, FedCompass, FedAMD).

`[clock]` gives clients speeds, bandwidths and availability (`koinon.schedule.clock`);
`[schedule] name = ...` picks a registered schedule (`SCHEDULES`); `scheduled(cfg, topology)`
wraps a built federation when either is set and returns it unchanged otherwise, so a run
without them is exactly the run it always was. `koinon.schedule.pbt` runs a population of
federations with population-based training.
"""

from __future__ import annotations

from typing import Any

from koinon.config import Config
from koinon.errors import ConfigError
from koinon.schedule import compass as _compass  # noqa: F401  (registers fedcompass)
from koinon.schedule import fedamd as _fedamd  # noqa: F401  (registers fedamd)
from koinon.schedule import policies as _policies  # noqa: F401  (registers sync, fedasync, fedbuff)
from koinon.schedule.clock import Clock, build_clock, load_trace
from koinon.schedule.compass import FedCompass, assign_steps
from koinon.schedule.driver import SCHEDULES, Schedule, Scheduled, Task
from koinon.schedule.fedamd import FedAMD
from koinon.schedule.policies import FedAsync, FedBuff, Sync
from koinon.schedule.staleness import STALENESS, staleness_fn

__all__ = [
    "SCHEDULES", "STALENESS", "Clock", "FedAMD", "FedAsync", "FedBuff", "FedCompass", "Schedule",
    "Scheduled", "Sync", "Task", "assign_steps", "build_clock", "load_trace", "scheduled", "staleness_fn",
]


def scheduled(cfg: Config, topology: Any) -> Any:
    """`topology` driven by `[schedule]` over `[clock]`'s simulated time, or `topology` itself
    when neither is set. Raises a one-line `ConfigError` for what cannot run."""
    from koinon.topology.federated import Federation

    s = cfg.schedule
    clock = build_clock(cfg.clock, cfg.data.num_clients, cfg.seed)
    if clock is None:
        if s.name != "sync" or s.options:
            raise ConfigError(f"schedule.name = {s.name!r}: a schedule runs over simulated time; set "
                              "clock.speed (constant, lognormal, uniform) or clock.trace")
        return topology
    if not isinstance(topology, Federation):
        raise ConfigError(f"[clock] and [schedule] need topology.name = 'federated', got {cfg.topology.name!r}")
    schedule = SCHEDULES.build(s.name, s.options, "schedule")
    if cfg.privacy.secagg:  # the other schedules feed updates to the server one by one, in the clear
        from koinon.schedule.secure import check_secure_schedule

        check_secure_schedule(s.name, schedule)
    if not getattr(schedule, "synchronous", False):  # clients start from different model versions
        if cfg.downlink.delta:
            raise ConfigError(f"schedule.name = {s.name!r} does not support downlink.delta = true "
                              "(clients start from different model versions)")
        if topology.byzantine or topology.root is not None:
            raise ConfigError(f"schedule.name = {s.name!r} does not support attacks or root-data "
                              "aggregators (use schedule.name = 'sync')")
        if cfg.privacy.dp != "none":  # the privacy budget is spent per round (open/close), never here
            raise ConfigError(f"privacy.dp = {cfg.privacy.dp!r} accounts whole rounds; schedule.name = {s.name!r} "
                              "steps the model one buffered update at a time (use schedule.name = 'sync')")
        hooks = [h for h in ("server_delta", "check_update", "server_update_rows", "downlink_for", "server_rows")
                 if hasattr(topology.algorithm, h)]
        if hooks:  # the buffered server step calls none of these
            algorithm = getattr(topology.algorithm, "name", type(topology.algorithm).__name__)
            raise ConfigError(f"client.algorithm = {algorithm!r} needs the server's round hooks "
                              f"({', '.join(hooks)}); schedule.name = {s.name!r} steps the model one buffered "
                              "update at a time (use schedule.name = 'sync')")
        if cfg.ledger.contribution != "none":
            raise ConfigError(f"ledger.contribution = {cfg.ledger.contribution!r} scores rounds; schedule.name = "
                              f"{s.name!r} steps the model one buffered update at a time (use schedule.name = 'sync')")
    return Scheduled(topology, clock, schedule)
