"""FedConv: heterogeneous sub-models by convolutional compression, merged by transposed convolution.

"FedConv: A Learning-on-Model Paradigm for Heterogeneous Federated Clients". A client of budget b = 1/r (r = 1, 2, 3, ...)
trains a sub-model whose hidden layers are r times narrower than the global model's: the
global model compressed by a convolution along each layer's unit axis (kernel r, stride r).
The sub-model is trained as it is, with no decompression, and its change is dilated back to
the global size by the transposed convolution (kernel r, stride r) and averaged as in FedAvg.

On each layer (a Linear's or a convolution's weight `[out, in, ...]` and bias `[out]`):
- compression C_r: each group of r consecutive output units becomes one unit, the mean of the
  group's incoming weights and biases (the convolution with kernel 1/r); on the input axis, a
  layer after a compressed one sums the group's outgoing weights (kernel of ones), so a group of
  equal units gives the next layer the same pre-activation; per-unit vectors in between
  (LayerNorm's weight and bias) are averaged like the units;
- dilation D_r: the transposed convolutions of these kernels, i.e. each sub-model unit is copied
  to the r units of its group (output axis) and its outgoing weights are split evenly between
  them (input axis); C_r(D_r(w)) = w, and D_r(C_r(w)) averages every group.
The head's output units (the classes) are never compressed. The global model and a budget-1
client are exactly FedAvg's.

Choices of ours where the paper does more or leaves room:
- the paper *learns* the compression and dilation kernels on the server from a small public
  dataset; koinon's server has no public data in this setting, so the kernels stay at the
  fixed averaging / copying kernels above (the paper's kernels are learned starting from a
  comparable shape); a learned server-side step is future work;
- the server dilates the sub-model's *change* (D_r(trained) - D_r(C_r(global))) rather than the
  sub-model itself, so the global model loses nothing a client did not train; since D_r is
  linear and fixed, the client can dilate before uploading and the server averages full-size
  changes: the protocol is FedAvg's (so it runs in `koinon server` / `koinon client`), but the
  bytes on the wire are the full model's, not the sub-model's (`submodel_share` gives the share
  of parameters a client actually trains);
- each client serves its sub-model (the compressed global model) after `adapt_steps` SGD steps
  on its own data (FedConv is not a personalization method of its own; this matches the
  fine-tuning baseline).

Works on `nn.Sequential` models of Linear / Conv1d / Conv2d layers with activations, Flatten,
pooling, LayerNorm or BatchNorm without running statistics between them (`mlp`, `mlp_norm`,
`cnn`, `cnn1d`); each hidden width must be divisible by r.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from koinon.clients.base import CLIENT_ALGORITHMS, LocalSGD, State
from koinon.params import Layout
from koinon.personal.evaluate import with_steps
from koinon.personal.hetero import (
    Predictor,
    budget_of,
    check_budgets,
    check_plain_sgd,
    mean_ce,
    sgd_loop,
)
from koinon.update import CohortResult

if TYPE_CHECKING:
    from koinon.local.trainer import CohortTrainer

WIDTH = (nn.Linear, nn.Conv1d, nn.Conv2d)
NORMS = (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d)


def factor_of(budget: float) -> int:
    """The width divisor r of budget b = 1/r (a clear error for a budget that is not 1/r)."""
    r = round(1.0 / budget)
    if abs(r * budget - 1.0) > 1e-6:
        raise ValueError(f"client.budgets of 'fedconv' must be 1/r for whole r (1, 0.5, 0.25, ...), got {budget}")
    return r


@dataclass(frozen=True)
class _Param:
    name: str
    out_axis: bool  # its first axis is a compressed unit axis
    in_units: int  # > 0: its second axis holds these many units of a compressed layer (times `spatial`)


def plan(module: nn.Module, layout: Layout) -> list[_Param]:
    """How each parameter of `module` is compressed (see the module docstring)."""
    if not isinstance(module, nn.Sequential):
        raise ValueError("client.algorithm = 'fedconv' needs an nn.Sequential of Linear / convolution layers "
                         "(models mlp, mlp_norm, cnn, cnn1d)")
    children = list(module.named_children())
    width_idx = [i for i, (_, m) in enumerate(children) if isinstance(m, WIDTH)]
    if len(width_idx) < 2:
        raise ValueError("client.algorithm = 'fedconv' needs at least two Linear / convolution layers")
    for _, m in children:
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.track_running_stats:
            raise ValueError("client.algorithm = 'fedconv' cannot compress BatchNorm running statistics")
    out: list[_Param] = []
    prev_units = 0  # units of the last compressed layer, feeding the next width layer
    for i, (name, m) in enumerate(children):
        if isinstance(m, WIDTH):
            is_head = i == width_idx[-1]
            out.append(_Param(f"{name}.weight", not is_head, prev_units))
            if m.bias is not None:
                out.append(_Param(f"{name}.bias", not is_head, 0))
            prev_units = 0 if is_head else (m.out_features if isinstance(m, nn.Linear) else m.out_channels)
        elif isinstance(m, NORMS):
            for p, _ in m.named_parameters():
                out.append(_Param(f"{name}.{p}", prev_units > 0, 0))
    names = {e.name for e in layout.entries}
    if {p.name for p in out} != names:
        raise ValueError("client.algorithm = 'fedconv': the model has parameters outside its Linear / convolution "
                         f"/ normalization layers ({sorted(names - {p.name for p in out})})")
    return out


def _groups(t: torch.Tensor, axis: int, r: int) -> torch.Tensor:
    shape = list(t.shape)
    if shape[axis] % r:
        raise ValueError(f"client.algorithm = 'fedconv': a layer of width {shape[axis]} cannot be compressed "
                         f"by {r} (each hidden width must be divisible by 1/budget)")
    return t.reshape(*shape[:axis], shape[axis] // r, r, *shape[axis + 1 :])


def _in_view(t: torch.Tensor, units: int) -> torch.Tensor:
    """A weight `[out, in, ...]` as `[out, units, in / units, ...]` (a Linear after Flatten
    sees each channel's positions one after the other)."""
    return t.reshape(t.shape[0], units, t.shape[1] // units, *t.shape[2:])


def compress(views: dict[str, torch.Tensor], spec: list[_Param], r: int) -> dict[str, torch.Tensor]:
    """C_r of a model given as name -> tensor (see the module docstring)."""
    out = {}
    for p in spec:
        t = views[p.name]
        if r > 1 and p.out_axis:
            t = _groups(t, 0, r).mean(dim=1)
        if r > 1 and p.in_units:
            v = _in_view(t, p.in_units)
            v = _groups(v, 1, r).sum(dim=2)
            t = v.reshape(v.shape[0], -1, *v.shape[3:])
        out[p.name] = t
    return out


def dilate(sub: dict[str, torch.Tensor], spec: list[_Param], r: int) -> dict[str, torch.Tensor]:
    """D_r: a sub-model (or its change) back to the global model's shapes."""
    out = {}
    for p in spec:
        t = sub[p.name]
        if r > 1 and p.out_axis:
            t = t.repeat_interleave(r, dim=0)
        if r > 1 and p.in_units:
            v = _in_view(t, p.in_units // r).repeat_interleave(r, dim=1) / r
            t = v.reshape(v.shape[0], -1, *v.shape[3:])
        out[p.name] = t
    return out


def sub_forward(module: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The sub-model's outputs: `module`'s layers with the (narrower) tensors of `params`."""
    for name, m in module.named_children():
        if isinstance(m, nn.Linear):
            x = F.linear(x, params[f"{name}.weight"], params.get(f"{name}.bias"))
        elif isinstance(m, nn.Conv1d):
            x = F.conv1d(x, params[f"{name}.weight"], params.get(f"{name}.bias"), m.stride, m.padding, m.dilation)
        elif isinstance(m, nn.Conv2d):
            x = F.conv2d(x, params[f"{name}.weight"], params.get(f"{name}.bias"), m.stride, m.padding, m.dilation)
        elif isinstance(m, nn.LayerNorm):
            w = params[f"{name}.weight"]
            x = F.layer_norm(x, tuple(w.shape), w, params.get(f"{name}.bias"), m.eps)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            x = F.batch_norm(x, None, None, params.get(f"{name}.weight"), params.get(f"{name}.bias"), True, 0.0, m.eps)
        else:
            x = m(x)
    return x


def _flat(d: dict[str, torch.Tensor], spec: list[_Param]) -> torch.Tensor:
    return torch.cat([d[p.name].reshape(-1) for p in spec])


def _unflat(flat: torch.Tensor, like: dict[str, torch.Tensor], spec: list[_Param]) -> dict[str, torch.Tensor]:
    out, at = {}, 0
    for p in spec:
        n = like[p.name].numel()
        out[p.name] = flat[at : at + n].view(like[p.name].shape)
        at += n
    return out


@CLIENT_ALGORITHMS.register("fedconv")
class FedConv(LocalSGD):
    """FedConv: each client trains a sub-model r = 1/budget times narrower."""

    name = "fedconv"

    def __init__(self, budgets: list = [1.0], adapt_steps: int = 20) -> None:  # noqa: B006
        self.budgets = check_budgets(budgets, self.name)
        for b in self.budgets:
            factor_of(b)
        if not isinstance(adapt_steps, int) or isinstance(adapt_steps, bool) or adapt_steps < 0:
            raise ValueError(f"client.adapt_steps must be an integer >= 0, got {adapt_steps!r}")
        self.adapt_steps = adapt_steps

    def submodel(self, trainer: CohortTrainer, global_params: torch.Tensor, client: int
                 ) -> tuple[list[_Param], int, dict[str, torch.Tensor]]:
        spec = plan(trainer.module, trainer.layout)
        r = factor_of(budget_of(self.budgets, client))
        return spec, r, compress(trainer.layout.views(global_params), spec, r)

    def submodel_share(self, trainer: CohortTrainer, budget: float) -> float:
        """The share of the global model's parameters a client of `budget` trains."""
        spec = plan(trainer.module, trainer.layout)
        sub = compress(trainer.layout.views(torch.zeros(trainer.layout.numel)), spec, factor_of(budget))
        return sum(t.numel() for t in sub.values()) / trainer.layout.numel

    def _train(self, trainer: CohortTrainer, client: int, global_params: torch.Tensor, batches: torch.Tensor,
               steps: int) -> tuple[list[_Param], int, dict[str, torch.Tensor], dict[str, torch.Tensor], float]:
        spec, r, sub = self.submodel(trainer, global_params, client)
        module = trainer.module

        def loss_of(ts: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return mean_ce(sub_forward(module, _unflat(ts[0], sub, spec), x), y)

        (trained,), loss = sgd_loop(trainer.local, trainer.x_train, trainer.y_train, batches, steps,
                                    [_flat(sub, spec)], loss_of)
        return spec, r, sub, _unflat(trained, sub, spec), loss

    def train_cohort(self, trainer: CohortTrainer, client_ids: list[int], global_params: torch.Tensor,
                     server_state: State, client_states: list[State], idx: torch.Tensor, steps: torch.Tensor,
                     seed: int, round_index: int) -> CohortResult:
        check_plain_sgd(trainer.local, self.name)
        if trainer.layout.num_trainable != trainer.layout.numel:
            raise ValueError("client.algorithm = 'fedconv' needs a model without buffers")
        deltas, losses = [], []
        for i, c in enumerate(client_ids):
            spec, r, sub, trained, loss = self._train(trainer, c, global_params, idx[i], int(steps[i]))
            change = dilate({k: trained[k] - sub[k] for k in sub}, spec, r)
            delta = torch.zeros_like(global_params)
            for name, view in trainer.layout.views(delta).items():
                view.copy_(change[name])
            deltas.append(delta)
            losses.append(loss)
        return CohortResult(list(client_ids), torch.stack(deltas), {}, trainer.sizes(client_ids), steps.clone(),
                            torch.tensor(losses), [{} for _ in client_ids])

    def personal_predictors(self, trainer: CohortTrainer, client_ids: list[int], global_params: torch.Tensor,
                            server_state: State, client_states: list[State], seed: int,
                            round_index: int) -> list[Predictor]:
        """Each client's sub-model after `adapt_steps` SGD steps on its own data."""
        out: list[Predictor] = []
        other = with_steps(trainer, self.adapt_steps)
        for c in client_ids:
            batches = other.client_batches(c, seed, round_index)
            _, _, _, trained, _ = self._train(trainer, c, global_params, batches, self.adapt_steps)

            def predict(x: torch.Tensor, params: dict[str, torch.Tensor] = trained) -> torch.Tensor:
                with torch.no_grad():
                    return sub_forward(trainer.module, params, x)

            out.append(predict)
        return out


__all__ = ["FedConv", "compress", "dilate", "factor_of", "plan", "sub_forward"]
