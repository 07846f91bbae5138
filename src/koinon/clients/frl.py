"""FRL: federated rank learning, a supermask whose edge rankings are voted on.

Mozaffari, Shejwalkar & Houmansadr 2023, "Every Vote Counts: Ranking-Based Training of Federated
Learning to Resist Poisoning Attacks", https://arxiv.org/abs/2110.04350. The model's weights are
fixed and random (`model.peft = { name = "supermask", density = ... }`); what is learned is a
ranking of each layer's edges, and the network uses the top `density` of them. Each round a
client starts its scores from the global ranking, trains them with edge-popup, and sends its
own ranking of every layer; the server's new ranking orders the edges by the sum of the
positions the clients gave them (the vote). Here a ranking is carried as positions / n in
[0, 1): the client's update is its positions minus the global ones, so koinon's mean
aggregation is exactly the vote (order by mean position = order by summed position), and the
client re-ranks the mean it receives before training. A client's influence on an edge is one
position in n, whatever it sends. Bytes: the positions travel through the configured codec
(float32 with `identity`; FRL's own encoding would be a permutation, log2(n) bits per edge).
The server refuses any update that is not a ranking of every layer (`check_update`, called by
`FederatedServer` before aggregation), so a client's whole influence is the order it votes for:
FRL's defence against poisoning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from koinon.clients.base import CLIENT_ALGORITHMS, LocalSGD, State
from koinon.params import Layout
from koinon.update import CohortResult

if TYPE_CHECKING:
    from koinon.local.trainer import CohortTrainer


def rank_positions(stack: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Each row's per-layer ranking as positions / n (0 = lowest score), layer by layer."""
    out = stack.clone()
    for e in layout.entries:
        if not e.trainable:
            continue
        seg = stack[:, e.offset : e.offset + e.numel]
        out[:, e.offset : e.offset + e.numel] = seg.argsort(dim=1, stable=True).argsort(dim=1).to(stack.dtype) / e.numel
    return out


def _check(layout: Layout) -> None:
    names = [e.name for e in layout.entries if e.trainable]
    if not names or not all(n.endswith("scores") for n in names):
        raise ValueError('frl trains supermask scores only; set model.peft = { name = "supermask" }')
    big = [e for e in layout.entries if e.trainable and e.numel > MAX_EDGES]
    if big:
        raise ValueError(f"frl: layer {big[0].name} has {big[0].numel} edges; rankings travel as float32 "
                         f"position / edges, exact up to {MAX_EDGES} edges a layer")


# A ranking travels as position / numel in float32 (24-bit significand): positions stay within
# 0.25 of an integer, which the server's check needs, up to 2^21 edges a layer.
MAX_EDGES = 1 << 21


@CLIENT_ALGORITHMS.register("frl")
class FRL(LocalSGD):
    """Supermask rankings, aggregated by voting (Mozaffari et al. 2023)."""

    name = "frl"

    def __init__(self, layout: Layout | None = None) -> None:
        if layout is not None:
            _check(layout)
        self.layout = layout  # the server's check needs each layer's extent

    def check_update(self, received: torch.Tensor, update: torch.Tensor) -> str:
        """Why `update` (from the model `received`) is not a ranking of every layer ('' if it is)."""
        if self.layout is None:
            raise ValueError("frl: the server's ranking check needs the model layout "
                             "(FRL(layout=Layout.from_module(model)); Federation passes it)")
        ranks = received + update
        for e in self.layout.entries:
            if not e.trainable:
                continue
            positions = ranks[e.offset : e.offset + e.numel] * e.numel
            whole = positions.round()
            if not bool(torch.isfinite(positions).all()) or float((positions - whole).abs().max()) > 0.25 \
                    or not torch.equal(whole.sort().values, torch.arange(e.numel, dtype=whole.dtype)):
                return f"frl: the update is not a ranking of {e.name}'s {e.numel} edges"
        return ""

    def start(self, trainer: CohortTrainer, client_ids: list[int], global_params: torch.Tensor,
              server_state: State, client_states: list[State]) -> torch.Tensor:
        _check(trainer.layout)
        rows = global_params.unsqueeze(0).expand(len(client_ids), -1) if global_params.dim() == 1 else global_params
        return rank_positions(rows, trainer.layout)

    def train_cohort(
        self, trainer: CohortTrainer, client_ids: list[int], global_params: torch.Tensor,
        server_state: State, client_states: list[State], idx: torch.Tensor, steps: torch.Tensor,
        seed: int, round_index: int,
    ) -> CohortResult:
        result = trainer.run_steps(client_ids, global_params, server_state, client_states, idx, steps)
        assert result.deltas is not None
        final = rank_positions(global_params + result.deltas, trainer.layout)
        result.deltas = final - global_params
        return result
