"""Local training of a stack of K clients in lock-step: the engine every driver uses.

The cohort's models are one `[K, P]` tensor. Each step gathers one minibatch per client
(`[K, B, ...]`), runs the model's forward under `torch.func.vmap` over the stacked parameters,
and takes a single `autograd.grad` of the sum of the clients' mean losses: clients are
independent, so row k of that gradient is exactly client k's own gradient. The optimizer step is
a few in-place ops on the whole stack (`koinon.local.optim`). With K = 1 the forward is a plain
`functional_call` (no vmap), which is what the sequential runtime uses; the algorithm code is
the same either way.

Clients with unequal data: each client's batches come from its own seeded permutation; a client
whose last batch is short, or that has finished its steps, is padded with zero-weight samples
and its slice is frozen (no gradient, no optimizer state change), so the result equals training
that client alone.
"""

from __future__ import annotations

import contextlib
import warnings
from functools import partial

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from koinon.data.federated import FederatedData
from koinon.local.algorithm import ClientAlgorithm, LocalTraining, State
from koinon.local.batched import batched_forward, sequential_value_and_grad
from koinon.local.device import check_precision
from koinon.local.losses import cross_entropy
from koinon.local.optim import rows as optimizer_rows
from koinon.params import Layout
from koinon.seeding import GOLDEN, hash64_array, mix_seeds_array
from koinon.update import CohortResult

_PREGATHER_BYTES = 256 << 20
# Layer gradients are accumulated into views of one flat buffer on purpose (see `train`);
# autograd's layout advice about such views is not an error.
warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")


def start_stack(params: torch.Tensor, k: int, pt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each client's starting point: one model `[P]` for all (federated), or one each `[K, P]`
    (decentralized nodes that start from their own models)."""
    if params.dim() == 1:  # one broadcast copy into fresh rows (3-10x faster than `repeat`)
        return (params.new_empty(k, pt).copy_(params[:pt]),
                params.new_empty(k, params.shape[0] - pt).copy_(params[pt:]))
    if params.shape[0] != k:
        raise ValueError(f"{params.shape[0]} starting models for {k} clients")
    return (params[:, :pt].clone(memory_format=torch.contiguous_format),
            params[:, pt:].clone(memory_format=torch.contiguous_format))


def _rows(ctx: State, k: int, m: int) -> State:
    """The first m clients' part of an algorithm's per-cohort context: tensors stacked per
    client (`[K, ...]`, two or more dims) are cut to their first m rows; the rest is shared."""
    if m == k:
        return ctx
    return {key: v[:m] if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[0] == k else v
            for key, v in ctx.items()}


class CohortTrainer:
    """Runs a client algorithm's local training for any number of clients at once."""

    def __init__(
        self,
        module: nn.Module,
        layout: Layout,
        data: FederatedData,
        algorithm: ClientAlgorithm,
        local: LocalTraining,
        loss_fn=cross_entropy,
    ) -> None:
        self.module = module
        self.layout = layout
        self.data = data
        self.algorithm = algorithm
        self.local = local
        self.loss_fn = loss_fn
        self.optimizer = local.build_optimizer()
        pt = layout.num_trainable
        self._train_entries = [e for e in layout.entries if e.trainable]
        self._buffer_entries = [e for e in layout.entries if not e.trainable]
        self.num_trainable = pt
        self.x_train = data.dataset.x_train
        self.y_train = data.dataset.y_train
        self.device = torch.device("cpu")
        self.precision = "fp32"
        self._flat: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._flat_np: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                             tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None

        def forward_one(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return functional_call(module, params, (x,))

        # Hand-batched kernels where the layer stack allows it (about 2x faster), vmap otherwise.
        self._batched = batched_forward(module)
        self.forward_many = self._batched or vmap(forward_one, in_dims=(0, 0))
        # Plain MLPs and CNNs with the default loss skip autograd altogether (see
        # `sequential_value_and_grad`).
        self._manual = sequential_value_and_grad(module) if loss_fn is cross_entropy else None
        first = next(iter(module.children()), None)
        if self._manual is not None and self.x_train.dim() > 2 and not isinstance(first, (nn.Flatten, nn.Conv1d, nn.Conv2d)):
            self._manual = None  # per-position layers on [B, ..., F] inputs: autograd's case

    def place(self, device: torch.device, precision: str = "fp32") -> None:
        """Train on `device` (see `koinon.local.device`): the training data moves there once;
        `precision = "bf16"` trains under autocast (float32 master weights), on autograd's path
        (the hand-written backward is float32 arithmetic)."""
        self.device = torch.device(device)
        self.precision = check_precision(precision)
        self.x_train = self.data.dataset.x_train.to(self.device)
        self.y_train = self.data.dataset.y_train.to(self.device)
        if precision != "fp32":
            self._manual = None

    def _on_device(self) -> contextlib.AbstractContextManager:
        """Tensors created while training go to the trainer's device; autocast under bf16."""
        if self.device.type == "cpu" and self.precision == "fp32":
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(self.device)
        if self.precision == "bf16":
            stack.enter_context(torch.autocast(self.device.type, dtype=torch.bfloat16))
        return stack

    # ----------------------------------------------------------------- batches

    def client_batches(self, client_id: int, seed: int, round_index: int) -> torch.Tensor:
        """`[S, B]` global sample indices of one client's local steps, -1 where padded."""
        schedule, steps = self.schedule([client_id], seed, round_index)
        return schedule[0, : int(steps[0])]

    def schedule(self, client_ids: list[int], seed: int, round_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every client's minibatches at once: `[K, S, B]` sample indices (-1 = padding), steps `[K]`.

        Each epoch visits a client's samples in the order of random keys hashed from
        (seed, round, client, epoch, position), so a client's batches do not depend on which
        other clients share its chunk or runtime, and the whole cohort's shuffles are a few
        tensor ops instead of a generator per client.
        """
        # NumPy, not torch: a cohort's schedule is some thirty operations on small integer
        # arrays, where torch's per-operation overhead made it a tenth of a 10-client round.
        b = self.local.batch_size
        # NumPy views of `_flat_indices`, remade when that is (a copy of this trainer with other
        # data, `personal.evaluate.with_steps`, resets `_flat`).
        flat_t = self._flat_indices()
        if self._flat_np is None or self._flat_np[0] is not flat_t:
            self._flat_np = (flat_t, (flat_t[0].numpy(), flat_t[1].numpy(), flat_t[2].numpy()))
        flat, starts, all_sizes = self._flat_np[1]
        cohort = np.asarray(client_ids, dtype=np.int64)
        sizes = all_sizes[cohort]
        k, n_max = len(client_ids), max(int(sizes.max()), 1) if client_ids else 1
        per_epoch = (sizes + b - 1) // b
        if self.local.steps > 0:
            epochs = (self.local.steps + np.maximum(per_epoch, 1) - 1) // np.maximum(per_epoch, 1)
            steps = np.where(sizes > 0, self.local.steps, 0).astype(np.int64)
        else:
            epochs = np.full_like(sizes, self.local.epochs)
            steps = per_epoch * self.local.epochs
        e_max = max(int(epochs.max()), 1)
        # Each client's indices, padded: one gather from the population's concatenated indices.
        span = np.arange(n_max).reshape(1, n_max)
        if len(flat):
            padded = flat[np.minimum(starts[cohort].reshape(k, 1) + span, len(flat) - 1)]
            padded[span >= sizes.reshape(k, 1)] = 0
        else:
            padded = np.zeros((k, n_max), dtype=np.int64)
        ids = mix_seeds_array(seed, round_index, cohort)
        slot = np.arange(n_max).reshape(1, 1, n_max)
        epoch = np.arange(e_max).reshape(1, e_max, 1)
        pos = (epoch << 32) + slot  # a position's key must not depend on the cohort's n_max
        keys = hash64_array(ids.reshape(k, 1, 1) ^ (pos * np.int64(GOLDEN)))
        keys[np.broadcast_to(slot >= sizes.reshape(k, 1, 1), keys.shape)] = np.iinfo(np.int64).max
        order = keys.argsort(axis=2)  # [K, E, n_max]: a permutation of each client's positions
        picked = np.take_along_axis(padded, order.reshape(k, -1), axis=1).reshape(k, e_max, n_max)
        # Lay epoch e of client i at offset e * per_epoch[i] * B; short last batches are padded.
        width = int((per_epoch * b).max()) if k else 0
        out = np.full((k, e_max * max(width, 1)), -1, dtype=np.int64)
        target = epoch * (per_epoch * b).reshape(k, 1, 1) + slot
        valid = ((slot < sizes.reshape(k, 1, 1)) & (epoch < epochs.reshape(k, 1, 1))
                 & (target < (steps * b).reshape(k, 1, 1)))
        rows = np.broadcast_to(np.arange(k).reshape(k, 1, 1), target.shape)
        out[rows[valid], target[valid]] = picked[valid]
        s_max = int(steps.max()) if k else 0
        schedule = np.ascontiguousarray(out[:, : s_max * b]).reshape(k, s_max, b)
        return torch.from_numpy(schedule), torch.from_numpy(np.ascontiguousarray(steps, dtype=np.int64))

    def _flat_indices(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The population's sample indices concatenated, each client's start, and its size.

        Built once (client data does not change during a run), so a cohort's padded index
        matrix is one gather instead of a Python loop over clients."""
        if self._flat is None:
            lists = self.data.client_indices
            sizes = torch.tensor([len(ix) for ix in lists], dtype=torch.long)
            starts = torch.zeros(len(lists), dtype=torch.long)
            if len(lists) > 1:
                starts[1:] = sizes.cumsum(0)[:-1]
            flat = torch.cat([ix.to(torch.long) for ix in lists]) if lists else torch.zeros(0, dtype=torch.long)
            self._flat = (flat, starts, sizes)
        return self._flat

    def _views(self, flat: torch.Tensor, entries, base: int) -> dict[str, torch.Tensor]:
        lead = tuple(flat.shape[:-1])
        return {
            e.name: flat[..., e.offset - base : e.offset - base + e.numel].view(*lead, *e.shape)
            for e in entries
        }

    def forward_stack(self, theta: torch.Tensor, bufs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Outputs `[K, B, ...]` of the stacked models `theta` (`[K, P_trainable]`) on `x` (`[K, B, ...]`)."""
        if theta.shape[0] == 1 and self._batched is None:
            return functional_call(self.module, self.stack_params(theta[0], bufs[0]), (x[0],)).unsqueeze(0)
        return self.forward_many(self.stack_params(theta, bufs), x)

    def sizes(self, client_ids: list[int]) -> torch.Tensor:
        """Local dataset sizes `[K]` of `client_ids`."""
        return self._flat_indices()[2][torch.as_tensor(client_ids, dtype=torch.long, device="cpu")]

    def stack_params(self, theta: torch.Tensor, bufs: torch.Tensor) -> dict[str, torch.Tensor]:
        params = self._views(theta, self._train_entries, 0)
        if self._buffer_entries:
            params.update(self._views(bufs, self._buffer_entries, self.num_trainable))
        return params

    # ---------------------------------------------------------------- training

    def train(
        self,
        client_ids: list[int],
        global_params: torch.Tensor,
        server_state: State,
        client_states: list[State],
        seed: int,
        round_index: int,
        schedule: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> CohortResult:
        """Local training of `client_ids`; `schedule` (`[K, S, B]` indices, `[K]` steps) may be
        given when the caller computed the cohort's batches at once (the sequential runtime)."""
        idx, steps = schedule if schedule is not None else self.schedule(client_ids, seed, round_index)
        own = getattr(self.algorithm, "train_cohort", None)
        if self.device.type != "cpu":  # the cohort's inputs cross to the device once
            dev = self.device
            global_params = global_params.to(dev)
            server_state = {k: v.to(dev) for k, v in server_state.items()}
            client_states = [{k: v.to(dev) for k, v in st.items()} for st in client_states]
        with self._on_device():
            if own is not None:  # an algorithm with its own local step (SPSA) or objective (Ditto)
                result = own(self, client_ids, global_params, server_state, client_states, idx, steps,
                             seed, round_index)
            else:
                result = self.run_steps(client_ids, global_params, server_state, client_states, idx, steps)
        return result if self.device.type == "cpu" else result.to(torch.device("cpu"))

    def run_steps(
        self,
        client_ids: list[int],
        global_params: torch.Tensor,
        server_state: State,
        client_states: list[State],
        idx: torch.Tensor,
        steps: torch.Tensor,
        algorithm: ClientAlgorithm | None = None,
    ) -> CohortResult:
        """The gradient loop on batches `idx` (`[K, S, B]`), with `algorithm`'s hooks (default:
        the trainer's own). Algorithms with their own objective call it for each part of it.

        Where each client starts: the received model, or what the algorithm's `start` hook
        picks (one of several downloaded models, a personal model); with a `shared_mask`, the
        unshared coordinates come from the client's own state (`private`), its update is zero
        there, and the trained values go back into its state."""
        alg = algorithm or self.algorithm
        starts = global_params
        pick = getattr(alg, "start", None)
        if pick is not None:
            starts = pick(self, client_ids, global_params, server_state, client_states)
        mask = self._shared_mask(alg)
        if mask is not None:
            stack = starts.unsqueeze(0).repeat(len(client_ids), 1) if starts.dim() == 1 else starts.clone()
            for i, st in enumerate(client_states):
                if "private" in st:
                    stack[i, ~mask] = st["private"]
            starts = stack
        # Clients with more steps first: at step s only the prefix of clients that still have a
        # batch trains, so a cohort with unequal data does not pay for its padding (on a
        # Dirichlet split most of a lock-step cohort's work was padding). The order is undone
        # before returning; a client's arithmetic does not depend on it.
        order = torch.argsort(steps, descending=True, stable=True)
        if len(client_ids) > 1 and bool((order != torch.arange(len(order), device=order.device)).any()):
            # index_select, not `[order]`: advanced indexing of large rows is several times slower.
            sorted_starts = starts.index_select(0, order.to(starts.device)) if starts.dim() == 2 else starts
            ranks = order.tolist()
            result = self._train_sorted(
                [client_ids[i] for i in ranks], sorted_starts, server_state,
                [client_states[i] for i in ranks], idx.index_select(0, order.to(idx.device)), steps.index_select(0, order), alg,
            ).take(torch.argsort(order))
        else:
            result = self._train_sorted(client_ids, starts, server_state, client_states, idx, steps, alg)
        if mask is not None:
            assert result.deltas is not None
            final = starts + result.deltas
            result.deltas[:, ~mask] = 0.0
            result.client_states = [{**st, "private": final[i, ~mask].clone()}
                                    for i, st in enumerate(result.client_states)]
        return result

    def _shared_mask(self, alg: ClientAlgorithm) -> torch.Tensor | None:
        """`[P]` bool: the coordinates `alg` shares with the server (None: all of them)."""
        make = getattr(alg, "shared_mask", None)
        if make is None:
            return None
        mask = make(self.layout)
        if mask.shape != (self.layout.numel,) or mask.dtype != torch.bool:
            raise ValueError(f"{alg.name}.shared_mask must be a bool tensor of {self.layout.numel} values")
        return mask

    def _train_sorted(
        self,
        client_ids: list[int],
        global_params: torch.Tensor,
        server_state: State,
        client_states: list[State],
        idx: torch.Tensor,
        steps: torch.Tensor,
        alg: ClientAlgorithm,
    ) -> CohortResult:
        """`run_steps` for a cohort whose step counts do not increase along it."""
        k = len(client_ids)
        pt = self.num_trainable
        hp = self.local
        num_steps = idx.shape[1]
        theta, bufs = start_stack(global_params, k, pt)
        theta0 = global_params[..., :pt]
        # One client without batched kernels: plain functional_call on unstacked views.
        plain = k == 1 and self._batched is None
        # Gradients accumulate straight into views of one flat buffer (zeroed each step by
        # autograd's path, overwritten whole by the hand-written backward; a row is read only in
        # steps that wrote it), so the optimizer step needs no concatenation of per-layer gradients.
        grad = torch.empty(k, pt)
        opt_state = self.optimizer.init(k, pt)
        ctx = alg.begin(global_params, server_state, client_states)
        loss_sum = torch.zeros(k)
        seen = torch.zeros(k)

        if k == 1:
            batches = [row[row >= 0] for row in idx[0]]
        else:
            weights = (idx >= 0).to(self.device, torch.float32)
            idx = idx.clamp(min=0)
            counts = weights.sum(dim=2)  # [K, S]
            # Per-step values computed for the whole round at once (a few ops instead of a few per step).
            live_at = (steps.view(-1, 1) > torch.arange(num_steps, device=steps.device)).sum(dim=0).tolist()
            counts_c = counts.clamp_min(1.0)
            scales = weights / counts_c.unsqueeze(2)
            # The round's minibatches in one gather, step-major so each step's slice is
            # contiguous; per-step gathers when that would take much memory.
            by_step = idx.transpose(0, 1)
            whole = by_step.numel() * self.x_train[0].numel() * 4 <= _PREGATHER_BYTES
            xs = self.x_train[by_step] if whole else None
            ys = self.y_train[by_step]

        # Sharpness-aware algorithms (FedSAM, FedSpeed) take the gradient at a perturbed point;
        # adversarial training replaces each batch's inputs (it needs autograd's input gradients).
        perturb = getattr(alg, "perturb", None)
        attack = getattr(alg, "perturb_inputs", None)
        # A term of the algorithm's own added to each sample's loss (MOON's contrastive term).
        extra = getattr(alg, "extra_loss", None)
        manual = self._manual if attack is None and extra is None else None
        live = -1  # clients in the training prefix the current leaves were made for
        params: dict[str, torch.Tensor] = {}
        self.module.train()
        for s in range(num_steps):
            m = live_at[s] if k > 1 else 1
            if m != live:
                # Autograd leaves that are views into `theta`'s storage: the optimizer updates
                # `theta` in place and the leaves see it, and gradients come per layer with no
                # slicing in the graph.
                live = m
                lead = theta[0] if plain else theta[:m]
                grads = self._views(grad[0] if plain else grad[:m], self._train_entries, 0)
                leaves = {n: v.detach().requires_grad_(manual is None)
                          for n, v in self._views(lead, self._train_entries, 0).items()}
                if manual is None:
                    for name, view in grads.items():
                        leaves[name].grad = view
                params = dict(leaves)
                if self._buffer_entries:
                    params.update(self._views(bufs[0] if plain else bufs[:m], self._buffer_entries, pt))
            if manual is not None:
                if k == 1:
                    ix = batches[s]
                    x, y = self.x_train[ix].unsqueeze(0), self.y_train[ix].unsqueeze(0)
                    scale = torch.full((1, len(ix)), 1.0 / max(len(ix), 1))
                    n_b = torch.tensor([float(len(ix))])
                else:
                    x = xs[s, :m] if xs is not None else self.x_train[idx[:m, s]]
                    y, n_b, n_c = ys[s, :m], counts[:m, s], counts_c[:m, s]
                    scale = scales[:m, s]
                per_sample = manual(params, grads, x, y, scale)
                if perturb is not None:
                    self._perturbed_grad(theta[:m], grad[:m], _rows(ctx, k, m), perturb,
                                         partial(manual, params, grads, x, y, scale))
                loss_sum[:m] += (per_sample * scale).sum(dim=1) * (n_b.clamp_min(1.0) if k == 1 else n_c)
                seen[:m] += n_b
                with torch.no_grad():
                    self._step(theta[:m], grad[:m], theta0[:m] if theta0.dim() == 2 else theta0,
                               optimizer_rows(opt_state, m), _rows(ctx, k, m), s, alg)
                continue
            if k == 1:
                ix = batches[s]
                x = self.x_train[ix]
                if attack is not None:
                    x = attack(partial(self._input_loss, params, self.y_train[ix], plain), x.unsqueeze(0))[0]
                out = (functional_call(self.module, params, (x,)) if plain
                       else self.forward_many(params, x.unsqueeze(0))[0])
                per_sample = self.loss_fn(out, self.y_train[ix])
                loss = per_sample.mean()
                if extra is not None:
                    loss = loss + extra(self, params, x.unsqueeze(0), not plain, _rows(ctx, k, m)).mean()
                loss_sum += per_sample.detach().sum()
                seen += len(ix)
            else:
                w = weights[:m, s]
                n_b = counts[:m, s]
                x = xs[s, :m] if xs is not None else self.x_train[idx[:m, s]]
                if attack is not None:
                    x = attack(partial(self._input_loss, params, ys[s, :m], False), x)
                out = self.forward_many(params, x)
                per_sample = self.loss_fn(out.flatten(0, 1), ys[s, :m].flatten()).view(m, -1)
                weighted = (per_sample * w).sum(dim=1)
                loss = (weighted / n_b.clamp_min(1.0)).sum()
                if extra is not None:
                    more = extra(self, params, x, True, _rows(ctx, k, m))
                    loss = loss + ((more * w).sum(dim=1) / n_b.clamp_min(1.0)).sum()
                loss_sum[:m] += weighted.detach()
                seen[:m] += n_b
            grad.zero_()
            loss.backward()
            if perturb is not None:
                regrad = (partial(self._backward_again, params, x, self.y_train[ix], None, None, plain) if k == 1
                          else partial(self._backward_again, params, x, ys[s, :m], w, n_b, plain))
                self._perturbed_grad(theta[:m], grad[:m], _rows(ctx, k, m), perturb, regrad)
            with torch.no_grad():
                rows = _rows(ctx, k, m)
                self._step(theta[:m], grad[:m], theta0[:m] if theta0.dim() == 2 else theta0,
                           optimizer_rows(opt_state, m), rows, s, alg)

        final = torch.cat([theta, bufs], dim=1) if bufs.shape[1] else theta
        steps = steps.to(self.device)
        uploads, new_states = alg.end(global_params, final, steps, hp.lr, ctx)
        sizes = self.sizes(client_ids).to(self.device)
        return CohortResult(
            list(client_ids), final - global_params, uploads, sizes, steps,
            loss_sum / seen.clamp_min(1.0), new_states,
        )

    def _input_loss(self, params: dict[str, torch.Tensor], y: torch.Tensor, plain: bool, x: torch.Tensor) -> torch.Tensor:
        """Per-sample losses `[K, B]` of inputs `x` (`[K, B, ...]`) under the current models: what
        an input attack (adversarial training) differentiates with respect to `x`."""
        if plain:
            out = functional_call(self.module, params, (x[0],)).unsqueeze(0)
        else:
            out = self.forward_many(params, x)
        return self.loss_fn(out.flatten(0, 1), y.flatten()).view(x.shape[0], -1)

    def _backward_again(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                        w: torch.Tensor | None, n_b: torch.Tensor | None, plain: bool) -> None:
        """The step's loss on the same batch once more, backward into the gradient buffer
        (`w`, `n_b`: a cohort's sample weights and batch sizes; None for one client)."""
        if w is None or n_b is None:
            out = (functional_call(self.module, params, (x,)) if plain
                   else self.forward_many(params, x.unsqueeze(0))[0])
            self.loss_fn(out, y).mean().backward()
            return
        out = self.forward_many(params, x)
        per_sample = self.loss_fn(out.flatten(0, 1), y.flatten()).view(x.shape[0], -1)
        ((per_sample * w).sum(dim=1) / n_b.clamp_min(1.0)).sum().backward()

    @staticmethod
    def _perturbed_grad(theta: torch.Tensor, grad: torch.Tensor, ctx: State, perturb, regrad) -> None:
        """Replace `grad` (the gradient at `theta`) by the gradient on the same batch at
        `theta + perturb(theta, grad, ctx)`, then put `theta` back exactly (the autograd leaves
        are views of its storage, so moving `theta` moves the model the batch runs through)."""
        with torch.no_grad():
            offset = perturb(theta, grad, ctx)
            saved = theta.clone()
            theta.add_(offset)
            grad.zero_()
        regrad()
        with torch.no_grad():
            theta.copy_(saved)

    def _step(self, theta: torch.Tensor, grad: torch.Tensor, theta0: torch.Tensor, opt_state: State,
              ctx: State, step: int, alg: ClientAlgorithm) -> None:
        """One optimizer step of the clients that train this step (finished ones are outside
        the stack: frozen), with the algorithm's gradient correction where it belongs."""
        def correct(g: torch.Tensor) -> None:
            alg.correct(theta, g, theta0, ctx)

        self.optimizer.step(theta, grad, opt_state, step, self.local.lr_at(step), correct)

    # -------------------------------------------------------------- estimates

    def bytes_per_client(self) -> int:
        """Rough peak memory of one client in a vectorized step (parameters and activations)."""
        activations = 0

        def hook(_m: nn.Module, _i: object, out: object) -> None:
            nonlocal activations
            if isinstance(out, torch.Tensor):
                activations += out.numel()

        handles = [m.register_forward_hook(hook) for m in self.module.modules() if not list(m.children())]
        try:
            with torch.no_grad():
                self.module(self.data.dataset.x_train[:1])  # the module itself stays on the CPU
        finally:
            for h in handles:
                h.remove()
        params = self.layout.numel * 4 * 6  # theta, grad, momentum, correction, delta, upload
        return params + activations * 4 * 3 * self.local.batch_size + self.x_train[0].numel() * 4 * self.local.batch_size
