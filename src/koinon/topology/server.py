"""The federated server as a state machine: open a round, accept or reject updates, close it.

One object holds the server's whole state (`FederatedServer`); two drivers step it through its
public steps and never reach into it: the simulation (`koinon.topology.federated.Federation`:
server + runtime) and the gRPC deployment (`koinon.deploy.server`). Both therefore run the same
math on the same bytes, and a deployment with every client present ends with the simulation's
model bit for bit.

A round:

1. `sample(r, population, sizes)`: the cohort, from the clients available (everyone in the
   simulation, the connected ones in a deployment), with a fixed seeded generator. Under a
   simulated attack every cohort holds exactly round(fraction * K) Byzantine clients (the
   evaluation protocol of the robustness literature, e.g. ByzFL).
2. `open_round(r, cohort)`: the broadcast is encoded once (`koinon.wire.Broadcast`).
3. `decode(client, payloads)` (pure, thread-safe) then `accept(client, rows, ...)`; or
   `accept_cohort(result)` for a whole simulated cohort. A bad update is `Rejected` with the
   reason, recorded, and never reaches the model.
4. `close_round()`: the server's own root update (FLTrust), the simulated adversary (it sees
   every accepted update, the omniscient threat model, and replaces the Byzantine clients'
   rows), aggregation, the server optimizer, the algorithm's server state. Returns the round's
   `RoundResult`, the one record type (who was sampled, included, rejected and why, payload
   digests when asked for, bytes).

`apply_update` applies one update at once, outside rounds, for asynchronous schedules
(FedBuff/FedAsync): decoded, validated, scaled by the caller's staleness weight, stepped.
`apply_buffered` applies a buffer of such updates as one server step (FedBuff, FedCompass's
groups): each decoded row is scaled by its staleness weight and the rows are aggregated and
stepped exactly as `close_round` does, so a full buffer of fresh updates is a FedAvg round.
`publish` encodes the current model for clients that start now (asynchronous dispatch).

After every server step the sampler may learn from it: a sampler with an `observe(Feedback)`
method gets the step's clients, their training losses and, when a schedule measured them,
their durations (`koinon.server.Feedback`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from koinon.aggregate import Aggregator
from koinon.attacks import Attack, AttackContext
from koinon.clients import ClientAlgorithm
from koinon.compress import Codec
from koinon.errors import KoinonError
from koinon.log import notice
from koinon.seeding import generator
from koinon.server import Feedback, Sampler, ServerOptimizer
from koinon.server.root import RootUpdate, reference_users
from koinon.update import CohortResult, State
from koinon.wire import MODEL, Broadcast, Receiver, Rejected

if TYPE_CHECKING:  # `import koinon` does not load the privacy package (its cryptography)
    from koinon.privacy import Privacy, SecureSum

__all__ = ["Buffered", "ClosedRound", "FederatedServer", "OpenRound", "Rejected", "RoundResult"]

# What an algorithm's server update may raise on a round's uploads (a shape, an index, a value):
# the step is undone and the round closes unchanged rather than the server stopping mid-round.
_STATE_ERRORS = (ValueError, RuntimeError, IndexError, ArithmeticError)


@dataclass
class RoundResult:
    """One round's record, the same for the simulation and the deployment."""

    round: int
    num_clients: int  # updates included
    uplink_bytes: int
    downlink_bytes: int
    train_loss: float | None
    rejected: list[int] = field(default_factory=list)
    test_accuracy: float | None = None
    test_loss: float | None = None
    num_byzantine: int = 0
    extra: dict[str, float] = field(default_factory=dict)  # e.g. an attack's success rate
    cohort: list[int] = field(default_factory=list)  # sampled
    reasons: dict[int, str] = field(default_factory=dict)  # client -> why an update was refused
    missing: list[int] = field(default_factory=list)  # sampled, never delivered (deployment)
    late: int = 0  # updates that arrived after the round closed (deployment)
    digests: dict[int, str] = field(default_factory=dict)  # client -> SHA-256 of its payloads
    wall_s: float | None = None
    applied: bool = True  # False when the round's aggregate was not applied (model unchanged)
    refused: str = ""  # why the round's aggregate was not applied
    accepted: list[int] = field(default_factory=list)  # updates the server took (decoded, valid)
    included: list[int] = field(default_factory=list)  # updates that went into the applied aggregate

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "round": self.round,
            "test_accuracy": self.test_accuracy,
            "test_loss": self.test_loss,
            "train_loss": self.train_loss,
            "num_clients": self.num_clients,
            "uplink_bytes": self.uplink_bytes,
            "downlink_bytes": self.downlink_bytes,
            "rejected": self.rejected,
            "rejected_reasons": {str(k): v for k, v in sorted(self.reasons.items())},
            "num_byzantine": self.num_byzantine,
            "cohort": self.cohort,
            "missing": self.missing,
            "late": self.late,
            **self.extra,
        }
        if self.digests:
            out["digests"] = {str(k): v for k, v in sorted(self.digests.items())}
        if self.wall_s is not None:
            out["wall_s"] = self.wall_s
        if not self.applied:
            out["applied"] = False
            out["update_refused"] = self.refused
        return out


@dataclass
class OpenRound:
    """A round between `open_round` and `close_round`."""

    index: int
    cohort: list[int]
    payloads: list[tuple[str, bytes]]  # the broadcast: the model (or its change), then downloads
    received: torch.Tensor  # the model every client starts from (decoded as a client does)
    downloads: State  # the algorithm's downloads, decoded
    rows: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # accepted, by client
    samples: dict[int, int] = field(default_factory=dict)
    losses: dict[int, float] = field(default_factory=dict)
    nbytes: dict[int, int] = field(default_factory=dict)
    reasons: dict[int, str] = field(default_factory=dict)
    digests: dict[int, str] = field(default_factory=dict)
    stacks: dict[str, torch.Tensor] | None = None  # accept_cohort's decoded `[K, P]` stacks
    secure: SecureSum | None = None  # accept_secure_sum: the cohort's sum (secure aggregation)
    ok: torch.Tensor | None = None  # accept_cohort's valid rows
    downlink_bytes: int = 0
    late: int = 0
    refused_bytes: int = 0  # payload bytes of updates read and then refused (deployment)


@dataclass
class ClosedRound:
    """What a round's aggregation combined, handed to `FederatedServer.observer` (e.g. the
    contribution ledger) when one is set; nothing is copied or computed without one."""

    round: int  # 0-based index of the round
    previous: torch.Tensor  # [P] the global model the round started from
    params: torch.Tensor  # [P] the global model after the round
    clients: list[int]  # the rows given to the aggregator, in order
    updates: torch.Tensor  # [k, P] their decoded (and, under a simulated attack, forged) model rows
    weights: torch.Tensor  # [k] their aggregation weights (sample counts)
    excluded: dict[int, str]  # sampled clients not among `clients`, and why
    applied: bool  # the aggregate changed the model
    digests: dict[int, str]  # client -> SHA-256 of its payloads (with `record_digests`)
    aggregator: Aggregator
    lr: float  # the server optimizer's step size
    optimizer: Any = None  # the server optimizer that stepped
    optimizer_state: dict[str, torch.Tensor] | None = None  # its state before the step (when applied)


def digest(payloads: list[bytes]) -> str:
    h = hashlib.sha256()
    for p in payloads:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()


def _stack_rows(rows: dict[int, dict[str, torch.Tensor]], order: list[int], stream: str,
                numel: int) -> torch.Tensor:
    """The `[K, P]` stack of `stream`'s rows in `order`, each row let go as soon as it is copied:
    the round's rows and their stack are not both held whole (a deployment's rows are a large
    model's each)."""
    out = torch.empty(len(order), numel)
    for i, client in enumerate(order):
        out[i] = rows[client].pop(stream)
    return out


@dataclass
class Buffered:
    """An update waiting in an asynchronous server's buffer (`apply_buffered`)."""

    client: int
    payloads: list[bytes]
    num_samples: int
    train_loss: float
    weight: float = 1.0  # staleness weight: the decoded rows are multiplied by it
    num_steps: int = 0
    duration_s: float | None = None  # simulated seconds the client took (sampler feedback)
    offset: torch.Tensor | None = None  # added to the decoded model row before weighting


@dataclass
class Adversary:
    """A simulated attack: which clients are Byzantine and what they do to their updates."""

    attack: Attack
    byzantine: set[int]
    fraction: float


class FederatedServer:
    """The server of a federation; see the module docstring for its steps."""

    def __init__(
        self,
        params: torch.Tensor,
        *,
        algorithm: ClientAlgorithm,
        optimizer: ServerOptimizer,
        sampler: Sampler,
        aggregator: Aggregator,
        codec: Codec,
        downlink: Codec,
        sizes: np.ndarray,
        clients_per_round: int,
        seed: int,
        lr: float,
        num_trainable: int,
        downlink_delta: bool = False,
        adversary: Adversary | None = None,
        root: RootUpdate | None = None,
        record_digests: bool = False,
        privacy: Privacy | None = None,
    ) -> None:
        self.params = params
        self.algorithm = algorithm
        self.optimizer = optimizer
        self.sampler = sampler
        self.aggregator = aggregator
        self.sizes = sizes
        self.num_clients = len(sizes)
        self.clients_per_round = clients_per_round
        self.seed = seed
        self.adversary = adversary
        self.root = root
        self.record_digests = record_digests
        self.privacy = privacy
        self.streams = (MODEL, *algorithm.uploads) if not hasattr(algorithm, "decode_update") else (MODEL,)
        numel = params.numel()
        own = None
        if hasattr(algorithm, "decode_update"):  # its own wire format (SPSA's bytes)
            trainable = num_trainable

            def own(payload: bytes, client: int, round_index: int, num_steps: int) -> torch.Tensor:
                row = torch.zeros(numel)
                row[:trainable] = algorithm.decode_update(  # type: ignore[attr-defined]
                    payload, seed, round_index, client, trainable, lr, num_steps)
                return row
        self.receiver = Receiver(codec, numel, self.streams, own, getattr(algorithm, "check_uploads", None))
        self.broadcast = Broadcast(downlink, params, seed, self.num_clients, algorithm.downloads,
                                   downlink_delta)
        self.round_index = 0  # rounds completed
        self.optimizer_state = optimizer.init(params)
        self._stepped_from: dict[str, torch.Tensor] = {}
        self.server_state = algorithm.init_server_state(numel)
        self.uplink_total = 0
        self.downlink_total = 0
        self.open: OpenRound | None = None
        # Called by close_round with what was aggregated; metrics it returns join the round's record.
        self.observer: Callable[[ClosedRound], dict[str, float] | None] | None = None

    # ------------------------------------------------------------------ cohort

    def sample(self, round_index: int, population: np.ndarray | None = None,
               sizes: np.ndarray | None = None, k: int | None = None) -> list[int]:
        """The round's cohort from `population` (default: every client), seeded by (seed, round);
        `k` clients (default: clients_per_round)."""
        if population is None:
            population = np.arange(self.num_clients)
        if sizes is None:
            sizes = self.sizes[population]
        rng = np.random.default_rng([self.seed, round_index, 0x5A3B])
        k = min(self.clients_per_round if k is None else k, len(population))
        adv = self.adversary
        if adv is None or not adv.byzantine:
            return sorted(int(c) for c in self.sampler.sample(population, sizes, k, rng))
        is_bad = np.isin(population, np.array(sorted(adv.byzantine)))
        bad, good = population[is_bad], population[~is_bad]
        f = min(round(adv.fraction * k), len(bad))
        chosen = self.sampler.sample(bad, sizes[is_bad], f, rng) if f else []
        chosen += self.sampler.sample(good, sizes[~is_bad], k - f, rng)
        return sorted(int(c) for c in chosen)

    # ------------------------------------------------------------------- round

    def open_round(self, round_index: int, cohort: list[int]) -> OpenRound:
        """Encode round `round_index`'s broadcast for `cohort` and start accepting updates."""
        if round_index != self.round_index:
            raise ValueError(f"round {round_index} cannot open: {self.round_index} rounds are done")
        if self.privacy is not None:
            self.privacy.open(cohort)
        payloads, received, downloads = self.publish()
        self.open = OpenRound(round_index, list(cohort), payloads, received, downloads)
        return self.open

    def publish(self) -> tuple[list[tuple[str, bytes]], torch.Tensor, State]:
        """The current model's broadcast (named payloads), the model a client decodes from it,
        and the decoded downloads: what a client starting now receives."""
        payloads = self.broadcast.open(self.round_index, self.params, self.server_state)
        decode = self.broadcast.codec.decode
        # What the clients start from: in delta mode the reference the change was added to.
        received = self.broadcast.reference if self.broadcast.delta else decode(payloads[0][1])
        downloads = {name: decode(p) for name, p in payloads[1:]}
        return payloads, received, downloads

    def task_for(self, client: int) -> tuple[list[tuple[str, bytes]], int]:
        """What `client` receives this round, as named payloads, and their byte count: the model
        (in delta mode the changes it missed, `delta@R` each, or the full `model`), then downloads."""
        rnd = self._current()
        model, *downloads = rnd.payloads
        parts, full = self.broadcast.model_payloads(client, rnd.index, model[1])
        if not parts:  # it holds this round's model already (a second task in one round)
            named = []
        elif full:
            named = [("model", parts[0])]
        elif self.broadcast.delta:
            first = rnd.index - len(parts) + 1
            named = [(f"delta@{first + i}", p) for i, p in enumerate(parts)]
        else:
            named = [model]
        named += downloads
        nbytes = sum(len(p) for _, p in named)
        rnd.downlink_bytes += nbytes
        return named, nbytes

    def held_model(self, client: int, round_index: int) -> None:
        """A client says which round's model it holds (-1: none): delta mode sends it what it
        misses from there, whatever the server's own record says (a client may have lost it)."""
        self.broadcast.last_seen[client] = round_index

    def _current(self) -> OpenRound:
        if self.open is None:
            raise Rejected("no round is open")
        return self.open

    def admit(self, client: int, round_index: int) -> None:
        """Refuse, before reading a body, an update this round would not take."""
        rnd = self.open
        if rnd is None or round_index != rnd.index:
            current = "no round is open" if rnd is None else f"round {rnd.index + 1} is open"
            raise Rejected(f"late or wrong round: round {round_index + 1} is not open ({current})")
        if client not in rnd.cohort:
            raise Rejected(f"client {client} was not sampled for round {round_index + 1}")
        if client in rnd.rows:
            raise Rejected(f"duplicate submission for round {round_index + 1}")

    def bound_update_norm(self, max_norm: float) -> None:
        """From now on refuse model updates whose L2 norm exceeds `max_norm` (0: no bound)."""
        self.receiver.bound_norm(max_norm)

    def decode(self, client: int, payloads: list[bytes], num_steps: int = 0,
               round_index: int | None = None) -> dict[str, torch.Tensor]:
        """A client's validated rows for `round_index` (default: the open round), or `Rejected`.
        Pure and independent of whether a round is open: safe on many threads at once."""
        r = self._current().index if round_index is None else round_index
        return self.receiver.decode(client, payloads, r, num_steps)

    def accept(self, client: int, round_index: int, rows: dict[str, torch.Tensor], num_samples: int,
               train_loss: float, payloads: list[bytes]) -> None:
        """Keep a decoded update of the open round (`admit` is checked again)."""
        self.admit(client, round_index)
        rnd = self._current()
        self.receiver.keep(client, rows)
        rnd.rows[client] = rows
        rnd.samples[client] = num_samples
        rnd.losses[client] = train_loss
        rnd.nbytes[client] = sum(len(p) for p in payloads)
        if self.record_digests:
            rnd.digests[client] = digest(payloads)

    def reject(self, client: int, reason: str, nbytes: int = 0) -> None:
        """Record that `client`'s update of the open round was refused (its first refusal counts);
        `nbytes`: the payload bytes that were read before refusing it (they crossed the wire)."""
        if self.open is not None and client in self.open.cohort:
            self.open.reasons.setdefault(client, reason)
            self.open.refused_bytes += nbytes

    def accept_cohort(self, result: CohortResult) -> None:
        """A whole simulated cohort's encoded updates at once (batched decode where possible)."""
        rnd = self._current()
        assert result.payloads is not None
        stacks, ok, reasons = self.receiver.decode_cohort(result.client_ids, result, rnd.index)
        rnd.stacks, rnd.ok = stacks, ok
        rnd.samples.update(zip(result.client_ids, result.num_samples.tolist()))
        rnd.losses.update(zip(result.client_ids, result.train_loss.tolist()))
        rnd.nbytes.update((c, sum(map(len, p))) for c, p in zip(result.client_ids, result.payloads))
        if self.record_digests:
            rnd.digests.update((c, digest(p)) for c, p in zip(result.client_ids, result.payloads))
        for client, reason in {**reasons, **{c: f"could not encode its update ({why})"
                                             for c, why in result.failed.items()}}.items():
            rnd.reasons.setdefault(client, reason)

    def accept_secure_sum(self, secure: SecureSum, samples: dict[int, int], losses: dict[int, float]) -> None:
        """The open round's cohort summed by secure aggregation: the server holds no update."""
        rnd = self._current()
        rnd.secure = secure
        rnd.samples.update(samples)
        rnd.losses.update(losses)
        rnd.nbytes.update(secure.uplink)
        rnd.downlink_bytes += sum(secure.downlink.values())
        for client, reason in secure.rejected.items():
            rnd.reasons.setdefault(client, reason)

    def close_round(self, durations: dict[int, float] | None = None) -> RoundResult:
        """Aggregate what was accepted and step the model; the round is done. `durations`
        (client -> seconds, when a schedule measured them) go to the sampler's feedback."""
        rnd = self._current()
        r = rnd.index
        if rnd.secure is not None:
            return self._close_secure(rnd, rnd.secure, durations or {})
        previous = self.params
        if rnd.stacks is not None:  # accept_cohort: rows follow the cohort
            assert rnd.ok is not None
            ok = rnd.ok.clone()
            order = list(rnd.cohort)
            stacks = rnd.stacks
        else:
            order = [c for c in rnd.cohort if c in rnd.rows]
            ok = torch.ones(len(order), dtype=torch.bool)
            numel = self.params.numel()
            stacks = {s: _stack_rows(rnd.rows, order, s, numel) for s in self.streams}
        samples = torch.tensor([rnd.samples.get(c, 0) for c in order], dtype=torch.long)
        num_byzantine = 0
        if order:
            # FLTrust: the server's own update on its root data, from the model the clients got.
            # Before the adversary, which may probe the aggregator.
            if self.root is not None:
                reference = self.root.compute(rnd.received, rnd.downloads, r)
                for part in reference_users(self.aggregator):
                    part.set_reference(reference)
            num_byzantine = self._forge(rnd, order, ok, stacks, samples)
            # An algorithm's own check of each update (FRL: it must be a ranking of every layer).
            check = getattr(self.algorithm, "check_update", None)
            check_rows = self.receiver.check  # extra streams (rows taken by `accept` or batched decode)
            if check is not None or check_rows is not None:
                for i, client in enumerate(order):
                    why = check(rnd.received, stacks[MODEL][i]) if ok[i] and check is not None else ""
                    if not why and ok[i] and check_rows is not None:
                        why = check_rows({s: stacks[s][i] for s in self.streams})
                    if why:
                        ok[i] = False
                        rnd.reasons.setdefault(client, why)
        # Taken: decoded, valid, and not refused by the adversary's validation or the algorithm's check.
        accepted = [c for c, good in zip(order, ok.tolist()) if good]
        rejected = [c for c, good in zip(order, ok.tolist()) if not good]
        if rejected:
            why = "; ".join(f"client {c}: {rnd.reasons.get(c, 'rejected')}" for c in rejected)
            notice(f"round {r + 1}: rejected updates ({why})")
        # Updates refused on arrival (`reject`, deployment) never became rows.
        refused = [c for c in rnd.cohort if c in rnd.reasons and c not in order]
        keep = ok.nonzero().squeeze(1)
        everyone = len(keep) == len(order)  # then no row copy: the stack can be a large model's
        applied = False
        refused_update = ""
        # Central DP releases its noise even when no update came (a Poisson cohort may be empty):
        # the accountant counts every round as one sampled Gaussian release.
        if len(keep) or (self.privacy is not None and self.privacy.central is not None):
            weights = samples[keep].to(torch.float32)
            model = stacks[MODEL]
            try:
                rows = model if everyone else model[keep]
                if (dilate := getattr(self.algorithm, "server_rows", None)) is not None:  # FedConv's learnt dilation
                    rows = dilate(self.server_state, rnd.received, rows, weights, [order[i] for i in keep.tolist()])
                delta = (self.aggregator.aggregate(rows, weights) if self.privacy is None
                         else self.privacy.aggregate(self.aggregator, rows, weights))
            except ValueError as exc:  # e.g. rejections left too few inputs for a robust rule
                refused_update = f"aggregator refused the cohort, model unchanged ({exc})"
                notice(f"round {r + 1}: {refused_update}")
            else:
                old = self.params  # `_step` replaces the tensor, it does not write into it
                # An algorithm's server correction of the aggregate (FedDyn), committed with the step.
                correct = getattr(self.algorithm, "server_delta", None)
                pending = None
                if correct is not None:
                    delta, pending = correct(self.server_state, delta, len(keep) / self.num_clients)
                refused_update = self._step(delta)
                state = self.server_state
                try:
                    if refused_update:
                        pass
                    elif (by_rows := getattr(self.algorithm, "server_update_rows", None)) is not None:
                        # Several global models (IFCA, clusters): each kept client's rows, not means.
                        kept = {("model" if n == MODEL else n): (stacks[n] if everyone else stacks[n][keep])
                                for n in self.streams}
                        self.server_state = by_rows(
                            self.server_state, old, self.params, kept, weights, [order[i] for i in keep.tolist()])
                        applied = True
                    else:
                        if pending is not None:
                            self.server_state = pending
                        means = {n: (stacks[n] if everyone else stacks[n][keep]).mean(dim=0)
                                 for n in self.algorithm.uploads if n in stacks}
                        self.server_state = self.algorithm.server_update(
                            self.server_state, means, len(keep) / self.num_clients)
                        applied = True
                except _STATE_ERRORS as exc:  # the round still closes, as if it had not stepped
                    refused_update = self._unstep(old, state, exc)
                if refused_update:
                    notice(f"round {r + 1}: {refused_update}")
        included = [order[i] for i in keep.tolist()] if applied else []
        missing = [c for c in rnd.cohort if c not in order and c not in refused]
        rejected = [c for c in rnd.cohort if c in set(rejected) | set(refused)]
        # Bytes that crossed the wire and were read (refused ones too); the train loss the
        # accepted clients reported (a refused client's loss may be NaN).
        uplink = sum(rnd.nbytes.values()) + rnd.refused_bytes
        w = torch.tensor([float(rnd.samples[c]) for c in accepted], dtype=torch.float64)
        losses = torch.tensor([rnd.losses[c] for c in accepted], dtype=torch.float64)
        train_loss = float((losses * w).sum() / w.sum().clamp_min(1.0)) if accepted else None
        self.open = None
        self.round_index = r + 1
        self.uplink_total += uplink
        self.downlink_total += rnd.downlink_bytes
        out = RoundResult(
            r + 1, len(included), uplink, rnd.downlink_bytes, train_loss, rejected,
            num_byzantine=num_byzantine, cohort=rnd.cohort,
            reasons=dict(rnd.reasons),  # every refusal, also of a client whose later update counted
            missing=missing, late=rnd.late, digests=rnd.digests,
        )
        out.applied = applied
        out.refused = refused_update or ("" if applied else "no valid update arrived, model unchanged")
        out.accepted, out.included = accepted, included
        self._feedback(r, accepted, rnd.losses, durations or {})
        if self.observer is not None:
            kept_clients = [order[i] for i in keep.tolist()]
            out.extra.update(self.observer(ClosedRound(
                r, previous, self.params, kept_clients, stacks[MODEL][keep], samples[keep].to(torch.float32),
                {c: rnd.reasons.get(c, "no update arrived") for c in rnd.cohort if c not in kept_clients},
                applied, dict(rnd.digests), self.aggregator, float(getattr(self.optimizer, "lr", 1.0)),
                self.optimizer, self._stepped_from if applied else None)) or {})
        if self.privacy is not None:
            out.extra.update(self.privacy.close(rnd.cohort))
        return out

    def _close_secure(self, rnd: OpenRound, secure: SecureSum, durations: dict[int, float]) -> RoundResult:
        """close_round for a securely summed cohort: the server optimizer steps with the sum."""
        assert self.privacy is not None
        refused = secure.error and f"secure aggregation failed, model unchanged ({secure.error})"
        if not refused and not secure.survivors:
            refused = "no client finished secure aggregation, model unchanged"
        if not refused:
            refused = self._step(self.privacy.finish_secure(secure))
        if refused:
            notice(f"round {rnd.index + 1}: {refused}")
        else:
            self.server_state = self.algorithm.server_update(self.server_state, {},
                                                             len(secure.survivors) / self.num_clients)
        included = [] if refused else list(secure.survivors)
        w = torch.tensor([float(rnd.samples[c]) for c in secure.survivors], dtype=torch.float64)
        losses = torch.tensor([rnd.losses[c] for c in secure.survivors], dtype=torch.float64)
        train_loss = float((losses * w).sum() / w.sum().clamp_min(1.0)) if secure.survivors else None
        uplink = sum(rnd.nbytes.values())
        self.open = None
        self.round_index = rnd.index + 1
        self.uplink_total += uplink
        self.downlink_total += rnd.downlink_bytes
        missing = [c for c in rnd.cohort if c not in secure.survivors and c not in rnd.reasons]
        out = RoundResult(rnd.index + 1, len(included), uplink, rnd.downlink_bytes, train_loss,
                          sorted(rnd.reasons), cohort=rnd.cohort, reasons=dict(rnd.reasons),
                          missing=missing)
        out.applied, out.refused = not refused, refused
        out.accepted, out.included = list(secure.survivors), included
        out.extra.update(secure.metrics)
        out.extra.update(self.privacy.close(rnd.cohort))
        self._feedback(rnd.index, list(secure.survivors), rnd.losses, durations)
        return out

    def _feedback(self, round_index: int, clients: list[int], losses: dict[int, float],
                  durations: dict[int, float]) -> None:
        observe = getattr(self.sampler, "observe", None)
        if observe is not None and clients:
            observe(Feedback(round_index, list(clients), [float(losses[c]) for c in clients],
                             [durations.get(c) for c in clients]))

    def _step(self, delta: torch.Tensor) -> str:
        """Step the model by the aggregate, unless the new model would not be finite in float32
        arithmetic: then the model and optimizer state stay as they were and the reason is returned.

        Finite values are not enough: finite but huge updates (all 3e38) average to a model whose
        every forward pass overflows, after which no client can send a finite loss again. The sum
        of squares catches both (NaN/Inf, and any value past ~1.8e19, far beyond a trained model).
        """
        saved = {k: v.clone() for k, v in self.optimizer_state.items()}
        self._stepped_from = saved  # the state this step started from (an observer's, e.g. the ledger's)
        params = self.optimizer.step(self.params, delta, self.optimizer_state)
        if bool(torch.isfinite(params.square().sum())):
            self.params = params
            return ""
        self.optimizer_state = saved
        return ("update refused, model unchanged: the aggregate would make the global model "
                "non-finite (NaN/Inf, or values whose squares overflow float32)")

    def _unstep(self, old: torch.Tensor, state: State, exc: Exception) -> str:
        """The algorithm's server update failed after `_step`: the model, the optimizer state and
        the algorithm's server state go back to what they were; returns the reason."""
        self.params, self.optimizer_state, self.server_state = old, self._stepped_from, state
        return f"the algorithm's server update failed, model unchanged ({type(exc).__name__}: {exc})"

    def _forge(self, rnd: OpenRound, order: list[int], ok: torch.Tensor, stacks: dict[str, torch.Tensor],
               samples: torch.Tensor) -> int:
        """The simulated adversary replaces the Byzantine clients' model rows; what it forges is
        validated like any update (a non-finite forgery is rejected)."""
        adv = self.adversary
        if adv is None:
            return 0
        byzantine = torch.tensor([c in adv.byzantine for c in order], dtype=torch.bool)
        if not byzantine.any():
            return 0
        context = AttackContext(rnd.index, rnd.received, samples.to(torch.float32), self.aggregator,
                                generator(self.seed, rnd.index, 0xBAD))
        stacks[MODEL] = adv.attack.forge(stacks[MODEL], byzantine, context)
        bad = byzantine & ~torch.isfinite(stacks[MODEL]).all(dim=1)
        for i in bad.nonzero().flatten().tolist():
            ok[i] = False
            rnd.reasons.setdefault(order[i], f"forged {MODEL} holds NaN or Inf values")
        return int(byzantine.sum())

    # -------------------------------------------------------------- one at a time

    def apply_update(self, client: int, payloads: list[bytes], weight: float = 1.0,
                     num_steps: int = 0) -> None:
        """Decode, validate and apply one update now, scaled by `weight` (a staleness weight):
        the server step of asynchronous schedules. `Rejected` leaves the model unchanged."""
        if self.privacy is not None and (self.privacy.central or self.privacy.secure):
            raise KoinonError("central DP and secure aggregation release only whole rounds' sums; "
                              "apply_update would apply one client's update in the clear")
        rows = self.receiver.decode(client, payloads, self.round_index, num_steps)
        old, state = self.params, self.server_state
        refused = self._step(rows[MODEL] * weight)
        if refused:
            raise Rejected(refused)
        uploads = {n: rows[n] * weight for n in self.algorithm.uploads if n in rows}
        try:
            self.server_state = self.algorithm.server_update(self.server_state, uploads, 1 / self.num_clients)
        except _STATE_ERRORS as exc:
            self._unstep(old, state, exc)
            raise
        self.receiver.keep(client, rows)
        self.uplink_total += sum(len(p) for p in payloads)

    def apply_secure_buffer(self, secure: SecureSum, samples: dict[int, int], losses: dict[int, float],
                            downlink_bytes: int = 0) -> RoundResult:
        """One server step from a buffer summed by secure aggregation (FedBuff under
        `privacy.secagg`): `close_round`'s secure path, the buffer's clients as the cohort."""
        self.open = OpenRound(self.round_index, sorted(samples), [], self.params, {})
        self.accept_secure_sum(secure, samples, losses)
        self.open.downlink_bytes += downlink_bytes
        return self.close_round()

    def apply_buffered(self, updates: list[Buffered], downlink_bytes: int = 0,
                       side_uplink_bytes: int = 0) -> RoundResult:
        """One server step from a buffer of updates (FedBuff, a FedCompass group): each is
        decoded and validated (a refused one is recorded and left out), its rows are scaled by
        its staleness weight, and the rows are aggregated, stepped and recorded as `close_round`
        does. With every weight 1 this is `close_round` on the same updates (same bits).
        `downlink_bytes`: what the clients in flight were sent since the last step;
        `side_uplink_bytes`: other uploads of this step (FedAMD's anchor gradients)."""
        r = self.round_index
        rows: list[dict[str, torch.Tensor]] = []
        raw: list[dict[str, torch.Tensor]] = []  # as decoded: what an increment codec keeps
        kept: list[Buffered] = []
        reasons: dict[int, str] = {}
        for u in updates:
            try:
                decoded = self.receiver.decode(u.client, u.payloads, r, u.num_steps)
            except Rejected as exc:
                reasons.setdefault(u.client, str(exc))
                continue
            raw.append(decoded)
            if u.offset is not None:  # FedAsync mixes models: (x_start + delta) - x = delta + offset
                decoded = {**decoded, MODEL: decoded[MODEL] + u.offset}
            if u.weight != 1.0:
                decoded = {s: v * u.weight for s, v in decoded.items()}
            rows.append(decoded)
            kept.append(u)
        applied, refused_update = False, ""
        if kept:
            stacks = {s: torch.stack([row[s] for row in rows]) for s in self.streams}
            weights = torch.tensor([u.num_samples for u in kept], dtype=torch.long).to(torch.float32)
            try:
                delta = self.aggregator.aggregate(stacks[MODEL], weights)
            except ValueError as exc:
                refused_update = f"aggregator refused the buffer, model unchanged ({exc})"
            else:
                old, state = self.params, self.server_state
                refused_update = self._step(delta)
                if not refused_update:
                    means = {n: stacks[n].mean(dim=0) for n in self.algorithm.uploads if n in stacks}
                    try:
                        self.server_state = self.algorithm.server_update(
                            self.server_state, means, len(kept) / self.num_clients)
                        applied = True
                    except _STATE_ERRORS as exc:
                        refused_update = self._unstep(old, state, exc)
            if refused_update:
                notice(f"server step {r + 1}: {refused_update}")
        if applied:
            for u, row in zip(kept, raw):  # the client's own estimate, not the mixed/scaled rows
                self.receiver.keep(u.client, row)
        accepted = [u.client for u in kept]
        uplink = sum(sum(len(p) for p in u.payloads) for u in updates) + side_uplink_bytes
        w = torch.tensor([float(u.num_samples) for u in kept], dtype=torch.float64)
        losses = torch.tensor([u.train_loss for u in kept], dtype=torch.float64)
        train_loss = float((losses * w).sum() / w.sum().clamp_min(1.0)) if kept else None
        self.round_index = r + 1
        self.uplink_total += uplink
        self.downlink_total += downlink_bytes
        out = RoundResult(r + 1, len(kept) if applied else 0, uplink, downlink_bytes, train_loss,
                          sorted(reasons), cohort=[u.client for u in updates], reasons=reasons)
        if self.record_digests:
            out.digests = {u.client: digest(u.payloads) for u in updates}
        out.applied = applied
        out.refused = refused_update or ("" if applied else "no valid update arrived, model unchanged")
        out.accepted, out.included = accepted, (accepted if applied else [])
        self._feedback(r, accepted, {u.client: u.train_loss for u in kept},
                       {u.client: u.duration_s for u in kept if u.duration_s is not None})
        return out

    # -------------------------------------------------------------- checkpoint

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything needed to continue exactly where this server stands (one schema)."""
        out: dict[str, torch.Tensor] = {"params": self.params}
        out.update({f"optimizer/{k}": v for k, v in self.optimizer_state.items()})
        out.update({f"algorithm/{k}": v for k, v in self.server_state.items()})
        out.update({f"receiver/{k}": v for k, v in self.receiver.state_dict().items()})
        out.update({f"broadcast/{k}": v for k, v in self.broadcast.state_dict().items()})
        if hasattr(self.aggregator, "state_dict"):
            out.update({f"aggregator/{k}": v for k, v in self.aggregator.state_dict().items()})
        if hasattr(self.sampler, "state_dict"):  # what a learning sampler learned from feedback
            out.update({f"sampler/{k}": v for k, v in self.sampler.state_dict().items()})
        if self.root is not None:
            out.update({f"root/{k}": v for k, v in self.root.state.items()})
        if self.privacy is not None:
            out.update({f"privacy/{k}": v for k, v in self.privacy.state_dict().items()})
        out["counters"] = torch.tensor([self.round_index, self.uplink_total, self.downlink_total],
                                       dtype=torch.long)
        return {k: v.detach().contiguous() for k, v in out.items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = {"params", "counters"} - set(tensors)
        if missing:
            raise KoinonError(f"checkpoint lacks {', '.join(sorted(missing))}: not a server state of "
                              "this koinon version (checkpoints from before the wire/state-machine "
                              "schema cannot be resumed; start the run again)")
        if tensors["params"].shape != self.params.shape:
            raise ValueError(f"checkpoint holds {tensors['params'].numel()} parameters, "
                             f"the model has {self.params.numel()}")
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for key, v in tensors.items():
            head, _, rest = key.partition("/")
            if rest:
                groups.setdefault(head, {})[rest] = v.clone()
        self.params = tensors["params"].clone()
        self.optimizer_state = groups.get("optimizer", {})
        self.server_state = groups.get("algorithm", {})
        self.receiver.load_state_dict(groups.get("receiver", {}))
        self.broadcast.load_state_dict(groups.get("broadcast", {}))
        if "aggregator" in groups and hasattr(self.aggregator, "load_state_dict"):
            self.aggregator.load_state_dict(groups["aggregator"])
        if hasattr(self.sampler, "load_state_dict"):
            self.sampler.load_state_dict(groups.get("sampler", {}))
        if self.root is not None:
            self.root.state = groups.get("root", {})
        if self.privacy is not None:
            self.privacy.load_state_dict(groups.get("privacy", {}))
        self.round_index, self.uplink_total, self.downlink_total = (int(x) for x in tensors["counters"])
        self.open = None
        # Optimizers with state must find all of it, or the resumed run would silently differ.
        missing = set(self.optimizer.init(self.params)) - set(self.optimizer_state)
        if missing:
            raise ValueError(f"checkpoint lacks server optimizer state {sorted(missing)}")

