"""Simulated time: how long each client takes to receive, train and send, and when it is there.

Every client has a compute speed (relative to 1), a link bandwidth and availability: windows of
time in which it is online (always, unless a trace says otherwise) and, for a seeded fraction of
the population, a time at which it leaves for good (`dropout`). A task of a client that starts
at `t` with `samples` training samples, `down` bytes received and `up` bytes sent ends at

    t + down / bandwidth + samples * sample_s / speed + up / bandwidth

and is lost when the client goes offline before then. The bytes are the real payload lengths.

Speeds and bandwidths come from a distribution (`constant`, `lognormal` with median 1 and
`sigma`, `uniform` on [low, high]) or from a trace file, JSON or CSV:

    {"clients": [{"speed": 1.0, "bandwidth_mbps": 10.0, "available": [[0, 500], [900, 1e9]]}, ...]}

    client,speed,bandwidth_mbps,start,end      (one row per availability window; a client's
    0,1.0,10.0,0,500                            speed and bandwidth are those of its first row;
    0,1.0,10.0,900,1e9                          start/end may be empty: always online)

A trace lists at least `data.num_clients` clients (client i of the run is entry i).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from koinon.config import ClockConfig
from koinon.errors import ConfigError

__all__ = ["Clock", "build_clock", "load_trace"]

DISTRIBUTIONS = ("constant", "lognormal", "uniform")
Windows = list[tuple[float, float]]


@dataclass
class Clock:
    """Per-client speeds, bandwidths (bytes per second), availability windows and leave times."""

    speed: np.ndarray  # [N] relative compute speed
    bandwidth: np.ndarray  # [N] bytes per second, each direction
    sample_s: float = 0.001
    windows: list[Windows] | None = None  # per client; None: always online
    leaves: np.ndarray | None = None  # [N] time a client leaves for good (inf: never)

    def __post_init__(self) -> None:
        n = len(self.speed)
        if len(self.bandwidth) != n:
            raise ValueError(f"{n} speeds but {len(self.bandwidth)} bandwidths")
        if not (np.all(self.speed > 0) and np.all(self.bandwidth > 0)):
            raise ValueError("client speeds and bandwidths must be > 0")
        if self.leaves is None:
            self.leaves = np.full(n, math.inf)

    @property
    def num_clients(self) -> int:
        return len(self.speed)

    def compute_s(self, client: int, samples: int) -> float:
        return samples * self.sample_s / float(self.speed[client])

    def transfer_s(self, client: int, nbytes: int) -> float:
        return nbytes / float(self.bandwidth[client])

    def duration(self, client: int, samples: int, down_bytes: int, up_bytes: int) -> float:
        """Seconds from the start of a task to its update arriving at the server."""
        return (self.transfer_s(client, down_bytes) + self.compute_s(client, samples)
                + self.transfer_s(client, up_bytes))

    def available(self, client: int, t: float) -> bool:
        """Online at time `t`."""
        assert self.leaves is not None
        if t >= self.leaves[client]:
            return False
        return self.windows is None or any(a <= t < b for a, b in self.windows[client])

    def offline_at(self, client: int, t: float) -> float:
        """When a client online at `t` goes offline next (inf: never)."""
        assert self.leaves is not None
        end = math.inf
        if self.windows is not None:
            end = min((b for a, b in self.windows[client] if a <= t < b), default=t)
        return min(end, float(self.leaves[client]))

    def next_online(self, t: float) -> float | None:
        """The earliest time >= `t` at which some client is online (None: never again)."""
        assert self.leaves is not None
        best = math.inf
        for c in range(self.num_clients):
            starts = [0.0] if self.windows is None else [max(a, t) for a, b in self.windows[c] if b > t]
            for s in starts:
                s = max(s, t)
                if s < self.leaves[c]:
                    best = min(best, s)
        return None if math.isinf(best) else best


def _draw(kind: str, n: int, sigma: float, low: float, high: float, rng: np.random.Generator, key: str) -> np.ndarray:
    if kind == "constant":
        return np.ones(n)
    if kind == "lognormal":
        if sigma < 0:
            raise ConfigError(f"{key} sigma = {sigma}: must be >= 0")
        return rng.lognormal(0.0, sigma, n)
    if kind == "uniform":
        if not 0 < low <= high:
            raise ConfigError(f"{key}: uniform range [{low}, {high}] must satisfy 0 < low <= high")
        return rng.uniform(low, high, n)
    raise ConfigError(f"{key} = {kind!r}: allowed: {', '.join(DISTRIBUTIONS)}")


def load_trace(path: str | Path) -> tuple[np.ndarray, np.ndarray, list[Windows]]:
    """(speeds, bandwidths in megabits/s, availability windows) of every client in a trace file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"clock.trace = {str(p)!r}: no such file")
    speeds: dict[int, float] = {}
    mbps: dict[int, float] = {}
    windows: dict[int, Windows] = {}
    try:
        if p.suffix.lower() == ".json":
            entries = json.loads(p.read_text())["clients"]
            for i, e in enumerate(entries):
                speeds[i] = float(e.get("speed", 1.0))
                mbps[i] = float(e.get("bandwidth_mbps", 10.0))
                windows[i] = [(float(a), float(b)) for a, b in e.get("available", [[0.0, math.inf]])]
        elif p.suffix.lower() == ".csv":
            with p.open(newline="") as f:
                for row in csv.DictReader(f):
                    c = int(row["client"])
                    speeds.setdefault(c, float(row.get("speed") or 1.0))
                    mbps.setdefault(c, float(row.get("bandwidth_mbps") or 10.0))
                    start, end = row.get("start") or "0", row.get("end") or "inf"
                    windows.setdefault(c, []).append((float(start), float(end)))
        else:
            raise ConfigError(f"clock.trace = {str(p)!r}: expected a .json or .csv file")
    except (KeyError, ValueError, TypeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"clock.trace = {str(p)!r}: not a valid trace ({type(exc).__name__}: {exc}); "
                          "see koinon.schedule.clock for the format") from None
    n = len(speeds)
    if sorted(speeds) != list(range(n)):
        raise ConfigError(f"clock.trace = {str(p)!r}: clients must be numbered 0..{n - 1}")
    return (np.array([speeds[i] for i in range(n)]), np.array([mbps[i] for i in range(n)]),
            [windows[i] for i in range(n)])


def build_clock(cfg: ClockConfig, num_clients: int, seed: int) -> Clock | None:
    """The clock `[clock]` describes for `num_clients` clients (None when it is off)."""
    if cfg.speed == "none" and not cfg.trace:
        for key in ("dropout",):
            if getattr(cfg, key):
                raise ConfigError(f"clock.{key} needs a clock: set clock.speed (constant, lognormal, "
                                  "uniform) or clock.trace")
        return None
    if cfg.sample_s <= 0 or cfg.bandwidth_mbps <= 0:
        raise ConfigError(f"clock.sample_s and clock.bandwidth_mbps must be > 0, got {cfg.sample_s} "
                          f"and {cfg.bandwidth_mbps}")
    if not 0.0 <= cfg.dropout <= 1.0:
        raise ConfigError(f"clock.dropout = {cfg.dropout}: must be in [0, 1]")
    if cfg.dropout_within_s <= 0:
        raise ConfigError(f"clock.dropout_within_s = {cfg.dropout_within_s}: must be > 0")
    rng = np.random.default_rng([seed, 0xC10C])
    windows: list[Windows] | None = None
    if cfg.trace:
        speeds, mbps, all_windows = load_trace(cfg.trace)
        if len(speeds) < num_clients:
            raise ConfigError(f"clock.trace lists {len(speeds)} clients, data.num_clients = {num_clients}")
        speed, bandwidth = speeds[:num_clients], mbps[:num_clients] * 1e6 / 8
        windows = all_windows[:num_clients]
    else:
        speed = _draw(cfg.speed, num_clients, cfg.sigma, cfg.low, cfg.high, rng, "clock.speed")
        bandwidth = cfg.bandwidth_mbps * 1e6 / 8 * _draw(
            cfg.bandwidth, num_clients, cfg.bandwidth_sigma, cfg.bandwidth_low, cfg.bandwidth_high,
            rng, "clock.bandwidth")
    leaves = np.full(num_clients, math.inf)
    count = round(cfg.dropout * num_clients)
    if count:
        gone = rng.choice(num_clients, size=count, replace=False)
        leaves[gone] = rng.uniform(0.0, cfg.dropout_within_s, count)
    try:
        return Clock(speed, bandwidth, cfg.sample_s, windows, leaves)
    except ValueError as exc:
        raise ConfigError(f"clock: {exc}") from None
