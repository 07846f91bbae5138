"""`topology.name = "distillation"`: parties exchange predictions on a public proxy set, not weights.

FedMD (Li & Wang 2019) and FedDF (Lin et al. 2020) style, one round:

1. every party trains its own model on its private data (local SGD, `[client]`); parties of the
   same architecture train in lock-step, any architecture may take part;
2. each party predicts the round's proxy samples (a seeded draw of `proxy_size` from the public
   split, which every party holds, so only the draw's seed is shared) and sends its logits
   through the uplink codec (`[codec]`): real payload bytes, `proxy_size x classes` numbers;
3. the server builds each party's target (log-probabilities): the consensus (the mean of the parties' probabilities
   at temperature T), or with `loss = "knfu"` a personal fusion of its most relevant peers
   (`koinon.experts.distill.knfu_weights`), and sends it through the downlink codec;
4. each party distills toward its target on the proxy set for `distill_epochs` with the chosen
   loss: `kl`, `bdkd` (balanced forward and reverse KL), `taid` (interpolated target, t rising
   over `taid_rounds`, default `server.rounds`, by `TaidSchedule`) or `knfu` (KL to the fused target).

Before the first round every party trains on the public split with its labels (FedMD's transfer
step; `pretrain_epochs = 0` skips it). The run's model file holds every party's model.
Classification only: a sequence model's per-position targets would be `seq_len` times larger.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from koinon.clients import LocalSGD, LocalTraining
from koinon.config import Config
from koinon.errors import ConfigError
from koinon.experts.distill import (
    TaidSchedule,
    bdkd_loss,
    consensus,
    fuse,
    kl_loss,
    knfu_weights,
    taid_loss,
)
from koinon.experts.domains import domain_test_sets
from koinon.local import CohortTrainer, evaluate
from koinon.models import build_model
from koinon.params import Entry, Layout
from koinon.seeding import generator, mix_seed
from koinon.topology.experts.common import (
    Channel,
    CodecFactory,
    DomainRound,
    distill_into,
    domain_metrics,
    groups_by_layout,
    tensor_layout,
)
from koinon.topology.experts.options import DistillOptions, OwnersData, build_named, pretrain


def concat_layouts(layouts: list[Layout]) -> Layout:
    """One layout for several models side by side, entry names prefixed by the model's index
    (as `nn.ModuleList` names them)."""
    entries, offset = [], 0
    for i, lay in enumerate(layouts):
        for e in lay.entries:
            entries.append(Entry(f"{i}.{e.name}", e.shape, e.dtype, offset + e.offset, e.trainable))
        offset += lay.numel
    return Layout(tuple(entries))


class Distillation:
    """The distillation topology (see the module docstring); a `koinon.topology.Topology`."""

    def __init__(self, data: OwnersData, parties: list[nn.Module], local: LocalTraining, options: DistillOptions,
                 rounds: int, codec: CodecFactory, downlink: CodecFactory, seed: int) -> None:
        self.data = data
        self.options = options
        self.local = local
        self.seed = seed
        self.parties = nn.ModuleList(parties)
        self.party_layouts = [Layout.from_module(p) for p in parties]
        self.layout = concat_layouts(self.party_layouts)
        self.round_index = 0
        self.uplink_total = 0
        self.downlink_total = 0
        self.uplink = Channel(codec, seed, 0xD5)
        self.downlink = Channel(downlink, seed, 0xD6)
        self.party_params = [lay.flatten(p) for lay, p in zip(self.party_layouts, parties, strict=True)]
        self.groups = [
            (CohortTrainer(parties[ids[0]], self.party_layouts[ids[0]], data.private, LocalSGD(), local), ids)
            for ids in groups_by_layout(parties).values()
        ]
        self.taid = (TaidSchedule(options.t_start, rounds, options.taid_alpha, options.taid_beta)
                     if options.loss == "taid" else None)
        self.domains = domain_test_sets(data.dataset)

    @property
    def params(self) -> torch.Tensor:
        return torch.cat(self.party_params)

    def _proxy(self, round_index: int) -> torch.Tensor:
        public = self.data.public
        size = self.options.proxy_size
        if size == 0 or size >= len(public):
            return public
        order = torch.randperm(len(public), generator=generator(self.seed, round_index, 0, 0xD7))
        return public[order[:size]].sort().values

    def predict(self, party: int, x: torch.Tensor) -> torch.Tensor:
        module = self.parties[party]
        module.eval()
        with torch.no_grad():
            out = functional_call(module, self.party_layouts[party].views(self.party_params[party]), (x,))
        module.train()
        return out

    def _loss(self) -> Any:
        o = self.options
        if o.loss == "bdkd":
            return lambda out, target: bdkd_loss(out, target, o.temperature, o.balance)
        if o.loss == "taid":
            assert self.taid is not None
            t = self.taid.t
            return lambda out, target: taid_loss(out, target, t, o.temperature)
        return lambda out, target: kl_loss(out, target, o.temperature)

    def run_round(self, evaluate: bool = True) -> DomainRound:
        r = self.round_index + 1
        train_loss = self._train_private(r)
        up, down, distill_losses = self.exchange(r)
        if self.taid is not None:
            self.taid.update(sum(distill_losses) / len(distill_losses), r)
        acc = loss = None
        per_domain = party_acc = None
        if evaluate:
            party_acc, acc, loss = self._evaluate_parties()
            per_domain = self.evaluate_domains()
        self.round_index = r
        self.uplink_total += up
        self.downlink_total += down
        return DomainRound(r, acc, loss, train_loss, len(self.parties), up, down,
                           per_domain[0] if per_domain else None, per_domain[1] if per_domain else None,
                           party_acc, self.taid.t if self.taid is not None else None)

    def _train_private(self, round_index: int) -> float:
        """Step 1: every party trains on its own data; returns the mean training loss."""
        losses, counts = [], []
        for trainer, ids in self.groups:
            stack = torch.stack([self.party_params[i] for i in ids])
            result = trainer.train(ids, stack, {}, [{} for _ in ids], mix_seed(self.seed, 0xD3), round_index)
            assert result.deltas is not None
            for row, i in enumerate(ids):
                self.party_params[i] = stack[row] + result.deltas[row]
            losses.append(result.train_loss * result.num_samples)
            counts.append(result.num_samples)
        return float(torch.cat(losses).sum() / torch.cat(counts).sum().clamp_min(1))

    def exchange(self, round_index: int) -> tuple[int, int, list[float]]:
        """Steps 2-4: logits up, targets down, every party distills. Returns the uplink and
        downlink bytes and each party's mean distillation loss."""
        o = self.options
        x = self.data.dataset.x_train[self._proxy(round_index)]
        up = down = 0
        received = []
        for i in range(len(self.parties)):
            logits = self.predict(i, x)
            got, n = self.uplink.send(i, logits, tensor_layout("logits", tuple(logits.shape)), round_index)
            received.append(got)
            up += n
        log_probs = F.log_softmax(torch.stack(received) / o.temperature, dim=-1)
        if o.loss == "knfu":
            targets = fuse(log_probs, knfu_weights(log_probs, o.neighbours, o.relevance_temperature))
        else:
            targets = consensus(log_probs).expand_as(log_probs)
        loss_fn = self._loss()
        floor = torch.tensor(1e-6).log()
        distill_losses = []
        for i in range(len(self.parties)):
            # Log-probabilities, floored at 1e-6: a quantizing codec then keeps small
            # probabilities to a relative error (a reverse KL needs them), not rounds them to 0.
            got, n = self.downlink.send(i, targets[i].clamp_min(floor), tensor_layout("targets", tuple(targets[i].shape)),
                                        round_index)
            down += n
            distill_losses.append(self._distill(i, x, F.log_softmax(got, dim=-1), loss_fn, round_index))
        return up, down, distill_losses

    def _distill(self, party: int, x: torch.Tensor, target: torch.Tensor, loss_fn: Any, round_index: int) -> float:
        """Party `party` pulled toward `target` (log-probabilities) on the proxy inputs `x`;
        returns its mean distillation loss."""
        c = self.local
        local = LocalTraining(epochs=self.options.distill_epochs, batch_size=c.batch_size,
                              lr=self.options.distill_lr or c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
        self.party_params[party], loss = distill_into(
            self.parties[party], self.party_layouts[party], self.party_params[party], x, target, loss_fn, local,
            mix_seed(self.seed, 0xD4, party), round_index)
        return loss

    def _evaluate_parties(self) -> tuple[list[float], float, float]:
        ds = self.data.dataset
        pairs = [evaluate(p, lay, flat, ds.x_test, ds.y_test)
                 for p, lay, flat in zip(self.parties, self.party_layouts, self.party_params, strict=True)]
        accs = [a for a, _ in pairs]
        return [round(a, 6) for a in accs], sum(accs) / len(accs), sum(v for _, v in pairs) / len(pairs)

    def evaluate(self) -> tuple[float, float]:
        """The parties' mean test accuracy and loss (each party keeps and uses its own model)."""
        _, acc, loss = self._evaluate_parties()
        return acc, loss

    def evaluate_domains(self) -> tuple[list[float], list[float]] | None:
        """Per domain, the parties' mean accuracy and loss (None without domains)."""
        per_party = [domain_metrics(p, lay, flat, self.domains)
                     for p, lay, flat in zip(self.parties, self.party_layouts, self.party_params, strict=True)]
        if per_party[0] is None:
            return None
        n = len(per_party)
        acc = [round(sum(m[0][d] for m in per_party if m) / n, 6) for d in range(len(per_party[0][0]))]
        loss = [round(sum(m[1][d] for m in per_party if m) / n, 6) for d in range(len(per_party[0][1]))]
        return acc, loss

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {"params": self.params}
        if self.taid is not None:
            out["taid"] = self.taid.state()
        out.update({f"uplink/{k}": v for k, v in self.uplink.state_dict().items()})
        out.update({f"downlink/{k}": v for k, v in self.downlink.state_dict().items()})
        return out

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        flat = tensors["params"]
        offsets = [0]
        for lay in self.party_layouts:
            offsets.append(offsets[-1] + lay.numel)
        self.party_params = [flat[a:b].clone() for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
        if self.taid is not None:
            self.taid.load(tensors["taid"])
        # The logits' and targets' layouts depend on the proxy size: stateful codecs resume
        # with the state of the shapes they have seen.
        x = self.data.dataset.x_train[self._proxy(self.round_index + 1)]
        shapes = [tensor_layout(name, (len(x), self.data.dataset.num_classes)) for name in ("logits", "targets")]
        self.uplink.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("uplink/")}, shapes[:1])
        self.downlink.load_state_dict({k[9:]: v for k, v in tensors.items() if k.startswith("downlink/")}, shapes[1:])

    def fit(self, rounds: int, eval_every: int = 1) -> list[Any]:
        from koinon.topology.base import fit_rounds

        return fit_rounds(self, rounds, eval_every)

    def close(self) -> None:
        return None


def build_distillation(cfg: Config) -> Distillation:
    """The distillation topology from a config (keys checked first: one-line ConfigErrors)."""
    from koinon.compress import CODECS
    from koinon.topology.experts.options import check_unused, local_training, owners_data, parse

    options: DistillOptions = parse(DistillOptions, cfg)
    check_unused(cfg)
    data = owners_data(cfg, options)
    ds = data.dataset
    if ds.y_train.dim() > 1:
        raise ConfigError(f"topology.name = 'distillation' needs a classification dataset (one label per "
                          f"sample); data.name = {cfg.data.name!r} has a label per position")
    local = local_training(cfg)
    CODECS.get(cfg.codec.name, key="codec.name")
    CODECS.get(cfg.downlink.name, key="downlink.name")
    tables = options.party_models or [{"name": cfg.model.name, **cfg.model.options}] * cfg.data.num_clients
    parties = []
    for i, table in enumerate(tables):
        name = table.get("name", cfg.model.name)
        opts = {k: v for k, v in table.items() if k != "name"}
        parties.append(build_named(f"topology.party_models[{i}]", build_model, name, opts, ds.input_shape, ds.num_classes,
                             mix_seed(cfg.seed, 0xD1, i)))
    for i, party in enumerate(parties):
        pretrain(party, ds, data.public, options.pretrain_epochs, options.pretrain_lr, mix_seed(cfg.seed, 0xD2, i))

    def codec(layout: Layout) -> Any:
        return CODECS.build(cfg.codec.name, cfg.codec.options, "codec", layout=layout)

    def downlink(layout: Layout) -> Any:
        return CODECS.build(cfg.downlink.name, cfg.downlink.options, "downlink", layout=layout)

    codec(tensor_layout("logits", (1, ds.num_classes)))  # a bad codec option fails now
    # TAID's schedule spans a fixed number of rounds: recorded, so that a resumed run (whose
    # server.rounds may grow) keeps the schedule it started with.
    horizon = options.taid_rounds or cfg.server.rounds
    if options.loss == "taid":
        cfg.topology.options["taid_rounds"] = horizon
    return Distillation(data, parties, local, options, horizon, codec, downlink, cfg.seed)
