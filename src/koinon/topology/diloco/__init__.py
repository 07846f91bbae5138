"""Training across compute islands: DiLoCo, Streaming DiLoCo and CO2, as a topology.

The protocol (inner steps on each island, outer steps on the averaged pseudo-gradients,
fragments, overlap) is here; `DiLoCo` simulates M islands in one process (a vmapped stack). The
process driver, `koinon.islands` (`koinon launch`, torchrun), runs the same `IslandsEngine` in
real worker processes that exchange codec bytes over torch.distributed (gloo).
"""

from koinon.topology.diloco.build import IslandsParts, build_parts
from koinon.topology.diloco.diloco import DiLoCo, IslandsRound, params_hash
from koinon.topology.diloco.engine import Exchange, IslandsEngine, LocalExchange
from koinon.topology.diloco.fragments import fragment_indices
from koinon.topology.diloco.spec import IslandsSpec

__all__ = [
    "DiLoCo", "Exchange", "IslandsEngine", "IslandsParts", "IslandsRound", "IslandsSpec",
    "LocalExchange", "build_parts", "fragment_indices", "params_hash",
]
