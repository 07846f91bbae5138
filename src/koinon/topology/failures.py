"""Scheduled node failures of a gossip network: crashes at given rounds and churn.

`failures` {round: fraction of all nodes} crash at that round's start (`choice`: seeded
`random` ones, or the highest `degree` / most `central` (betweenness) of the live graph);
`churn` {round: signed fraction}: negative = that fraction of the live nodes leave (chosen like
`failures`), positive = that fraction of the crashed nodes rejoin (seeded random ones). Every
choice is seeded by (seed, round), so a resumed run replays the same schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import networkx as nx
import numpy as np
import torch

from koinon.log import notice
from koinon.seeding import mix_seed

if TYPE_CHECKING:
    from koinon.topology.gossip import Gossip

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
class FailureSchedule:
    """Which nodes crash or rejoin at which round (see the module docstring)."""

    failures: dict[int, float]
    churn: dict[int, float]
    choice: str
    seed: int

    @staticmethod
    def build(failures: dict[int, float] | None, churn: dict | None, choice: str, seed: int) -> FailureSchedule:
        """A checked schedule from the TOML-friendly options."""
        if choice not in FAILURE_CHOICES:
            raise ValueError(f"failure_choice {choice!r}; allowed: {', '.join(FAILURE_CHOICES)}")
        for r, fraction in (failures or {}).items():
            if r < 0 or not 0.0 <= fraction <= 1.0:
                raise ValueError(f"failures {{{r}: {fraction}}}: need round >= 0 and fraction in [0, 1]")
        return FailureSchedule(dict(failures or {}), churn_schedule(churn), choice, seed)


    def apply(self, net: Gossip, r: int) -> tuple[list[int], list[int]]:
        """Round r's scheduled crashes (`failures`, then leaving `churn`) and rejoins."""
        crashed: list[int] = []
        if r in self.failures:
            crashed = self.choose_failures(net.graph, net.live, round(self.failures[r] * net.num_nodes), r)
            net.crash(crashed)
        rejoined: list[int] = []
        change = self.churn.get(r, 0.0)
        if change < 0:
            leaving = self.choose_failures(net.graph, net.live, round(-change * int(net.live.sum())),
                                           mix_seed(r, 0x1EA7))
            net.crash(leaving)
            crashed = sorted(set(crashed) | set(leaving))
        elif change > 0:
            rejoined = self.choose_rejoins(net.live, round(change * int((~net.live).sum())), r)
            net.rejoin(rejoined)
        if crashed or rejoined:
            notice(f"round {r + 1}: {len(crashed)} nodes crashed, {len(rejoined)} rejoined, "
                   f"{int(net.live.sum())} live")
        return crashed, rejoined

    def choose_failures(self, graph: nx.Graph, live: torch.Tensor, count: int, round_index: int) -> list[int]:
        """`count` live nodes to fail: seeded random ones, or the most central of the live graph."""
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
