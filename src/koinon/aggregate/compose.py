"""Composition by name: `nnm+trimmed_mean` is NNM, then the trimmed mean.

`build_aggregator` splits the name on '+', builds every step but the last from
`PRE_AGGREGATORS` and the last from `AGGREGATORS`. The flat `[aggregator]` options are routed to
each step that declares them (a key no step accepts is a one-line `ConfigError`); every step
that takes `num_byzantine` receives f. The final rule checks its assumption on the stack it
actually sees (bucketing shrinks n).
"""

from __future__ import annotations

from typing import Any

import torch

from koinon.aggregate.base import AGGREGATORS, PRE_AGGREGATORS, Aggregator, PreAggregator
from koinon.errors import ConfigError


class Composed:
    """Pre-aggregation steps followed by a final rule; itself an `Aggregator`."""

    def __init__(self, steps: list[PreAggregator], final: Aggregator) -> None:
        self.steps = steps
        self.final = final
        self.name = "+".join([s.name for s in steps] + [final.name])

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            updates, weights = step.transform(updates, weights)
        return self.final.aggregate(updates, weights)

    def _stateful(self) -> list[tuple[str, Any]]:
        parts: list[PreAggregator | Aggregator] = [*self.steps, self.final]
        return [(f"{i}.{p.name}", p) for i, p in enumerate(parts) if hasattr(p, "state_dict")]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.{key}": value
            for prefix, part in self._stateful()
            for key, value in part.state_dict().items()
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for prefix, part in self._stateful():
            part.load_state_dict(
                {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
            )


def build_aggregator(
    name: str,
    options: dict[str, Any] | None = None,
    num_byzantine: int = 0,
    section: str = "aggregator",
) -> Aggregator:
    """Build `name` (a registered aggregator, or `pre+...+final`) with checked options."""
    options = dict(options or {})
    parts = [p.strip() for p in name.split("+")]
    if any(not p for p in parts):
        raise ConfigError(f"{section}.name = {name!r}: empty step in a '+' composition")
    if len(parts) == 1:
        return AGGREGATORS.build(name, options, section, num_byzantine=num_byzantine)
    registries = [PRE_AGGREGATORS] * (len(parts) - 1) + [AGGREGATORS]
    for part, registry in zip(parts, registries, strict=True):
        registry.get(part, key=f"{section}.name")
    accepted = {
        part: registry.options(part) for part, registry in zip(parts, registries, strict=True)
    }
    for key in options:
        if key == "num_byzantine" or not any(key in allowed for allowed in accepted.values()):
            union = sorted({k for a in accepted.values() for k in a} - {"num_byzantine"})
            raise ConfigError(
                f"{section}.{key}: not an option of {name!r}; allowed: {', '.join(union) or '(none)'}"
            )
    built = [
        registry.build(
            part,
            {k: v for k, v in options.items() if k in accepted[part]},
            section,
            num_byzantine=num_byzantine,
        )
        for part, registry in zip(parts, registries, strict=True)
    ]
    return Composed(built[:-1], built[-1])  # type: ignore[arg-type]
