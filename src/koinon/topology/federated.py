"""Server-based federated learning: the round protocol, independent of where clients run.

One round: the sampler picks a cohort; the server encodes the global model with the downlink
codec (every sampled client receives those bytes); the runtime trains the cohort; each client
encodes its delta with its own codec state (error feedback stays with the client); the server
decodes, drops non-finite updates, aggregates the stack `[n, P]`, and its optimizer takes the
step. Bytes are the lengths of the real payloads. A rule that trusts the server's own update
(FLTrust) gets it each round from a root dataset the server set aside (`koinon.server.root`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from koinon.aggregate import Aggregator, build_aggregator
from koinon.attacks import ATTACKS, Attack, AttackContext
from koinon.clients import CLIENT_ALGORITHMS, ClientAlgorithm, LocalTraining
from koinon.compress import CODECS, Codec
from koinon.data.federated import FederatedData
from koinon.errors import CodecError
from koinon.local import CohortTrainer, cross_entropy, evaluate
from koinon.log import notice
from koinon.params import Layout
from koinon.runtime import RUNTIMES, Runtime
from koinon.seeding import mix_seed
from koinon.server import SAMPLERS, SERVER_OPTIMIZERS, Sampler, ServerOptimizer
from koinon.server.root import RootUpdate, reference_users, reserve_root
from koinon.update import State

_DELTA = "delta"


@dataclass
class RoundResult:
    round: int
    num_clients: int
    uplink_bytes: int
    downlink_bytes: int
    train_loss: float
    rejected: list[int] = field(default_factory=list)
    test_accuracy: float | None = None
    test_loss: float | None = None
    num_byzantine: int = 0
    extra: dict[str, float] = field(default_factory=dict)  # e.g. an attack's success rate

    def as_dict(self) -> dict:
        return {
            "round": self.round,
            "test_accuracy": self.test_accuracy,
            "test_loss": self.test_loss,
            "train_loss": self.train_loss,
            "num_clients": self.num_clients,
            "uplink_bytes": self.uplink_bytes,
            "downlink_bytes": self.downlink_bytes,
            "rejected": self.rejected,
            "num_byzantine": self.num_byzantine,
            **self.extra,
        }


def fit_rounds(topology, rounds: int, eval_every: int) -> list:
    """`rounds` more rounds of any topology, evaluating every `eval_every` rounds and after the last."""
    if rounds < 0 or eval_every < 1:
        raise ValueError(f"need rounds >= 0 and eval_every >= 1, got {rounds} and {eval_every}")
    out = []
    for i in range(rounds):
        last = i == rounds - 1
        out.append(topology.run_round(evaluate=last or (topology.round_index + 1) % eval_every == 0))
    return out


def component(registry, value, section: str, **context):
    """A component given by registered name (built with defaults) or as an object."""
    return registry.build(value, {}, section, **context) if isinstance(value, str) else value


class Federation:
    """A server, a population of simulated clients, and the components that connect them.

    >>> fed = Federation(model, data, local=LocalTraining(lr=0.05), clients_per_round=10)
    >>> for _ in range(30):
    ...     print(fed.run_round(evaluate=True).test_accuracy)
    """

    def __init__(
        self,
        model: nn.Module,
        data: FederatedData,
        *,
        local: LocalTraining | None = None,
        algorithm: ClientAlgorithm | str = "fedavg",
        server_optimizer: ServerOptimizer | str = "fedavg",
        sampler: Sampler | str = "uniform",
        codec: Codec | str = "identity",
        downlink: Codec | str = "identity",
        aggregator: Aggregator | str = "mean",
        runtime: Runtime | str = "inprocess",
        clients_per_round: int = 10,
        seed: int = 0,
        loss_fn=cross_entropy,
        attack: Attack | str | None = None,
        byzantine_fraction: float = 0.0,
        downlink_delta: bool = False,
    ) -> None:
        if not 1 <= clients_per_round <= data.num_clients:
            raise ValueError(
                f"clients_per_round must be in [1, {data.num_clients}] (the number of clients), "
                f"got {clients_per_round}"
            )
        if not 0.0 <= byzantine_fraction < 1.0:
            raise ValueError(f"byzantine_fraction must be in [0, 1), got {byzantine_fraction}")
        self.model = model
        self.aggregator = build_aggregator(aggregator) if isinstance(aggregator, str) else aggregator
        self.local = local or LocalTraining()
        self.algorithm = component(CLIENT_ALGORITHMS, algorithm, "client.algorithm")
        self.layout = Layout.from_module(model)
        # FLTrust and the like: the server sets its clean root dataset aside before anything
        # else (so no client, honest or Byzantine, owns those samples) and trains on it itself.
        self._reference_users = reference_users(self.aggregator)
        self.root: RootUpdate | None = None
        if self._reference_users:
            user = self._reference_users[-1]
            data, root_indices = reserve_root(data, getattr(user, "root_samples", 100), seed)
            steps = getattr(user, "root_steps", 0)
            root_local = dataclasses.replace(self.local, steps=steps) if steps else self.local
            self.root = RootUpdate(model, self.layout, data, root_indices, self.algorithm,
                                   root_local, seed, loss_fn=loss_fn)
        self.attack = component(ATTACKS, attack or "none", "attack")
        # The Byzantine population: a fixed, seeded fraction of all clients.
        rng = np.random.default_rng([seed, 0xBAD])
        count = round(byzantine_fraction * data.num_clients)
        self.byzantine = {int(c) for c in rng.choice(data.num_clients, count, replace=False)}
        self.byzantine_fraction = byzantine_fraction
        if self.byzantine:
            owned = torch.cat([data.client_indices[c] for c in sorted(self.byzantine)])
            poisoned = self.attack.poison_data(
                data.dataset, owned, torch.Generator().manual_seed(mix_seed(seed, 0xBAD))
            )
            data = FederatedData(poisoned, data.client_indices)
        self.data = data
        self.server_optimizer = component(SERVER_OPTIMIZERS, server_optimizer, "server.optimizer")
        self.sampler = component(SAMPLERS, sampler, "server.sampler")
        self.codec = component(CODECS, codec, "codec", layout=self.layout)
        self.downlink = component(CODECS, downlink, "downlink", layout=self.layout)
        self.runtime = component(RUNTIMES, runtime, "runtime")
        self.clients_per_round = clients_per_round
        self.seed = seed
        self.loss_fn = loss_fn

        self.params = self.layout.flatten(model)
        self.round_index = 0  # rounds completed
        self.optimizer_state = self.server_optimizer.init(self.params)
        self.server_state = self.algorithm.init_server_state(self.layout.numel)
        self.client_states: dict[int, State] = {}
        self.codec_states: dict[tuple[int, str], State] = {}
        self.downlink_states: dict[str, State] = {}
        # Delta downlink: every client that is up to date holds `reference`; the server
        # broadcasts the compressed change of the model, and a client that missed rounds gets
        # the payloads it missed, or the full model when that is smaller.
        self.downlink_delta = downlink_delta
        self.reference = self.params.clone()
        self.last_seen = torch.full((data.num_clients,), -1, dtype=torch.long)
        self.broadcast_sizes: list[int] = []
        # Server-side running sums for codecs that decode increments (EF21, EControl).
        self.increment_sums: dict[tuple[int, str], torch.Tensor] = {}
        self.uplink_total = 0
        self.downlink_total = 0
        self._sizes = data.sizes.numpy()
        self._population = np.arange(data.num_clients)
        self.runtime.setup(
            CohortTrainer(model, self.layout, data, self.algorithm, self.local, loss_fn=loss_fn)
        )

    # ------------------------------------------------------------------ round

    def sample_cohort(self, round_index: int) -> list[int]:
        """The round's clients. Under attack, every cohort holds exactly round(fraction * K)
        Byzantine clients, so a robust rule built for that f is never silently overrun by an
        unlucky draw (the evaluation protocol of the robustness literature, e.g. ByzFL)."""
        rng = np.random.default_rng([self.seed, round_index, 0x5A3B])
        k = self.clients_per_round
        if not self.byzantine:
            return self.sample_from(round_index, self._population, self._sizes)
        bad = np.array(sorted(self.byzantine))
        good = np.setdiff1d(self._population, bad)
        f = min(round(self.byzantine_fraction * k), len(bad))
        chosen = self.sampler.sample(bad, self._sizes[bad], f, rng) if f else []
        chosen += self.sampler.sample(good, self._sizes[good], k - f, rng)
        return sorted(chosen)

    def sample_from(self, round_index: int, population: np.ndarray, sizes: np.ndarray) -> list[int]:
        """The round's cohort drawn from `population` (e.g. the clients connected right now),
        with the same seeded generator as `sample_cohort`: when every client is present, a
        networked server picks the simulation's cohort."""
        rng = np.random.default_rng([self.seed, round_index, 0x5A3B])
        k = min(self.clients_per_round, len(population))
        return sorted(int(c) for c in self.sampler.sample(population, sizes, k, rng))

    def _encode_down(self, name: str, tensor: torch.Tensor, round_index: int, stream: int) -> bytes:
        state = self.downlink_states.get(name) or self.downlink.init_state()
        gen = torch.Generator().manual_seed(mix_seed(self.seed, round_index, -1, stream))
        payload, self.downlink_states[name] = self.downlink.encode(tensor, state, gen)
        return payload

    def _send_down(self, name: str, tensor: torch.Tensor, round_index: int, stream: int) -> tuple[torch.Tensor, int]:
        payload = self._encode_down(name, tensor, round_index, stream)
        return self.downlink.decode(payload), len(payload)

    def broadcast_payloads(self, round_index: int) -> list[tuple[str, bytes]]:
        """The downlink bytes of a round, as a networked server sends them: the global model
        (stream "delta"), then the algorithm's downloads. Encoded exactly as `run_round` does,
        so a client that decodes them starts from the simulation's model."""
        if self.downlink_delta:
            raise ValueError("downlink.delta needs per-client download history; not supported here")
        out = [(_DELTA, self._encode_down(_DELTA, self.params, round_index, 0))]
        for i, name in enumerate(self.algorithm.downloads, start=1):
            out.append((name, self._encode_down(name, self.server_state[name], round_index, i)))
        return out

    def decode_broadcast(self, payloads: list[tuple[str, bytes]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """What a client decodes from `broadcast_payloads`: the model and the algorithm's downloads."""
        decoded = {name: self.downlink.decode(payload) for name, payload in payloads}
        return decoded.pop(_DELTA), decoded

    def set_root_reference(self, round_index: int, received: torch.Tensor, server_state: dict[str, torch.Tensor]) -> None:
        """FLTrust and the like: the server trains on its root data from the model the clients
        received (so its direction is comparable to theirs) and hands the update to the rules
        that trust it. Once per round: the server's local state moves on."""
        if self.root is None:
            return
        reference = self.root.compute(received, server_state, round_index)
        for part in self._reference_users:
            part.set_reference(reference)

    def run_round(self, evaluate: bool = True) -> RoundResult:
        r = self.round_index
        cohort = self.sample_cohort(r)
        k = len(cohort)

        if self.downlink_delta:
            change, nbytes = self._send_down(_DELTA, self.params - self.reference, r, 0)
            self.reference = self.reference + change
            self.broadcast_sizes.append(nbytes)
            full = self.layout.numel * 4
            cumulative = torch.tensor([0, *self.broadcast_sizes]).cumsum(0)  # bytes since round j
            downlink = 0
            for c in cohort:
                seen = int(self.last_seen[c])
                missed = int(cumulative[-1] - cumulative[seen + 1]) if seen >= 0 else full
                downlink += min(missed, full)
                self.last_seen[c] = r
            received = self.reference
        else:
            received, nbytes = self._send_down(_DELTA, self.params, r, 0)
            downlink = nbytes * k
        server_state = {}
        for i, name in enumerate(self.algorithm.downloads, start=1):
            server_state[name], nbytes = self._send_down(name, self.server_state[name], r, i)
            downlink += nbytes * k

        result = self.runtime.train(
            cohort, received, server_state, [self.client_states.get(c, {}) for c in cohort],
            self.seed, r,
        )
        # Before the attack, which may probe the aggregator.
        self.set_root_reference(r, received, server_state)

        byzantine = torch.tensor([c in self.byzantine for c in cohort], dtype=torch.bool)
        if byzantine.any():
            context = AttackContext(
                r, received, result.num_samples.to(torch.float32), self.aggregator,
                torch.Generator().manual_seed(mix_seed(self.seed, r, 0xBAD)),
            )
            result.deltas = self.attack.forge(result.deltas, byzantine, context)

        streams = [(_DELTA, result.deltas), *((n, result.uploads[n]) for n in self.algorithm.uploads)]
        batched = result.messages is None and hasattr(self.codec, "encode_batch")
        decoded = {} if batched else {name: torch.zeros_like(t) for name, t in streams}
        finite = torch.ones(k, dtype=torch.bool)
        reasons: list[str] = []
        uplink = 0
        # Stateless dense codecs encode and decode the whole cohort at once: the same bytes as
        # client by client, without K small conversions (they dominated rounds of 100 clients).
        if batched:
            for name, stack in streams:
                payloads = self.codec.encode_batch(stack)
                uplink += sum(len(b) for b in payloads)
                decoded[name], errors = self.codec.decode_batch(payloads)
                for i, err in enumerate(errors):
                    if err is not None:
                        finite[i] = False
                        reasons.append(f"client {cohort[i]}: {err}")
        for i, c in enumerate(cohort):
            if result.messages is not None:  # the algorithm's own wire format (SPSA's bytes)
                payload = result.messages[i]
                uplink += len(payload)
                try:
                    decoded[_DELTA][i, : self.layout.num_trainable] = self.algorithm.decode_update(
                        payload, self.seed, r, c, self.layout.num_trainable, self.local.lr,
                        int(result.num_steps[i]),
                    )
                except CodecError as exc:
                    finite[i] = False
                    reasons.append(f"client {c}: {exc}")
                continue
            if batched:
                continue
            for s, (name, stack) in enumerate(streams):
                key = (c, name)
                state = self.codec_states.get(key) or self.codec.init_state()
                gen = torch.Generator().manual_seed(mix_seed(self.seed, r, c, s))
                payload, new_state = self.codec.encode(stack[i], state, gen)
                if new_state:
                    self.codec_states[key] = new_state
                uplink += len(payload)
                try:  # the server validates every payload; a bad one costs its sender the round
                    row = self.codec.decode(payload)
                except CodecError as exc:
                    finite[i] = False
                    reasons.append(f"client {c}: {exc}")
                    continue
                if getattr(self.codec, "decodes_increment", False):
                    row = self.increment_sums.get(key, torch.zeros_like(row)) + row
                    self.increment_sums[key] = row
                decoded[name][i] = row

        rejected = self.apply_updates(
            r, cohort, decoded, finite, result.num_samples, result.client_states, reasons
        )

        self.round_index += 1
        self.uplink_total += uplink
        self.downlink_total += downlink
        seen = result.num_samples.to(torch.float32)
        train_loss = float((result.train_loss * seen).sum() / seen.sum().clamp_min(1.0))
        out = RoundResult(self.round_index, k, uplink, downlink, train_loss, rejected,
                          num_byzantine=int(byzantine.sum()))
        if evaluate:
            out.test_accuracy, out.test_loss = self.evaluate()
            if self.byzantine and hasattr(self.attack, "metrics"):
                out.extra.update(self.attack.metrics(self.model, self.layout, self.params, self.data.dataset))
        return out

    def apply_updates(
        self,
        round_index: int,
        cohort: list[int],
        decoded: dict[str, torch.Tensor],
        finite: torch.Tensor,
        num_samples: torch.Tensor,
        client_states: list[State],
        reasons: list[str],
    ) -> list[int]:
        """Validate, aggregate and apply one round's decoded uploads (row i = `cohort[i]`).

        The server half of a round, shared by the simulation and the networked server so both
        do the same math: rows already marked bad in `finite` and rows holding NaN/Inf are
        dropped (the global model never sees them), the rest are aggregated with their sample
        counts as weights, and the server optimizer and the algorithm's server state take the
        step. Returns the rejected clients.
        """
        finite = finite.clone()
        for name, stack in decoded.items():  # one check over the stack, for codecs that skip it
            # A row's sum is finite when all its values are (the cheap test); rows whose sum
            # is not (NaN, Inf, or only an overflowing sum) get the exact test.
            suspect = ~torch.isfinite(stack.sum(dim=1))
            if suspect.any():
                suspect[suspect.clone()] = ~torch.isfinite(stack[suspect]).all(dim=1)
            bad = finite & suspect
            reasons += [f"client {cohort[i]}: non-finite {name}" for i in bad.nonzero().flatten().tolist()]
            finite &= ~bad
        rejected = [c for c, ok in zip(cohort, finite.tolist()) if not ok]
        if rejected:
            notice(f"round {round_index + 1}: rejected updates ({'; '.join(reasons)})")
        keep = finite.nonzero().squeeze(1)
        everyone = len(keep) == len(cohort)  # then no row copy: the stack can be a large model's
        delta = None
        if len(keep):
            weights = num_samples[keep].to(torch.float32)
            try:
                delta = self.aggregator.aggregate(decoded[_DELTA] if everyone else decoded[_DELTA][keep], weights)
            except ValueError as exc:  # e.g. rejections left too few inputs for a robust rule
                notice(f"round {round_index + 1}: aggregator refused the cohort, model unchanged ({exc})")
        if delta is not None:
            self.params = self.server_optimizer.step(self.params, delta, self.optimizer_state)
            means = {n: (decoded[n] if everyone else decoded[n][keep]).mean(dim=0) for n in self.algorithm.uploads}
            self.server_state = self.algorithm.server_update(
                self.server_state, means, len(keep) / self.data.num_clients
            )
            for i in keep.tolist():
                if client_states[i]:
                    self.client_states[cohort[i]] = client_states[i]
        return rejected

    def evaluate(self) -> tuple[float, float]:
        """(accuracy, loss) of the global model on the held-out test split."""
        ds = self.data.dataset
        return evaluate(self.model, self.layout, self.params, ds.x_test, ds.y_test, self.loss_fn)

    def fit(self, rounds: int, eval_every: int = 1) -> list[RoundResult]:
        """Run `rounds` more rounds, evaluating every `eval_every` rounds and after the last."""
        return fit_rounds(self, rounds, eval_every)

    def close(self) -> None:
        self.runtime.close()

    # ------------------------------------------------------------- checkpoint

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor needed to continue exactly where this federation stands."""
        out: dict[str, torch.Tensor] = {"params": self.params}
        out.update({f"server_optimizer/{k}": v for k, v in self.optimizer_state.items()})
        out.update({f"server_state/{k}": v for k, v in self.server_state.items()})
        for c, st in self.client_states.items():
            out.update({f"client/{c}/{k}": v for k, v in st.items()})
        for (c, stream), st in self.codec_states.items():
            out.update({f"codec/{c}/{stream}/{k}": v for k, v in st.items()})
        for stream, st in self.downlink_states.items():
            out.update({f"downlink/{stream}/{k}": v for k, v in st.items()})
        if hasattr(self.aggregator, "state_dict"):
            out.update({f"aggregator/{k}": v for k, v in self.aggregator.state_dict().items()})
        for (c, stream), v in self.increment_sums.items():
            out[f"increment/{c}/{stream}"] = v
        if self.root is not None:
            out.update({f"root/{k}": v for k, v in self.root.state.items()})
        if self.downlink_delta:
            out["reference"] = self.reference
            out["last_seen"] = self.last_seen
            out["broadcast_sizes"] = torch.tensor(self.broadcast_sizes, dtype=torch.long)
        return {k: v.detach().contiguous() for k, v in out.items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors["params"].shape != self.params.shape:
            raise ValueError(
                f"checkpoint holds {tensors['params'].numel()} parameters, the model has {self.params.numel()}"
            )
        self.params = tensors["params"].clone()
        self.optimizer_state, self.server_state = {}, {}
        self.client_states, self.codec_states, self.downlink_states = {}, {}, {}
        self.increment_sums = {}
        if self.root is not None:
            self.root.state = {}
        aggregator_state = {}
        for key, v in tensors.items():
            parts = key.split("/")
            if parts[0] == "server_optimizer":
                self.optimizer_state[parts[1]] = v.clone()
            elif parts[0] == "server_state":
                self.server_state[parts[1]] = v.clone()
            elif parts[0] == "client":
                self.client_states.setdefault(int(parts[1]), {})[parts[2]] = v.clone()
            elif parts[0] == "codec":
                self.codec_states.setdefault((int(parts[1]), parts[2]), {})[parts[3]] = v.clone()
            elif parts[0] == "downlink":
                self.downlink_states.setdefault(parts[1], {})[parts[2]] = v.clone()
            elif parts[0] == "aggregator":
                aggregator_state[parts[1]] = v.clone()
            elif parts[0] == "increment":
                self.increment_sums[(int(parts[1]), parts[2])] = v.clone()
            elif parts[0] == "root" and self.root is not None:
                self.root.state[parts[1]] = v.clone()
            elif key == "reference":
                self.reference = v.clone()
            elif key == "last_seen":
                self.last_seen = v.clone()
            elif key == "broadcast_sizes":
                self.broadcast_sizes = v.tolist()
        if aggregator_state and hasattr(self.aggregator, "load_state_dict"):
            self.aggregator.load_state_dict(aggregator_state)
        # Optimizers with state must find all of it, or the resumed run would silently differ.
        missing = set(self.server_optimizer.init(self.params)) - set(self.optimizer_state)
        if missing:
            raise ValueError(f"checkpoint lacks server optimizer state {sorted(missing)}")
