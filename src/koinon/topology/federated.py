"""Server-based federated learning in simulation: the server state machine driven by a runtime.

One round: the server samples a cohort and encodes the broadcast (`FederatedServer.open_round`);
the runtime trains the cohort and encodes each client's update with its own codec state where
the work ran (`koinon.wire.CohortEncoder`: error feedback stays with the client, Ray actors ship
bytes); the server decodes, validates, aggregates and steps (`accept_cohort`, `close_round`).
The gRPC deployment (`koinon.deploy.server`) steps the same server object, so both give the
same model. Bytes are the lengths of the real payloads.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from koinon.aggregate import Aggregator, build_aggregator
from koinon.attacks import ATTACKS, Attack
from koinon.clients import CLIENT_ALGORITHMS, ClientAlgorithm, LocalTraining
from koinon.compress import CODECS, Codec
from koinon.data.federated import FederatedData
from koinon.local import CohortTrainer, cross_entropy, evaluate
from koinon.params import Layout
from koinon.runtime import RUNTIMES, Runtime
from koinon.seeding import generator
from koinon.server import SAMPLERS, SERVER_OPTIMIZERS, Sampler, ServerOptimizer
from koinon.server.root import RootUpdate, reference_users, reserve_root
from koinon.topology.base import fit_rounds
from koinon.topology.server import Adversary, FederatedServer, RoundResult
from koinon.update import State
from koinon.wire import Sender

__all__ = ["Federation", "RoundResult", "component", "fit_rounds"]


def component(registry, value, section: str, **context):
    """A component given by registered name (built with defaults) or as an object."""
    return registry.build(value, {}, section, **context) if isinstance(value, str) else value


class Federation:
    """A server, a population of simulated clients, and the runtime that trains them.

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
        aggregator = build_aggregator(aggregator) if isinstance(aggregator, str) else aggregator
        self.local = local or LocalTraining()
        self.algorithm = component(CLIENT_ALGORITHMS, algorithm, "client.algorithm")
        self.layout = Layout.from_module(model)
        # FLTrust and the like: the server sets its clean root dataset aside before anything
        # else (so no client, honest or Byzantine, owns those samples) and trains on it itself.
        users = reference_users(aggregator)
        self.root: RootUpdate | None = None
        if users:
            user = users[-1]
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
        if self.byzantine:
            owned = torch.cat([data.client_indices[c] for c in sorted(self.byzantine)])
            poisoned = self.attack.poison_data(data.dataset, owned, generator(seed, 0xBAD))
            data = FederatedData(poisoned, data.client_indices)
        self.data = data
        self.codec = component(CODECS, codec, "codec", layout=self.layout)
        self.downlink = component(CODECS, downlink, "downlink", layout=self.layout)
        self.runtime = component(RUNTIMES, runtime, "runtime")
        self.seed = seed
        self.loss_fn = loss_fn
        self.server = FederatedServer(
            self.layout.flatten(model), algorithm=self.algorithm,
            optimizer=component(SERVER_OPTIMIZERS, server_optimizer, "server.optimizer"),
            sampler=component(SAMPLERS, sampler, "server.sampler"), aggregator=aggregator,
            codec=self.codec, downlink=self.downlink, sizes=data.sizes.numpy(),
            clients_per_round=clients_per_round, seed=seed, lr=self.local.lr,
            num_trainable=self.layout.num_trainable, downlink_delta=downlink_delta,
            adversary=Adversary(self.attack, self.byzantine, byzantine_fraction) if self.byzantine else None,
            root=self.root,
        )
        # The clients' side: their persistent algorithm state and their codec state.
        self.client_states: dict[int, State] = {}
        self.sender = Sender(self.codec, seed, self.server.streams)
        self.runtime.setup(
            CohortTrainer(model, self.layout, data, self.algorithm, self.local, loss_fn=loss_fn)
        )

    # ----------------------------------------------------------- server view

    @property
    def params(self) -> torch.Tensor:
        return self.server.params

    @property
    def aggregator(self) -> Aggregator:
        return self.server.aggregator

    @property
    def clients_per_round(self) -> int:
        return self.server.clients_per_round

    @property
    def round_index(self) -> int:
        return self.server.round_index

    @round_index.setter
    def round_index(self, value: int) -> None:
        self.server.round_index = value

    @property
    def uplink_total(self) -> int:
        return self.server.uplink_total

    @uplink_total.setter
    def uplink_total(self, value: int) -> None:
        self.server.uplink_total = value

    @property
    def downlink_total(self) -> int:
        return self.server.downlink_total

    @downlink_total.setter
    def downlink_total(self, value: int) -> None:
        self.server.downlink_total = value

    def sample_cohort(self, round_index: int) -> list[int]:
        """The round's clients (every client is available in simulation)."""
        return self.server.sample(round_index)

    # ------------------------------------------------------------------ round

    def run_round(self, evaluate: bool = True) -> RoundResult:
        server = self.server
        r = server.round_index
        cohort = server.sample(r)
        rnd = server.open_round(r, cohort)
        # Every sampled client receives the broadcast; in delta mode what each one missed.
        if server.broadcast.delta:
            rnd.downlink_bytes = sum(server.broadcast.bytes_for(c, r) for c in cohort)
        else:
            rnd.downlink_bytes = len(rnd.payloads[0][1]) * len(cohort)
        rnd.downlink_bytes += sum(len(p) for _, p in rnd.payloads[1:]) * len(cohort)
        result = self.runtime.train(
            cohort, rnd.received, rnd.downloads, [self.client_states.get(c, {}) for c in cohort],
            self.seed, r, self.sender.for_cohort(cohort, r),
        )
        self.sender.keep(result)
        server.accept_cohort(result)
        out = server.close_round()
        included = set(out.included)
        for i, c in enumerate(cohort):
            if c in included and result.client_states[i]:
                self.client_states[c] = result.client_states[i]
        if evaluate:
            self.evaluate_into(out)
        return out

    def evaluate(self) -> tuple[float, float]:
        """(accuracy, loss) of the global model on the held-out test split."""
        ds = self.data.dataset
        return evaluate(self.model, self.layout, self.params, ds.x_test, ds.y_test, self.loss_fn)

    def evaluate_into(self, record: RoundResult) -> None:
        """Test accuracy and loss (and an attack's own metrics) into a round's record."""
        record.test_accuracy, record.test_loss = self.evaluate()
        if self.byzantine and hasattr(self.attack, "metrics"):
            record.extra.update(self.attack.metrics(self.model, self.layout, self.params, self.data.dataset))

    def fit(self, rounds: int, eval_every: int = 1) -> list[RoundResult]:
        """Run `rounds` more rounds, evaluating every `eval_every` rounds and after the last."""
        return fit_rounds(self, rounds, eval_every)

    def close(self) -> None:
        self.runtime.close()

    # ------------------------------------------------------------- checkpoint

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor needed to continue exactly where this federation stands: the server's
        state, and the clients' (their algorithm state and their codec state)."""
        out = {f"server/{k}": v for k, v in self.server.state_dict().items()}
        for c, st in self.client_states.items():
            out.update({f"client/{c}/{k}": v.detach().contiguous() for k, v in st.items()})
        out.update({f"codec/{k}": v.detach().contiguous() for k, v in self.sender.state_dict().items()})
        return out

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.server.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("server/")})
        self.client_states = {}
        for key, v in tensors.items():
            parts = key.split("/")
            if parts[0] == "client":
                self.client_states.setdefault(int(parts[1]), {})[parts[2]] = v.clone()
        self.sender.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("codec/")})
