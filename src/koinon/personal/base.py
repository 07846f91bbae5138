"""What personalized methods share: the `personalize` hook, partial training, layer masks.

A personalized client algorithm is a `ClientAlgorithm` (`koinon.local.algorithm`) with one more
hook,

    personalize(trainer, client_ids, global_params, server_state, client_states, seed, round_index)
        -> [K, P]

that returns the model each client serves: from its persistent state where it has one (a
private head, a personal model, its cluster), and otherwise by the method's new-client
procedure (fine-tune, train a head, pick a cluster) on the client's own training data. The
evaluation (`koinon.personal.evaluate`) calls it; so would a deployed client that serves
predictions. `trainer` is a `CohortTrainer` over the clients' data.
"""

from __future__ import annotations

import dataclasses

import torch

from koinon.clients.base import LocalSGD
from koinon.local.algorithm import State
from koinon.local.trainer import CohortTrainer
from koinon.params import Layout
from koinon.seeding import generator


class Frozen(LocalSGD):
    """Local SGD that leaves the coordinates where `frozen` (`[P]` bool) is True unchanged:
    their gradient is zeroed before the step (plain SGD, so they do not move; with momentum or
    weight decay they would, so `train_part` uses plain SGD)."""

    name = "frozen"

    def __init__(self, frozen: torch.Tensor) -> None:
        self.frozen = frozen

    def correct(self, theta: torch.Tensor, grad: torch.Tensor, theta0: torch.Tensor, ctx: State) -> None:
        grad[:, self.frozen[: grad.shape[1]]] = 0.0


def train_part(trainer: CohortTrainer, client_ids: list[int], starts: torch.Tensor, steps: int, seed: int,
               round_index: int, frozen: torch.Tensor | None = None, algorithm=None) -> torch.Tensor:
    """`[K, P]`: `steps` local steps of plain SGD (the trainer's lr and batch size) from `starts`
    (`[P]` or `[K, P]`) on each client's own training data, leaving `frozen` coordinates as they
    are, or with `algorithm`'s hooks (e.g. a proximal term)."""
    from koinon.personal.evaluate import with_steps

    k = len(client_ids)
    stack = starts.unsqueeze(0).repeat(k, 1) if starts.dim() == 1 else starts.clone()
    if steps <= 0 or k == 0:
        return stack
    other = with_steps(trainer, steps)
    other.local = dataclasses.replace(other.local, optimizer="sgd", momentum=0.0, nesterov=False, weight_decay=0.0)
    other.optimizer = other.local.build_optimizer()
    idx, n = other.schedule(client_ids, seed, round_index)
    alg = algorithm if algorithm is not None else (Frozen(frozen) if frozen is not None else LocalSGD())
    result = other.run_steps(client_ids, stack, {}, [{} for _ in client_ids], idx, n, algorithm=alg)
    assert result.deltas is not None
    return stack + result.deltas


def module_prefixes(layout: Layout) -> list[str]:
    """The modules that own parameters, in layout order (`"3"` for `"3.weight"`)."""
    seen: list[str] = []
    for e in layout.entries:
        prefix = e.name.rpartition(".")[0]
        if prefix not in seen:
            seen.append(prefix)
    return seen


def prefix_mask(layout: Layout, prefixes: list[str]) -> torch.Tensor:
    """`[P]` bool: True on every entry of the modules named by `prefixes`."""
    mask = torch.zeros(layout.numel, dtype=torch.bool)
    for e in layout.entries:
        if e.name.rpartition(".")[0] in prefixes:
            mask[e.offset : e.offset + e.numel] = True
    return mask


def head_mask(layout: Layout, head: list[str] | None = None) -> torch.Tensor:
    """`[P]` bool: the head, i.e. the modules `head` names, or by default the last module with
    parameters (the output layer)."""
    names = head or module_prefixes(layout)[-1:]
    unknown = [h for h in names if h not in module_prefixes(layout)]
    if unknown:
        raise ValueError(f"client.head names {unknown[0]!r}, not a module of the model "
                         f"(modules with parameters: {', '.join(module_prefixes(layout))})")
    return prefix_mask(layout, names)


def norm_mask(layout: Layout, layers: list[str] | None = None) -> torch.Tensor:
    """`[P]` bool: the normalization layers, i.e. the modules `layers` names, or by default every
    module all of whose parameters and buffers are vectors (BatchNorm's and LayerNorm's weight,
    bias and running statistics are 1-D; a Linear or a convolution has a 2-D or larger weight).
    The default is a choice of ours: the layout carries names and shapes, not module types."""
    if layers:
        return head_mask(layout, layers)
    dims: dict[str, int] = {}
    for e in layout.entries:
        prefix = e.name.rpartition(".")[0]
        dims[prefix] = max(dims.get(prefix, 0), len(e.shape))
    return prefix_mask(layout, [p for p, d in dims.items() if d == 1])


def private_models(global_params: torch.Tensor, mask: torch.Tensor, client_states: list[State]) -> torch.Tensor:
    """`[K, P]`: the global model with each client's private coordinates (`~mask`) from its
    state where it has them."""
    stack = global_params.unsqueeze(0).repeat(len(client_states), 1)
    for i, st in enumerate(client_states):
        if "private" in st:
            stack[i, ~mask] = st["private"]
    return stack


def has_state(client_states: list[State], key: str) -> torch.Tensor:
    return torch.tensor([key in st for st in client_states], dtype=torch.bool)


def personal_downlinks(algorithm: object, server_state: State, cohort: list[int], states: list[State], codec,
                       seed: int, round_index: int) -> tuple[list[State], int]:
    """Each client's state with what the server sends to it alone (the algorithm's optional
    `downlink_for(server_state, client) -> State`, e.g. FedCAC's customized model), as the
    client decodes it from the downlink codec's bytes; and the bytes sent."""
    if getattr(algorithm, "downlink_for", None) is None:
        return states, 0
    out, nbytes = [], 0
    for c, st in zip(cohort, states):
        extra = {}
        for name, payload in personal_payloads(algorithm, server_state, c, codec, seed, round_index):
            nbytes += len(payload)
            extra[name] = codec.decode(payload)
        out.append({**st, **extra})
    return out, nbytes


def personal_payloads(algorithm: object, server_state: State, client: int, codec, seed: int,
                      round_index: int) -> list[tuple[str, bytes]]:
    """The bytes the server sends to `client` alone in round `round_index` (the algorithm's
    `downlink_for`, by name, each encoded by the downlink codec from a fresh state with a
    generator of (seed, round, client, stream)): the simulation's and `koinon server`'s."""
    hook = getattr(algorithm, "downlink_for", None)
    if hook is None:
        return []
    return [(name, codec.encode(tensor, codec.init_state(), generator(seed, round_index, client, 0xD0A1, i))[0])
            for i, (name, tensor) in enumerate(sorted(hook(server_state, client).items()))]
