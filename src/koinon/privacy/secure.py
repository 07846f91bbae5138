"""Secure aggregation of a simulated cohort: each client encodes its own update in fixed point
and the cohort runs one SecAgg+ session (`koinon.privacy.secagg.run_protocol`); the server gets
the survivors' sum and never an individual update.

What a client puts in: its update (float32, decoded from its own payload, i.e. exactly what it
would have uploaded) times its weight (its samples, capped at `max_weight`) in fixed point, the
weight, and a count. Under central DP the client first clips its update to the round's L2 bound,
its weight is 1, and the count is the adaptive-clipping bit (1 when it was not clipped); the
server then noises the unmasked sum (`CentralDP.release`) and centres the count there, as
without secure aggregation: it releases count - survivors / 2 (sensitivity 1/2, Andrew et al.).
Stochastic rounding moves each coordinate by less than one step 1 / scale, so an encoded
update's norm could exceed its clipped norm by up to sqrt(P) / scale: the client clips to
C - sqrt(P) / scale (`encoded_clip`), so that the decoded update's norm is <= C, the sensitivity
the noise is calibrated to (its bit still says whether its norm was <= C). Bytes are the protocol's messages,
each client's own: its uplink and downlink.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from koinon.privacy.secagg import FixedPoint, Identities, run_protocol
from koinon.seeding import generator

__all__ = ["SecureAggregation", "SecureSum"]


@dataclass
class SecureSum:
    """What the server learns from one secure session (and what it cost)."""

    survivors: list[int]  # clients whose inputs are in the sum
    total: torch.Tensor | None  # sum of w x (float64 [P]); None when the session failed
    weight: int  # sum of the survivors' weights
    count: int  # sum of the survivors' counts (adaptive clipping bits)
    clip: float  # the L2 bound the clients clipped to (0: none)
    error: str
    uplink: dict[int, int] = field(default_factory=dict)
    downlink: dict[int, int] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class SecureAggregation:
    """SecAgg+ settings of a federation (`[privacy] secagg = true`)."""

    fp: FixedPoint
    degree: int = 0  # 0: `default_degree(cohort)`
    threshold_fraction: float = 0.5
    dropout: float = 0.0  # simulation: this fraction of the cohort drops after sharing keys
    seed: int = 0
    identities: Identities = field(default_factory=Identities)
    consistency: bool = False  # the malicious-server consistency check (`secagg.protocol`)

    def encoded_clip(self, clip: float, length: int) -> float:
        """The L2 bound to clip a `length`-coordinate update to, so that after stochastic
        rounding (each coordinate off by < 1 / scale) its norm is still <= `clip`."""
        out = clip - math.sqrt(length) / self.fp.scale
        if out <= 0:
            raise ValueError(f"clip {clip:g} is below the fixed-point rounding of {length} coordinates "
                             f"(sqrt(P) / scale = {math.sqrt(length) / self.fp.scale:.3g}): raise the modulus bits")
        return out

    def encode_input(self, client: int, x: torch.Tensor, samples: int, round_index: int,
                     clip: float = 0.0) -> np.ndarray:
        """One client's protocol input: its update `x` [P] in fixed point (clipped to `clip`
        and weight 1 with its clipping bit under central DP; else weighted by its samples).
        The rounding is seeded by (seed, round, client): a deployed client encodes the bytes the
        simulated one does."""
        count = 0
        if clip > 0:
            bound = self.encoded_clip(clip, x.numel())
            norm = float(x.double().norm())
            count = int(norm <= clip)
            x = x.double() * (bound / max(norm, bound))  # float64: no float32 rounding past it
            weight = 1
        else:
            weight = min(int(samples), self.fp.max_weight)
        return self.fp.encode(x, weight, count, generator(self.seed, round_index, client, 0x5EC))

    def run(self, clients: list[int], updates: torch.Tensor, samples: list[int], round_index: int,
            clip: float = 0.0) -> SecureSum:
        """One session over the cohort's updates `[K, P]` (rows follow `clients`). `clip > 0`:
        central DP, each client clips to it and reports whether it was clipped."""
        inputs = {c: self.encode_input(c, updates[i], int(samples[i]), round_index, clip)
                  for i, c in enumerate(clients)}
        drop: dict[str, set[int]] = {}
        if self.dropout > 0:
            rng = np.random.default_rng([self.seed, round_index, 0xD809])
            k = int(round(self.dropout * len(clients)))
            drop["masked"] = {int(c) for c in rng.choice(clients, k, replace=False)}
        session = run_protocol(inputs, self.fp, degree=self.degree, threshold_fraction=self.threshold_fraction,
                               drop=drop, identities=self.identities, expected_dropout=max(0.1, self.dropout),
                               consistency=self.consistency)
        metrics = {"secagg_survivors": float(len(session.survivors)),
                   "secagg_dropped": float(len(session.dropped)),
                   "secagg_server_s": session.server_s}
        if session.total is None:
            return SecureSum(session.survivors, None, 0, 0, clip, session.error, session.uplink,
                             session.downlink, dict(session.rejected), metrics)
        total, weight, count = self.fp.decode_sum(session.total, len(session.survivors))
        return SecureSum(session.survivors, total, weight, count, clip, "", session.uplink,
                         session.downlink, dict(session.rejected), metrics)
