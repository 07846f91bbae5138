"""Training across compute islands: DiLoCo, Streaming DiLoCo and CO2.

Two execution modes with the same math: `DiLoCo` simulates M workers in one process (a vmapped
stack), and `koinon launch --workers M CONFIG.toml` runs real worker processes that exchange
codec bytes over torch.distributed (gloo), survive a worker's death and accept joiners.
"""

from koinon.islands.build import IslandsParts, build_parts
from koinon.islands.engine import Exchange, IslandsEngine, LocalExchange
from koinon.islands.fragments import fragment_indices
from koinon.islands.spec import IslandsSpec
from koinon.islands.topology import DiLoCo, IslandsRound, params_hash

__all__ = [
    "DiLoCo", "Exchange", "IslandsEngine", "IslandsParts", "IslandsRound", "IslandsSpec",
    "LocalExchange", "build_parts", "fragment_indices", "params_hash",
]
