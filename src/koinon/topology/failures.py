"""Scheduled node and link failures of a peer network: crashes at given rounds, churn, lost links.

`FailureOptions` (TOML-friendly, `topology.options`): `failures` {round: fraction of all nodes}
crash at that round's start (`failure_choice`: seeded `random` ones, or the highest `degree` /
most `central` (betweenness) of the live graph); `churn` {round: signed fraction}: negative =
that fraction of the live nodes leave (chosen like `failures`), positive = that fraction of the
crashed nodes rejoin (seeded random ones), e.g. `churn = { "10" = -0.3, "20" = 0.3 }` (string
keys are accepted); `crash_loses_data`: a node that rejoins lost its model (and its optimizer /
codec state) and restarts from the average of its live neighbours; `link_failure` p: every
round each edge fails independently with probability p (`PeerNetwork.links`). Every choice is
seeded by (seed, round), so a resumed run replays the same schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from koinon.log import notice
from koinon.seeding import mix_seed
from koinon.topology.peers import PeerNetwork

if TYPE_CHECKING:
    import networkx as nx

FAILURE_CHOICES = ("random", "degree", "central")


def churn_schedule(churn: dict | None) -> dict[int, float]:
    """{round: signed fraction} from a TOML-friendly dict (keys may be strings like "20")."""
    out: dict[int, float] = {}
    for key, value in (churn or {}).items():
        if not str(key).strip().isdigit() or isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"churn {churn!r}: expected {{round: fraction}}, negative = that fraction of "
                             'the live nodes leave, positive = of the crashed nodes rejoin, e.g. { "10" = -0.3 }')
        if not -1.0 <= value <= 1.0:
            raise ValueError(f"churn {{{key}: {value}}}: the fraction must be in [-1, 1]")
        out[int(str(key).strip())] = float(value)
    return out


@dataclass(frozen=True)
class FailureOptions:
    """How nodes and links fail (see the module docstring); checked when built."""

    failures: dict[int, float] = field(default_factory=dict)
    failure_choice: str = "random"
    churn: dict = field(default_factory=dict)
    crash_loses_data: bool = False
    link_failure: float = 0.0

    def __post_init__(self) -> None:
        if self.failure_choice not in FAILURE_CHOICES:
            raise ValueError(f"failure_choice {self.failure_choice!r}; allowed: {', '.join(FAILURE_CHOICES)}")
        for r, fraction in self.failures.items():
            if r < 0 or not 0.0 <= fraction <= 1.0:
                raise ValueError(f"failures {{{r}: {fraction}}}: need round >= 0 and fraction in [0, 1]")
        object.__setattr__(self, "churn", churn_schedule(self.churn))
        if not 0.0 <= self.link_failure <= 1.0:
            raise ValueError(f"link_failure must be a probability in [0, 1], got {self.link_failure}")


class FailureSchedule:
    """Which nodes crash or rejoin at which round."""

    def __init__(self, options: FailureOptions, seed: int) -> None:
        self.options = options
        self.choice = options.failure_choice
        self.seed = seed

    def apply(self, net: PeerNetwork, r: int) -> tuple[list[int], list[int]]:
        """Round r's scheduled crashes (`failures`, then leaving `churn`) and rejoins."""
        crashed: list[int] = []
        failures = self.options.failures
        if r in failures:
            crashed = self.choose_failures(net.graph, net.live, round(failures[r] * net.num_nodes), r)
            net.crash(crashed)
        rejoined: list[int] = []
        change = self.options.churn.get(r, 0.0)
        if change < 0:
            leaving = self.choose_failures(net.graph, net.live, round(-change * int(net.live.sum())),
                                           mix_seed(r, 0x1EA7))
            net.crash(leaving)
            crashed = sorted(set(crashed) | set(leaving))
        elif change > 0:
            rejoined = self.choose_rejoins(net.live, round(change * int((~net.live).sum())), r)
            net.rejoin(rejoined, self.options.crash_loses_data)
        if crashed or rejoined:
            notice(f"round {r + 1}: {len(crashed)} nodes crashed, {len(rejoined)} rejoined, "
                   f"{int(net.live.sum())} live")
        return crashed, rejoined

    def choose_failures(self, graph: nx.Graph, live: torch.Tensor, count: int, round_index: int) -> list[int]:
        """`count` live nodes to fail: seeded random ones, or the most central of the live graph."""
        import networkx as nx
        alive = live.nonzero().flatten().tolist()
        count = min(count, len(alive))
        if self.choice == "random":
            rng = np.random.default_rng([self.seed, round_index, 0xFA11])
            return sorted(int(v) for v in rng.choice(alive, count, replace=False))
        sub = graph.subgraph(alive)
        if self.choice == "degree":
            score = dict(sub.degree())
        else:  # betweenness is O(N E); sample pivots on large graphs to keep it seconds
            k = None if len(alive) <= 300 else 300
            score = nx.betweenness_centrality(sub, k=k, seed=self.seed)
        ranked = sorted(alive, key=lambda v: (-score[v], v))  # ties broken by id: deterministic
        return sorted(ranked[:count])

    def choose_rejoins(self, live: torch.Tensor, count: int, round_index: int) -> list[int]:
        """`count` seeded random crashed nodes to come back."""
        dead = (~live).nonzero().flatten().tolist()
        count = min(count, len(dead))
        rng = np.random.default_rng([self.seed, round_index, 0x4E70])
        return sorted(int(v) for v in rng.choice(dead, count, replace=False)) if count else []
