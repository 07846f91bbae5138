"""AutoFLIP: federated hybrid (structured + unstructured) pruning guided by loss exploration.

"Federated Hybrid Model Pruning through Loss Landscape Exploration" (AutoFLIP). The abstract
says: a federated loss-exploration phase jointly analyzes the clients' non-IID loss landscapes
and identifies model substructures to prune at structured and unstructured levels, cutting
computation and communication. It leaves open the importance score, the pruning schedule and
the granularity. Our reading:

- exploration: FedLEx's (`koinon.clients.fedlex`): for `explore_rounds` rounds clients train as
  FedAvg and upload the per-parameter standard deviation of their local gradients; the server
  averages them into the importance D (a parameter whose gradient barely varies over the
  clients' loss landscapes contributes little to what the model can still learn);
- pruning, once, at the server after the last exploration round, on the weight matrices and
  kernels (entries with two or more dims; biases and normalization parameters are small and
  stay dense):
  structured: in every such layer but the last (its outputs are the model's outputs), the
  `structured` fraction of output neurons / channels with the lowest mean importance is removed,
  with their biases (the entry of the same module named `bias`);
  unstructured: of the weight coordinates left, the `sparsity` fraction with the lowest
  importance (one global threshold, ties broken by position);
- pruned training: the fixed 0/1 mask is server state, downloaded by every sampled client (the
  wire sends it each round: one model-sized tensor; all zeros, "no mask yet", while exploring);
  a client starts from the received model times the mask and its gradients are zero on pruned
  coordinates, so they stay exactly zero (SGD with momentum or weight decay, AdamW alike). Its
  update is then zero there, except in the first pruned round, where it carries -w once and so
  zeroes the global model's pruned weights (with the plain FedAvg server step). A sparse uplink
  codec (e.g. `threshold` with a tiny threshold, which keeps every non-zero) turns the zeros
  into bytes saved; `pruned_macs` gives the share of multiply-adds the mask removes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from koinon.clients.base import CLIENT_ALGORITHMS, State
from koinon.clients.fedlex import FedLEx
from koinon.params import Layout
from koinon.update import CohortResult

if TYPE_CHECKING:
    from koinon.local.trainer import CohortTrainer


def hybrid_mask(importance: torch.Tensor, layout: Layout, sparsity: float, structured: float) -> torch.Tensor:
    """`[numel]` 0/1 mask: structured pruning of output neurons, then unstructured of weights."""
    mask = torch.ones(layout.numel)
    weights = [e for e in layout.entries if e.trainable and len(e.shape) >= 2]
    biases = {e.name: e for e in layout.entries if e.trainable and len(e.shape) == 1}
    for e in weights[:-1]:
        rows = e.shape[0]
        drop = int(structured * rows)
        if drop == 0:
            continue
        score = importance[e.offset: e.offset + e.numel].view(rows, -1).mean(dim=1)
        gone = torch.argsort(score, stable=True)[:drop]
        mask[e.offset: e.offset + e.numel].view(rows, -1)[gone] = 0.0
        bias = biases.get(e.name.rsplit(".", 1)[0] + ".bias")
        if bias is not None and bias.numel == rows:
            mask[bias.offset: bias.offset + rows][gone] = 0.0
    if sparsity > 0 and weights:
        coords = torch.cat([torch.arange(e.offset, e.offset + e.numel) for e in weights])
        alive = coords[mask[coords] > 0]
        drop = int(sparsity * len(alive))
        gone = alive[torch.argsort(importance[alive], stable=True)[:drop]]
        mask[gone] = 0.0
    return mask


def pruned_macs(model: nn.Module, layout: Layout, mask: torch.Tensor, x: torch.Tensor) -> float:
    """Share of the weight multiply-adds of one forward pass on `x` that the mask removes: each
    weight of a layer is used once per output position (1 for a linear layer, L for a conv1d)."""
    offsets = {e.name: e for e in layout.entries if e.trainable and len(e.shape) >= 2}
    total = pruned = 0.0
    hooks = []
    for mod_name, module in model.named_modules():
        entry = offsets.get(f"{mod_name}.weight" if mod_name else "weight")
        if entry is None:
            continue

        def hook(_m: nn.Module, _i: object, out: object, e=entry) -> None:
            nonlocal total, pruned
            if isinstance(out, torch.Tensor):
                positions = out[0].numel() / e.shape[0]
                total += e.numel * positions
                pruned += float((mask[e.offset: e.offset + e.numel] == 0).sum()) * positions

        hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in hooks:
            h.remove()
    return pruned / total if total else 0.0


@CLIENT_ALGORITHMS.register("autoflip")
class AutoFLIP(FedLEx):
    """Loss exploration, then a fixed hybrid pruning mask the clients train under."""

    name = "autoflip"
    uploads: tuple[str, ...] = ("deviation",)
    downloads: tuple[str, ...] = ("mask",)

    def __init__(self, explore_rounds: int = 2, sparsity: float = 0.5, structured: float = 0.2,
                 layout: Layout | None = None) -> None:
        if not 0.0 <= sparsity < 1.0:  # explore_rounds: checked by FedLEx's constructor below
            raise ValueError(f"client.sparsity must be in [0, 1), got {sparsity}")
        if not 0.0 <= structured < 1.0:
            raise ValueError(f"client.structured must be in [0, 1), got {structured}")
        if layout is None:
            raise ValueError("autoflip needs the model's layout (it prunes per layer)")
        super().__init__(explore_rounds, layout=layout)
        self.layout, self.sparsity, self.structured = layout, sparsity, structured

    def init_server_state(self, numel: int) -> State:
        return {"mask": torch.zeros(numel), "explored": torch.zeros(numel), "rounds": torch.zeros(1)}

    def begin(self, global_params: torch.Tensor, server_state: State, client_states: list[State]) -> State:
        mask = server_state.get("mask")
        if mask is not None and bool(mask.any()):
            return {"mask": mask}
        return super().begin(global_params, {}, client_states)

    def start(self, trainer: CohortTrainer, client_ids: list[int], global_params: torch.Tensor,
              server_state: State, client_states: list[State]) -> torch.Tensor:
        mask = server_state.get("mask")
        return global_params * mask if mask is not None and bool(mask.any()) else global_params

    def train_cohort(
        self, trainer: CohortTrainer, client_ids: list[int], global_params: torch.Tensor,
        server_state: State, client_states: list[State], idx: torch.Tensor, steps: torch.Tensor,
        seed: int, round_index: int,
    ) -> CohortResult:
        result = trainer.run_steps(client_ids, global_params, server_state, client_states, idx, steps)
        mask = server_state.get("mask")
        if mask is not None and bool(mask.any()) and result.deltas is not None:
            # The trainer measures the update from where the client started (the masked model);
            # the server needs it from the model it sent: -w on pruned coordinates that are not yet zero.
            result.deltas = result.deltas - global_params * (1.0 - mask)
        return result

    def correct(self, theta: torch.Tensor, grad: torch.Tensor, theta0: torch.Tensor, ctx: State) -> None:
        if "mask" in ctx:
            grad.mul_(ctx["mask"][: grad.shape[1]])
            return
        super().correct(theta, grad, theta0, ctx)

    def end(
        self, theta0: torch.Tensor, theta: torch.Tensor, num_steps: torch.Tensor, lr: float, ctx: State
    ) -> tuple[dict[str, torch.Tensor], list[State]]:
        if "mask" in ctx:
            return {"deviation": torch.zeros_like(theta)}, [{} for _ in range(theta.shape[0])]
        return super().end(theta0, theta, num_steps, lr, ctx)

    def server_update(
        self, server_state: State, uploads: dict[str, torch.Tensor], cohort_fraction: float
    ) -> State:
        rounds = int(server_state["rounds"].item())
        if rounds >= self.explore_rounds:
            return server_state
        explored = server_state["explored"] + uploads["deviation"]
        rounds += 1
        mask = server_state["mask"]
        if rounds == self.explore_rounds:
            mask = hybrid_mask(explored / rounds, self.layout, self.sparsity, self.structured)
        return {"mask": mask, "explored": explored, "rounds": torch.tensor([float(rounds)])}
