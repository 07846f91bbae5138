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

Learnt kernels (the paper's learning-on-model, `kernels = "learnt"`): the server holds
`data.public_samples` training samples that no client holds any more (set aside by seed before
training, as FLTrust's root data: `koinon.server.root.reserve_public`), and on them it learns
- the compression kernels: for each factor r and each compressed layer, an output-axis kernel
  a (r values, starting at the averaging kernel 1/r) and an input-axis kernel b for the next
  layer (r values, starting at ones); the sub-model unit g is sum_j a_j unit(g r + j), the next
  layer's column g is sum_j b_j column(g r + j) (a convolution of kernel r and stride r along the
  unit axis: one kernel shared by every group of the layer). They take `kernel_steps` steps of
  Adam (learning rate `kernel_lr` times the kernel's starting size) on the mean cross-entropy of the compressed global model
  C_r(w) on the public set, from the averaging / summing kernels, before every round (a function
  of the global model the clients receive, so every runtime computes the same kernels);
- the dilation kernels: the transposed convolutions' kernels c (output axis: unit g r + j is
  c_j times sub-unit g, starting at ones) and d (input axis: starting at 1/r). When a round's
  updates arrive (`server_rows`, before aggregation), each sub-model change is dilated by D_r with
  the kernels of its factor, and the kernels take `kernel_steps` Adam steps on the public loss of
  the model the aggregation gives, w + sum_k p_k D_{r_k}(change_k) (p_k: the clients' sample
  weights, FedAvg's; budget-1 clients' changes as they are), from the copying kernels; the
  aggregator then averages the changes dilated by the learnt kernels, as FedAvg does (the paper
  aggregates the dilated models by weighted averaging; the weights are FedAvg's here).
- LayerNorm's per-unit weight and bias keep the fixed mean / copy (they are not convolved).
`kernels = "fixed"` (the default: on our benchmarks the learnt kernels measured no better, see
the README) keeps the fixed kernels and needs no public data. `kernel_shape = "unit"` learns one
value per unit instead of a kernel shared by the groups (a locally connected variant, ours).

Choices of ours where the paper does more or leaves room:
- the kernels start from the fixed ones each time and are learnt anew from the current model /
  the round's changes (no state carried between rounds, so a round is a function of its inputs);
- the server dilates the sub-model's *change* (D_r(trained) - D_r(C_r(global))) rather than the
  sub-model itself, so the global model loses nothing a client did not train;
- on the wire (`upload`): with `"submodel"` (the default with learnt kernels) a client sends
  only its sub-model change, float32 in its own wire format (`decode_update`: a budget-1/r client
  sends about 1/r of a hidden layer's parameters; the codec does not apply), which the server
  dilates by the fixed kernels into the model's frame; with `"full"` (the default with fixed
  kernels: the FedAvg protocol, through any codec, secure aggregation and DP) the client sends
  that full-size dilation itself. Either way the server recovers the sub-model change exactly
  (C_r(D_r(u)) = u for the fixed pair) and, with learnt kernels, dilates it again with them.
  The compression kernels a client needs are a few dozen floats, not counted (the paper's
  server compresses and sends the sub-model itself); the downlink is the full model's broadcast;
- learnt kernels need the server to run the model on its public data: `koinon server` refuses
  them in one line (it runs `fedconv` with `kernels = "fixed"`), and so do secure aggregation
  and DP (the server dilates each client's update);
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

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from koinon.clients.base import CLIENT_ALGORITHMS, LocalSGD, State
from koinon.errors import CodecError
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
    out_unit: int = -1  # out_axis: the index (among compressed layers) of the layer whose units it holds
    in_unit: int = -1  # in_units: the index of the compressed layer feeding it
    norm: bool = False  # a normalization layer's per-unit vector (fixed mean / copy, never convolved)


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
    unit = -1  # its index among the compressed layers
    for i, (name, m) in enumerate(children):
        if isinstance(m, WIDTH):
            is_head = i == width_idx[-1]
            out.append(_Param(f"{name}.weight", not is_head, prev_units, unit + 1, unit))
            if m.bias is not None:
                out.append(_Param(f"{name}.bias", not is_head, 0, unit + 1))
            prev_units = 0 if is_head else (m.out_features if isinstance(m, nn.Linear) else m.out_channels)
            unit += 0 if is_head else 1
        elif isinstance(m, NORMS):
            for p, _ in m.named_parameters():
                out.append(_Param(f"{name}.{p}", prev_units > 0, 0, unit, norm=True))
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


Kernels = dict[str, list[torch.Tensor]]  # "a", "b" (compression) or "c", "d" (dilation): one `[r]` per compressed layer


def _along(t: torch.Tensor, kernel: torch.Tensor, axis: int, r: int) -> torch.Tensor:
    """`kernel` broadcast against the group axis `axis` (size r) of a grouped tensor: a
    convolution's kernel (`[r]`, shared by every group) or one value per unit (`[G r]`, the
    groups on the axis before)."""
    if kernel.numel() == r:
        return kernel.view(*([1] * axis), r, *([1] * (t.dim() - axis - 1)))
    return kernel.view(*([1] * (axis - 1)), -1, r, *([1] * (t.dim() - axis - 1)))


def compress(views: dict[str, torch.Tensor], spec: list[_Param], r: int,
             kernels: Kernels | None = None) -> dict[str, torch.Tensor]:
    """C_r of a model given as name -> tensor (see the module docstring); `kernels` ("a", "b")
    replace the fixed averaging / summing kernels of the layers' unit axes."""
    out = {}
    for p in spec:
        t = views[p.name]
        if r > 1 and p.out_axis:
            g = _groups(t, 0, r)
            if kernels is None or p.norm:
                t = g.mean(dim=1)
            else:
                t = (g * _along(g, kernels["a"][p.out_unit], 1, r)).sum(dim=1)
        if r > 1 and p.in_units:
            v = _groups(_in_view(t, p.in_units), 1, r)
            v = v.sum(dim=2) if kernels is None else (v * _along(v, kernels["b"][p.in_unit], 2, r)).sum(dim=2)
            t = v.reshape(v.shape[0], -1, *v.shape[3:])
        out[p.name] = t
    return out


def dilate(sub: dict[str, torch.Tensor], spec: list[_Param], r: int,
           kernels: Kernels | None = None) -> dict[str, torch.Tensor]:
    """D_r: a sub-model (or its change) back to the global model's shapes; `kernels` ("c",
    "d") replace the fixed copying / splitting kernels of the transposed convolutions."""
    out = {}
    for p in spec:
        t = sub[p.name]
        if r > 1 and p.out_axis:
            if kernels is None or p.norm:
                t = t.repeat_interleave(r, dim=0)
            else:
                g = t.unsqueeze(1) * _along(t.unsqueeze(1), kernels["c"][p.out_unit], 1, r)
                t = g.reshape(-1, *t.shape[1:])
        if r > 1 and p.in_units:
            v = _in_view(t, p.in_units // r)
            if kernels is None:
                v = v.repeat_interleave(r, dim=1) / r
            else:
                g = v.unsqueeze(2) * _along(v.unsqueeze(2), kernels["d"][p.in_unit], 2, r)
                v = g.reshape(v.shape[0], -1, *v.shape[2:])
            t = v.reshape(v.shape[0], -1, *v.shape[3:])
        out[p.name] = t
    return out


def fixed_kernels(spec: list[_Param], r: int, widths: list[int] | None = None) -> Kernels:
    """The fixed kernels as tensors: a = 1/r, b = 1, c = 1, d = 1/r on every compressed layer;
    `[r]` convolution kernels, or with `widths` (each compressed layer's units) one value per unit."""
    n = 1 + max((p.out_unit for p in spec if p.out_axis), default=-1)
    size = [r] * n if widths is None else list(widths)
    return {"a": [torch.full((m,), 1.0 / r) for m in size], "b": [torch.ones(m) for m in size],
            "c": [torch.ones(m) for m in size], "d": [torch.full((m,), 1.0 / r) for m in size]}


def widths_of(spec: list[_Param], layout: Layout) -> list[int]:
    """Each compressed layer's number of units (the first axis of its weight)."""
    shapes = {e.name: e.shape for e in layout.entries}
    out = {p.out_unit: int(shapes[p.name][0]) for p in spec if p.out_axis and not p.norm}
    return [out[i] for i in range(len(out))]


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


def _adam(kernels: list[torch.Tensor], lr: float) -> torch.optim.Adam:
    """Adam over the kernels, each at `lr` times the size of its starting values (1/r for the
    averaging / splitting kernels, 1 for the summing / copying ones): the same relative step
    for every kernel (our choice; with one rate the 1/r kernels would move r times as far)."""
    return torch.optim.Adam([{"params": [k], "lr": lr * float(k.detach().abs().max())} for k in kernels])


def learn_compression(module: nn.Module, views: dict[str, torch.Tensor], spec: list[_Param], r: int,
                      x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, widths: list[int] | None = None
                      ) -> Kernels:
    """The compression kernels ("a", "b") after `steps` Adam steps on the mean cross-entropy of
    the compressed model C_r(views) on (x, y), from the fixed kernels."""
    start = fixed_kernels(spec, r, widths)
    leaves = [t.clone().requires_grad_(True) for t in start["a"] + start["b"]]
    n = len(start["a"])
    opt = _adam(leaves, lr)
    frozen = {k: v.detach() for k, v in views.items()}
    for _ in range(steps):
        opt.zero_grad()
        loss = mean_ce(sub_forward(module, compress(frozen, spec, r, {"a": leaves[:n], "b": leaves[n:]}), x), y)
        loss.backward()
        opt.step()
    return {"a": [t.detach() for t in leaves[:n]], "b": [t.detach() for t in leaves[n:]]}


def learn_dilation(module: nn.Module, layout: Layout, base: torch.Tensor, changes: list[dict[str, torch.Tensor]],
                   factors: list[int], weights: torch.Tensor, spec: list[_Param], x: torch.Tensor, y: torch.Tensor,
                   steps: int, lr: float, widths: list[int] | None = None) -> dict[int, Kernels]:
    """The dilation kernels ("c", "d") of each factor r > 1 in `factors` after `steps` Adam steps
    on the mean cross-entropy, on (x, y), of the aggregated model base + sum_k p_k D_{r_k}(changes[k])
    (p = weights / their sum; a factor-1 change is taken as it is), from the fixed kernels."""
    p = weights.to(base.dtype) / weights.sum()
    used = sorted({r for r in factors if r > 1})
    leaves: dict[int, Kernels] = {}
    for r in used:
        k = fixed_kernels(spec, r, widths)
        leaves[r] = {"c": [t.requires_grad_(True) for t in k["c"]], "d": [t.requires_grad_(True) for t in k["d"]]}
    params = [t for r in used for t in leaves[r]["c"] + leaves[r]["d"]]
    base_views = {k: v.detach() for k, v in layout.views(base).items()}
    frozen = [{k: v.detach() for k, v in ch.items()} for ch in changes]

    def aggregate() -> dict[str, torch.Tensor]:
        out = dict(base_views)
        for pk, r, ch in zip(p, factors, frozen):
            full = ch if r == 1 else dilate(ch, spec, r, leaves[r])
            out = {name: out[name] + pk * full[name] for name in out}
        return out

    if params:
        opt = _adam(params, lr)
        for _ in range(steps):
            opt.zero_grad()
            mean_ce(sub_forward(module, aggregate(), x), y).backward()
            opt.step()
    return {r: {"c": [t.detach() for t in leaves[r]["c"]], "d": [t.detach() for t in leaves[r]["d"]]} for r in used}


@CLIENT_ALGORITHMS.register("fedconv")
class FedConv(LocalSGD):
    """FedConv: each client trains a sub-model r = 1/budget times narrower, compressed and its
    change dilated by kernels the server learns on its public data (`kernels = "learnt"`)."""

    name = "fedconv"

    def __init__(self, budgets: list = [1.0], adapt_steps: int = 20, kernels: str = "fixed",  # noqa: B006
                 kernel_steps: int = 20, kernel_lr: float = 0.01, upload: str | None = None,
                 kernel_shape: str = "conv") -> None:
        self.budgets = check_budgets(budgets, self.name)
        for b in self.budgets:
            factor_of(b)
        for key, value, low in (("adapt_steps", adapt_steps, 0), ("kernel_steps", kernel_steps, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"client.{key} of 'fedconv' must be an integer >= {low}, got {value!r}")
        if isinstance(kernel_lr, bool) or not isinstance(kernel_lr, (int, float)) or not kernel_lr > 0:
            raise ValueError(f"client.kernel_lr of 'fedconv' must be a number > 0, got {kernel_lr!r}")
        if kernel_shape not in ("conv", "unit"):
            raise ValueError(f"client.kernel_shape of 'fedconv' must be 'conv' or 'unit', got {kernel_shape!r}")
        self.kernel_shape = kernel_shape
        if upload not in (None, "submodel", "full"):
            raise ValueError(f"client.upload of 'fedconv' must be 'submodel' or 'full', got {upload!r}")
        if kernels not in ("fixed", "learnt"):
            raise ValueError(f"client.kernels of 'fedconv' must be 'fixed' or 'learnt', got {kernels!r}")
        self.adapt_steps, self.learnt = adapt_steps, kernels == "learnt"
        self.kernel_steps, self.kernel_lr = kernel_steps, float(kernel_lr)
        self.upload = upload or ("submodel" if self.learnt else "full")
        self.module: tuple[nn.Module, Layout] | None = None
        self.public: tuple[nn.Module, Layout, torch.Tensor, torch.Tensor] | None = None
        self._cache: tuple[bytes, dict[int, Kernels]] | None = None
        if self.learnt:
            self.simulation_only = ("its server learns the kernels on public data by running the model, which "
                                    "koinon server does not do; set client.kernels = 'fixed'")
            self.needs_rows = True  # the server dilates each client's update (no secure aggregation, no DP)
            self.server_rows = self.dilate_rows  # the server's hook, only where there is something to learn
        if self.upload == "submodel":
            self.decode_update = self.decode_submodel  # its own wire format: the sub-model change only

    def attach(self, module: nn.Module, layout: Layout, x: torch.Tensor | None = None,
               y: torch.Tensor | None = None) -> None:
        """The server's model (to read sub-model uploads) and its public data (`x`, `y`: the
        `data.public_samples` samples no client holds), from the federation."""
        self.module = (module, layout)
        if self.learnt and (x is None or y is None):
            raise ValueError("client.kernels = 'learnt' needs the server's public data: set data.public_samples > 0")
        if self.learnt and x is not None and y is not None:
            self.public = (module, layout, x, y)

    def encode_submodel(self, change: dict[str, torch.Tensor], spec: list[_Param]) -> bytes:
        """A sub-model change on the wire: its values as little-endian float32, layer by layer."""
        return _flat(change, spec).to(torch.float32).numpy().astype("<f4").tobytes()

    def decode_submodel(self, payload: bytes, seed: int, round_index: int, client_id: int, numel: int, lr: float,
                        max_steps: int) -> torch.Tensor:
        """A client's sub-model change from its bytes, dilated by the fixed kernels (`[P]`); the
        size its budget gives or a `CodecError`."""
        if self.module is None:
            raise CodecError(self.name, "the server has no model to read sub-model uploads")
        module, layout = self.module
        spec = plan(module, layout)
        r = factor_of(budget_of(self.budgets, client_id))
        like = compress(layout.views(torch.zeros(layout.numel)), spec, r)
        n = sum(t.numel() for t in like.values())
        if len(payload) != 4 * n:
            raise CodecError(self.name, f"a budget-1/{r} client sends {4 * n} bytes (its sub-model), got {len(payload)}")
        flat = torch.from_numpy(np.frombuffer(payload, dtype="<f4").astype(np.float32))
        change = dilate(_unflat(flat, like, spec), spec, r)
        row = torch.zeros(layout.numel)
        for name, view in layout.views(row).items():
            view.copy_(change[name])
        return row[:numel]

    def kernels(self, trainer: CohortTrainer, global_params: torch.Tensor) -> dict[int, Kernels]:
        """Each factor's compression kernels for the global model `global_params`: learnt on the
        public data (cached per model), or {} (the fixed kernels) without public data."""
        if self.public is None:
            return {}
        key = global_params.detach().cpu().numpy().tobytes()
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        module, layout, x, y = self.public
        spec = plan(module, layout)
        views = layout.views(global_params.detach().cpu())
        widths = widths_of(spec, layout) if self.kernel_shape == "unit" else None
        out = {r: learn_compression(module, views, spec, r, x, y, self.kernel_steps, self.kernel_lr, widths)
               for r in sorted({factor_of(b) for b in self.budgets}) if r > 1}
        self._cache = (key, out)
        return out

    def dilate_rows(self, server_state: State, received: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor,
                    client_ids: list[int]) -> torch.Tensor:
        """The round's updates (`[K, P]`, each a sub-model change dilated by the fixed kernels),
        dilated again by the dilation kernels learnt on the public data (the module docstring);
        as they are without public data."""
        if self.public is None or not len(client_ids):
            return rows
        module, layout, x, y = self.public
        spec = plan(module, layout)
        factors = [factor_of(budget_of(self.budgets, c)) for c in client_ids]
        changes = [compress(layout.views(row), spec, r) if r > 1 else layout.views(row)
                   for row, r in zip(rows.cpu(), factors)]
        learnt = learn_dilation(module, layout, received.cpu(), changes, factors, weights.cpu(), spec, x, y,
                                self.kernel_steps, self.kernel_lr,
                                widths_of(spec, layout) if self.kernel_shape == "unit" else None)
        out = rows.clone()
        for i, (r, ch) in enumerate(zip(factors, changes)):
            if r > 1:
                full = dilate(ch, spec, r, learnt[r])
                for name, view in layout.views(out[i]).items():
                    view.copy_(full[name])
        return out

    def submodel(self, trainer: CohortTrainer, global_params: torch.Tensor, client: int
                 ) -> tuple[list[_Param], int, dict[str, torch.Tensor]]:
        spec = plan(trainer.module, trainer.layout)
        r = factor_of(budget_of(self.budgets, client))
        return spec, r, compress(trainer.layout.views(global_params), spec, r,
                                 self.kernels(trainer, global_params).get(r))

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
        deltas, losses, messages = [], [], []
        for i, c in enumerate(client_ids):
            spec, r, sub, trained, loss = self._train(trainer, c, global_params, idx[i], int(steps[i]))
            sub_change = {k: trained[k] - sub[k] for k in sub}
            if self.upload == "submodel":
                messages.append(self.encode_submodel(sub_change, spec))
                sub_change = _unflat(torch.from_numpy(np.frombuffer(messages[-1], dtype="<f4").copy()), sub, spec)
            change = dilate(sub_change, spec, r)  # fixed kernels: the frame the server reads
            delta = torch.zeros_like(global_params)
            for name, view in trainer.layout.views(delta).items():
                view.copy_(change[name])
            deltas.append(delta)
            losses.append(loss)
        return CohortResult(list(client_ids), torch.stack(deltas), {}, trainer.sizes(client_ids), steps.clone(),
                            torch.tensor(losses), [{} for _ in client_ids],
                            messages if self.upload == "submodel" else None)

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


__all__ = ["FedConv", "compress", "dilate", "factor_of", "fixed_kernels", "learn_compression", "learn_dilation", "plan",
           "sub_forward", "widths_of"]
