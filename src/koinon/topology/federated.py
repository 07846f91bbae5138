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
import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from koinon.aggregate import Aggregator, build_aggregator
from koinon.attacks import ATTACKS, Attack
from koinon.clients import CLIENT_ALGORITHMS, ClientAlgorithm, LocalTraining
from koinon.compress import CODECS, Codec
from koinon.data.checks import check_dataset, check_model
from koinon.data.federated import FederatedData
from koinon.errors import ConfigError
from koinon.local import CohortTrainer, cross_entropy, evaluate
from koinon.params import Layout
from koinon.personal import PersonalEvaluation, personal_downlinks, split_new_clients
from koinon.personal.labels import LabelSetting
from koinon.records import Callback, folder
from koinon.runtime import RUNTIMES, Runtime
from koinon.seeding import generator
from koinon.server import SAMPLERS, SERVER_OPTIMIZERS, Sampler, ServerOptimizer
from koinon.server.root import RootUpdate, reference_users, reserve_public, reserve_root
from koinon.topology.base import fit_rounds
from koinon.topology.evaluation import Evaluation, evaluate_clients, split_holdout
from koinon.topology.server import Adversary, FederatedServer, RoundResult
from koinon.update import CohortResult, State
from koinon.wire import Sender

if TYPE_CHECKING:
    from koinon.privacy import Privacy

__all__ = ["Evaluation", "Federation", "RoundResult", "check_aggregator", "component", "fit_rounds"]

Spec = str | dict[str, Any]
"""A component by registered name, or `{"name": ..., **options}` (options checked as a config's)."""


def _split_spec(value: dict[str, Any], section: str) -> tuple[str, dict[str, Any]]:
    options = dict(value)
    name = options.pop("name", None)
    if not isinstance(name, str):
        raise ConfigError(f"{section} = {value!r}: a component dict needs a 'name' (a registered "
                          f"name), e.g. {{'name': 'topk', 'ratio': 0.1}}")
    return name, options


def component(registry, value, section: str, required: tuple[str, ...] = (), **context):
    """A component given by registered name (built with defaults), by `{"name": ..., **options}`
    (built with those options, checked like a config section's), or as an object that has the
    `required` methods of its protocol."""
    if isinstance(value, str):
        return registry.build(value, {}, section, **context)
    if isinstance(value, dict):
        name, options = _split_spec(value, section)
        return registry.build(name, options, section, **context)
    return _checked_object(value, section, registry.family, required)


def _checked_object(value, section: str, family: str, required: tuple[str, ...]):
    missing = [m for m in required if not callable(getattr(value, m, None))]
    if missing:
        raise ConfigError(f"{section}: expected a registered name, a {{'name': ..., **options}} dict "
                          f"or a {family} object; {type(value).__name__} has no {missing[0]}()")
    return value


def check_aggregator(name: str, options: dict[str, Any], num_byzantine: int, clients_per_round: int) -> None:
    """Refuse now a rule whose assumption (e.g. Bulyan's n >= 4f + 3) a cohort of
    `clients_per_round` breaks: a throwaway instance aggregates a dummy cohort."""
    from koinon.server.root import reference_users

    probe = build_aggregator(name, options, num_byzantine)
    for part in reference_users(probe):  # FLTrust: any reference, only the cohort size is checked
        part.set_reference(torch.ones(2))
    try:
        probe.aggregate(torch.zeros(clients_per_round, 2), torch.ones(clients_per_round))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"aggregator.name = {name!r} with clients_per_round = {clients_per_round}: {exc}") from None


def _aggregator(value: Aggregator | Spec, byzantine_fraction: float, clients_per_round: int) -> Aggregator:
    """By name or dict, robust rules get f = the Byzantine clients of every cohort (what the
    attack settings imply) unless the dict sets `num_byzantine`, as the command line does."""
    if isinstance(value, (str, dict)):
        name, options = (value, {}) if isinstance(value, str) else _split_spec(value, "aggregator")
        f = options.pop("num_byzantine", round(byzantine_fraction * clients_per_round))
        if not isinstance(f, int) or isinstance(f, bool) or f < 0:
            raise ConfigError(f"aggregator.num_byzantine = {f!r}: expected an integer >= 0")
        check_aggregator(name, options, f, clients_per_round)
        return build_aggregator(name, options, f)
    return _checked_object(value, "aggregator", "aggregator", ("aggregate",))


class Federation:
    """A server, a population of simulated clients, and the runtime that trains them.

    Components come by registered name, as `{"name": ..., **options}`, or as objects; names and
    options are checked as strictly as a config file's, and the data and the model are checked
    against each other, all before round 1 (one-line `ConfigError` / `ValueError`).
    `privacy`: a `koinon.privacy.Privacy` (DP, secure aggregation; `koinon.privacy.build_privacy`
    builds one from a config's `[privacy]`), None for none.
    `labels`: a `koinon.personal.labels.LabelSetting` (unlabeled clients, unseen classes), None
    for every label known.

    >>> fed = Federation(model, data, local=LocalTraining(lr=0.05), clients_per_round=10,
    ...                  codec={"name": "topk", "ratio": 0.1})
    >>> fed.fit(30, out="runs/x", callbacks=[print], progress=True)
    >>> model(x_test)  # `model` now holds the trained global weights
    """

    def __init__(
        self,
        model: nn.Module,
        data: FederatedData,
        *,
        local: LocalTraining | dict[str, Any] | None = None,
        algorithm: ClientAlgorithm | Spec = "fedavg",
        server_optimizer: ServerOptimizer | Spec = "fedavg",
        sampler: Sampler | Spec = "uniform",
        codec: Codec | Spec = "identity",
        downlink: Codec | Spec = "identity",
        aggregator: Aggregator | Spec = "mean",
        runtime: Runtime | Spec = "inprocess",
        clients_per_round: int = 10,
        seed: int = 0,
        loss_fn=cross_entropy,
        attack: Attack | Spec | None = None,
        byzantine_fraction: float = 0.0,
        downlink_delta: bool = False,
        evaluation: Evaluation | None = None,
        privacy: Privacy | None = None,
        labels: LabelSetting | None = None,
        public_samples: int = 0,
    ) -> None:
        if not isinstance(data, FederatedData):
            raise TypeError(f"data must be a FederatedData (see koinon.partition_dataset), got {type(data).__name__}")
        # Clients kept out of training: the method's new-client procedure is scored on them.
        new_clients = None
        if evaluation is not None and evaluation.new_clients:
            data, held_out = split_new_clients(data, evaluation.new_clients, seed)
            assert held_out is not None
            new_clients = split_holdout(held_out, evaluation.holdout, seed + 1)
        if not 1 <= clients_per_round <= data.num_clients:
            raise ValueError(
                f"clients_per_round must be in [1, {data.num_clients}] (the number of clients), "
                f"got {clients_per_round}"
            )
        if not 0.0 <= byzantine_fraction < 1.0:
            raise ValueError(f"byzantine_fraction must be in [0, 1), got {byzantine_fraction}")
        if byzantine_fraction > 0 and attack in (None, "none"):
            raise ValueError("byzantine_fraction > 0 needs an attack (e.g. attack='sign_flip')")
        check_dataset(data.dataset)
        check_model(model, data.dataset, loss_fn, classification=loss_fn is cross_entropy)
        self.model = model
        self.evaluation = evaluation or Evaluation()
        aggregator = _aggregator(aggregator, byzantine_fraction, clients_per_round)
        self.local = LocalTraining(**local) if isinstance(local, dict) else (local or LocalTraining())
        self.layout = Layout.from_module(model)
        self.algorithm = component(CLIENT_ALGORITHMS, algorithm, "client.algorithm", ("begin", "end"), seed=seed,
                                   layout=self.layout)
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
        # The server's public data (`data.public_samples`): samples no client holds any more; an
        # algorithm that uses the server's model or them (FedConv's learnt kernels) gets both.
        self.public: torch.Tensor | None = None
        if public_samples:
            data, self.public = reserve_public(data, public_samples, seed)
        if hasattr(self.algorithm, "attach"):
            public = self.public
            self.algorithm.attach(model, self.layout, *((data.dataset.x_train[public], data.dataset.y_train[public])
                                                        if public is not None else ()))
        # Each client's held-out share (federated evaluation) never trains.
        self.holdout: list[torch.Tensor] = []
        if self.evaluation.holdout:
            data, self.holdout = split_holdout(data, self.evaluation.holdout, seed)
        self.attack = component(ATTACKS, attack or "none", "attack", ("forge",))
        # The Byzantine population: a fixed, seeded fraction of all clients.
        rng = np.random.default_rng([seed, 0xBAD])
        count = round(byzantine_fraction * data.num_clients)
        self.byzantine = {int(c) for c in rng.choice(data.num_clients, count, replace=False)}
        if self.byzantine:
            owned = torch.cat([data.client_indices[c] for c in sorted(self.byzantine)])
            poisoned = self.attack.poison_data(data.dataset, owned, generator(seed, 0xBAD))
            data = FederatedData(poisoned, data.client_indices)
        # Labels hidden from training: unlabeled clients, unseen classes (koinon.personal.labels).
        self.labels = labels if labels is not None and labels.active else None
        if self.labels is not None:
            data = self.labels.apply(data, seed)
        self.data = data
        self.codec = component(CODECS, codec, "codec", ("encode", "decode"), layout=self.layout)
        self.downlink = component(CODECS, downlink, "downlink", ("encode", "decode"), layout=self.layout)
        self.runtime = component(RUNTIMES, runtime, "runtime", ("setup", "train"))
        self.seed = seed
        self.loss_fn = loss_fn
        self.server = FederatedServer(
            self.layout.flatten(model), algorithm=self.algorithm,
            optimizer=component(SERVER_OPTIMIZERS, server_optimizer, "server.optimizer", ("init", "step")),
            sampler=component(SAMPLERS, sampler, "server.sampler", ("sample",)), aggregator=aggregator,
            codec=self.codec, downlink=self.downlink, sizes=data.sizes.numpy(),
            clients_per_round=clients_per_round, seed=seed, lr=self.local.lr,
            num_trainable=self.layout.num_trainable, downlink_delta=downlink_delta,
            adversary=Adversary(self.attack, self.byzantine, byzantine_fraction) if self.byzantine else None,
            root=self.root, privacy=privacy,
        )
        # The clients' side: their persistent algorithm state and their codec state.
        self.client_states: dict[int, State] = {}
        self.sender = Sender(self.codec, seed, self.server.streams)
        if privacy is not None and privacy.local is not None:
            self.sender.privatize = privacy.local.privatize  # noise on the client, before encoding
        trainer = CohortTrainer(model, self.layout, data, self.algorithm, self.local, loss_fn=loss_fn)
        self.runtime.setup(trainer)
        # Each client's personalized model on its held-out split (koinon.personal).
        self.personal = PersonalEvaluation(trainer, self.holdout, new_clients, seed) if self.holdout else None

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
        # A model made for one client (FedCAC's) goes to that client alone, its bytes counted.
        states, personal_bytes = personal_downlinks(self.algorithm, server.server_state, cohort,
                                                    [self.client_states.get(c, {}) for c in cohort],
                                                    self.downlink, self.seed, r)
        rnd.downlink_bytes += personal_bytes
        if not cohort:  # a Poisson cohort (central DP) may be empty: nothing trains, the noise is released
            out = server.close_round()
            if evaluate:
                self.evaluate_into(out)
            return out
        result = self.runtime.train(
            cohort, rnd.received, rnd.downloads, states, self.seed, r, self.sender.for_cohort(cohort, r),
        )
        if server.privacy is not None and server.privacy.secure is not None:
            self._secure_sum(result, r)
        else:
            server.accept_cohort(result)
        out = server.close_round()
        # A client whose update the server took keeps the states that go with it (codec state,
        # algorithm state), as a deployed client does on "accepted"; a refused one keeps its old.
        self.sender.keep(result, set(out.accepted))
        accepted = set(out.accepted)
        for i, c in enumerate(cohort):
            if c in accepted and result.client_states[i]:
                self.client_states[c] = result.client_states[i]
        if evaluate:
            self.evaluate_into(out)
        return out

    def _secure_sum(self, result: CohortResult, round_index: int) -> None:
        """The cohort sums its updates by SecAgg+: each client decodes its own payload (what it
        would have uploaded) and masks it; the server gets the sum (`koinon.privacy.secure`)."""
        privacy = self.server.privacy
        assert privacy is not None and privacy.secure is not None and result.payloads is not None
        ids = [c for c, p in zip(result.client_ids, result.payloads) if p]
        rows = [self.codec.decode(p[0]) for p in result.payloads if p]
        updates = torch.stack(rows) if rows else torch.zeros(0, self.layout.numel)
        samples = dict(zip(result.client_ids, result.num_samples.tolist()))
        secure = privacy.secure.run(ids, updates, [samples[c] for c in ids], round_index, privacy.client_clip())
        secure.rejected.update({c: f"could not encode its update ({why})" for c, why in result.failed.items()})
        self.server.accept_secure_sum(secure, samples, dict(zip(result.client_ids, result.train_loss.tolist())))

    def evaluate(self) -> tuple[float, float]:
        """(accuracy, loss) of the global model on the held-out test split."""
        ds = self.data.dataset
        return evaluate(self.model, self.layout, self.params, ds.x_test, ds.y_test, self.loss_fn)

    def evaluate_into(self, record: RoundResult) -> None:
        """Test accuracy and loss (an attack's own metrics, the clients' held-out metrics and
        the server-side `evaluate_fn`'s, when asked for) into a round's record."""
        record.test_accuracy, record.test_loss = self.evaluate()
        if self.byzantine and hasattr(self.attack, "metrics"):
            record.extra.update(self.attack.metrics(self.model, self.layout, self.params, self.data.dataset))
        ev = self.evaluation
        if self.holdout:
            clients = list(range(self.data.num_clients))
            if ev.clients and ev.clients < len(clients):
                rng = np.random.default_rng([self.seed, 0xE7A1, record.round])
                clients = sorted(int(c) for c in rng.choice(len(clients), ev.clients, replace=False))
            record.extra.update(evaluate_clients(self.model, self.layout, self.params, self.data,
                                                 self.holdout, clients, self.loss_fn))
        if self.personal is not None:
            record.extra.update(self.personal.metrics(self.params, self.server.server_state, self.client_states,
                                                      record.round))
        if self.labels is not None:
            record.extra.update(self.labels.metrics(self.model, self.layout, self.params, self.data.dataset))
        if ev.evaluate_fn is not None:
            self.layout.load_into(self.model, self.params)
            metrics = ev.evaluate_fn(self.model, record.round)
            if not isinstance(metrics, dict):
                raise TypeError(f"evaluate_fn must return a dict of metrics, got {type(metrics).__name__}")
            record.extra.update({str(k): float(v) for k, v in metrics.items()})

    def fit(
        self,
        rounds: int,
        eval_every: int = 1,
        *,
        callbacks: Iterable[Callback] = (),
        progress: bool = False,
        out: str | Path | None = None,
        checkpoint_every: int = 1,
        resume: bool = False,
        overwrite: bool = False,
    ) -> list[RoundResult]:
        """Run `rounds` more rounds, evaluating every `eval_every` rounds and after the last;
        each round's result goes to every callback as it finishes (a tqdm bar with `progress`).
        Afterwards the module given to the constructor holds the global weights.

        With `out`, the folder gets what `koinon run` writes (`federation.json` describing this
        federation, `metrics.jsonl`, checkpoints every `checkpoint_every` rounds,
        `model.safetensors`, `accuracy.png`, `summary.json`); `resume=True` continues the run
        in `out` from its checkpoint up to the round this call would have reached (build the
        federation as before and call `fit` with the same arguments), `overwrite=True`
        replaces it. Returns this call's results."""
        if rounds < 0:
            raise ValueError(f"need rounds >= 0, got {rounds}")
        if out is None:
            if resume or overwrite:
                raise ValueError("resume and overwrite need out= (a run folder)")
            results = fit_rounds(self, rounds, eval_every, callbacks, progress)
        else:
            results = self._fit_into(Path(out), rounds, eval_every, list(callbacks), progress,
                                     checkpoint_every, resume, overwrite)
        self.layout.load_into(self.model, self.params)
        return results

    def _fit_into(self, out: Path, rounds: int, eval_every: int, callbacks: list[Callback], progress: bool,
                  checkpoint_every: int, resume: bool, overwrite: bool) -> list[RoundResult]:
        import time

        until = self.round_index + rounds
        description = json.dumps(self.describe(), indent=1)
        wall = 0.0
        if resume:
            written = out / "federation.json"
            if not written.is_file():
                raise ConfigError(f"resume: {out} holds no federation.json, not a run of Federation.fit")
            if json.loads(written.read_text()) != json.loads(description):
                raise ConfigError(f"resume: {out} was written by a different federation "
                                  f"(compare {written} with Federation.describe())")
            wall = folder.restore(out, self, until, "rounds")
        else:
            folder.start(out, overwrite, ("federation.json", description))
        start = time.perf_counter()
        results = folder.run_rounds(self, until, eval_every, out=out, checkpoint_every=checkpoint_every,
                                    callbacks=callbacks, progress=progress, wall_offset=wall)
        folder.finish(self, out, wall + time.perf_counter() - start, title=self.title(), seed=self.seed)
        return results

    def save(self, path: str | Path) -> Path:
        """The global model as safetensors, keyed like the module's `state_dict`
        (`model.load_state_dict(safetensors.torch.load_file(path))` reads it)."""
        return folder.save_model(path, self.layout, self.params)

    def describe(self) -> dict[str, Any]:
        """What this federation is made of (written to `federation.json` by `fit(out=...)`)."""
        def name(obj: object) -> str:
            return str(getattr(obj, "name", type(obj).__name__))

        return {
            "topology": "federated", "model": type(self.model).__name__,
            "num_parameters": self.layout.numel, "layout_hash": self.layout.hash(),
            "dataset": self.data.dataset.name, "num_clients": self.data.num_clients,
            "clients_per_round": self.clients_per_round, "seed": self.seed,
            "algorithm": name(self.algorithm), "local": dataclasses.asdict(self.local) | {
                "lr_schedule": self.local.lr_schedule if isinstance(self.local.lr_schedule, str) else "callable"},
            "server_optimizer": name(self.server.optimizer), "sampler": name(self.server.sampler),
            "codec": name(self.codec), "downlink": name(self.downlink), "aggregator": name(self.aggregator),
            "attack": name(self.attack), "num_byzantine_clients": len(self.byzantine),
            "runtime": name(self.runtime), "holdout": self.evaluation.holdout,
        }

    def title(self) -> str:
        """What ran, for plots: algorithm, data, model, codecs, aggregator, attack, seed."""
        d = self.describe()
        parts = [f"federated {d['algorithm']}", f"{d['dataset']} ({d['num_clients']} clients)", d["model"],
                 f"codec {d['codec']}" + (f", down {d['downlink']}" if d["downlink"] != "identity" else "")]
        if d["aggregator"] != "mean":
            parts.append(f"aggregator {d['aggregator']}")
        if d["num_byzantine_clients"]:
            parts.append(f"attack {d['attack']} ({d['num_byzantine_clients']} clients)")
        return " / ".join(parts) + f" / seed {self.seed}"

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
