"""`koinon client`: joins a server with its own data, trains when sampled, survives restarts.

A client learns the run's configuration from the server (so it cannot drift from it), builds the
same components the simulation builds, and trains with the simulation's runtime and
`CohortTrainer`: batches are hashed from (seed, round, client index), uploads encoded by the
wire's `CohortEncoder` with (seed, round, client index, stream), so the bytes it sends are the
bytes the simulated client would produce. With a delta downlink it keeps the model it last
received and adds the changes it missed, as the simulated clients do.

Its codec state (error feedback) and algorithm state (e.g. SCAFFOLD's control variate) live in
`--state DIR`, keyed by round, and the server's acceptance decides which are current: before an
upload is sent, the states it leaves behind are written as *staged* (`staged.safetensors`, round
r); "accepted" promotes them (one `os.replace`), a refusal drops them, and when the answer was
lost (the client or the server was killed, the connection broke) the next poll's
`last_accepted_round` decides: r means the server holds the update, so the staged states become
current. A kill at any point therefore leaves the client with the states that match what the
server counted, as in the simulation.

Every call has a deadline; when the server is unreachable the client retries with exponential
backoff and jitter, and gives up after `give_up_s` without contact, saying why (the last error:
connection refused, TLS failure, ...). After a refused upload it also backs off before trying again.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import random
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch

from koinon.config import Config
from koinon.data.checks import check_fits, check_model
from koinon.data.datasets import Dataset
from koinon.data.federated import FederatedData
from koinon.deploy import federation_pb2_grpc
from koinon.deploy.certs import Credentials
from koinon.deploy.faults import crash_point
from koinon.deploy.labels import held_samples, own_data, own_labels, trained_samples
from koinon.deploy.personal import client_counts, evaluated_round, report, split_own
from koinon.deploy.wire import (
    MAX_GRPC_MESSAGE,
    PROTOCOL,
    Rejected,
    pb,
    poll_call,
    read_task,
    upload_call,
    upload_frames,
)
from koinon.errors import CodecError, KoinonError
from koinon.ledger.certsign import receipt_statement, sign_receipt
from koinon.topology.federated import Federation
from koinon.topology.server import digest
from koinon.update import State
from koinon.wire import MODEL, CohortEncoder, receive_model

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Server refusals that retrying cannot fix: the client stops with the server's reason.
_FATAL = {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
          grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS}


def log(name: str, message: str) -> None:
    print(f"[{name} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class DataSpec:
    """`partition:I` (partition I of the config's dataset) or `module:function` (your own)."""

    partition: int
    entry_point: str

    @staticmethod
    def parse(text: str) -> DataSpec:
        kind, _, rest = text.partition(":")
        if kind == "partition":
            if not rest.isdigit():
                raise KoinonError(f"--data {text}: expected partition:INDEX, e.g. partition:3")
            return DataSpec(int(rest), "")
        if kind and rest and all(part.isidentifier() for part in (kind.split(".") + [rest])):
            return DataSpec(-1, text)
        raise KoinonError(f"--data {text}: expected partition:INDEX or module:function "
                          "(a function returning a koinon Dataset)")

    def load(self) -> Dataset:
        module_name, func_name = self.entry_point.split(":")
        if os.getcwd() not in sys.path:  # `koinon client` run next to the user's data module
            sys.path.insert(0, os.getcwd())
        try:
            func: Callable[[], Any] = getattr(importlib.import_module(module_name), func_name)
        except (ImportError, AttributeError) as exc:
            raise KoinonError(f"--data {self.entry_point}: cannot import it ({exc})") from None
        dataset = func()
        if not isinstance(dataset, Dataset):
            raise KoinonError(f"--data {self.entry_point}: returned {type(dataset).__name__}, "
                              "expected koinon.data.Dataset (see Dataset.from_tensors)")
        return dataset


class ClientState:
    """`--state DIR`: codec and algorithm state, current and staged (see the module docstring)."""

    def __init__(self, folder: Path, layout_hash: str) -> None:
        self.folder = folder
        self.layout_hash = layout_hash
        self.path = folder / "state.safetensors"
        self.staged_path = folder / "staged.safetensors"
        self.codec: dict[str, State] = {}
        self.algorithm: State = {}
        self.last_round = -1  # round of the accepted upload the current states belong to
        self.staged_round = -1  # round of the staged states (-1: none)
        self.model: torch.Tensor | None = None  # delta downlink: the model of round `model_round`
        self.model_round = -1
        folder.mkdir(parents=True, exist_ok=True)
        current = self._read(self.path)
        if current is not None:  # else another model: the old residuals mean nothing for it
            self.last_round, self.codec, self.algorithm = current
        staged = self._read(self.staged_path)
        if staged is not None and staged[0] > self.last_round:
            self.staged_round = staged[0]
        model_path = folder / "model.safetensors"
        if current is not None and model_path.is_file():
            from safetensors.torch import load_file

            held = load_file(str(model_path))
            self.model, self.model_round = held["model"], int(held["round"])

    def _read(self, path: Path) -> tuple[int, dict[str, State], State] | None:
        """(round, codec states, algorithm state) of a state file of this model, or None."""
        from safetensors import safe_open

        if not path.is_file():
            return None
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("layout_hash") != self.layout_hash:
                return None
            codec: dict[str, State] = {}
            algorithm: State = {}
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                parts = key.split("/")
                if parts[0] == "codec":
                    codec.setdefault(parts[1], {})[parts[2]] = f.get_tensor(key)
                elif parts[0] == "algorithm":
                    algorithm[parts[1]] = f.get_tensor(key)
        return int(meta["round"]), codec, algorithm

    def hold_model(self, model: torch.Tensor, round_index: int) -> None:
        """Keep the model of `round_index` on disk (delta downlink catches up from it)."""
        from safetensors.torch import save_file

        tmp = self.folder / ".model.safetensors.tmp"
        save_file({"model": model.contiguous(), "round": torch.tensor(round_index)}, str(tmp))
        os.replace(tmp, self.folder / "model.safetensors")
        self.model, self.model_round = model, round_index

    def stage(self, round_index: int, codec_states: dict[str, State], client_state: State) -> None:
        """Write the states an upload of `round_index` leaves behind, before it is sent."""
        from safetensors.torch import save_file

        codec = {**self.codec, **{k: v for k, v in codec_states.items() if v}}
        algorithm = client_state or self.algorithm
        tensors = {f"codec/{s}/{k}": v.contiguous() for s, st in codec.items() for k, v in st.items()}
        tensors.update({f"algorithm/{k}": v.contiguous() for k, v in algorithm.items()})
        tmp = self.folder / ".staged.safetensors.tmp"
        save_file(tensors, str(tmp), metadata={"layout_hash": self.layout_hash, "round": str(round_index)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.staged_path)
        self.staged_round = round_index

    def settle(self, accepted_round: int) -> None:
        """The server's word on the staged upload: it holds the update of `accepted_round`
        (its last accepted one). The staged states become current if that is theirs, else go."""
        if self.staged_round < 0:
            return
        if accepted_round == self.staged_round:
            os.replace(self.staged_path, self.path)  # atomic: current is old or new, never half
            staged = self._read(self.path)
            assert staged is not None
            self.last_round, self.codec, self.algorithm = staged
        else:
            self.staged_path.unlink(missing_ok=True)
        self.staged_round = -1


def fits_model(dataset: Dataset, fed: Federation, entry_point: str) -> None:
    """Refuse, before joining, data the server's model cannot train on: samples of another shape
    or dtype, labels of classes the model has no output for (it would crash in round 1, with the
    server waiting out the round for its update)."""
    try:
        check_fits(dataset, fed.data.dataset)
        check_model(fed.model, dataset, fed.loss_fn)
    except ValueError as exc:
        raise KoinonError(f"--data {entry_point}: {exc}; not joining") from None


def refusal_backoff(refusals: int, rng: random.Random) -> float:
    """Seconds to wait after the `refusals`-th refusal in a row: 0.5 s doubling up to 30 s, with
    jitter, so clients whose uploads a server refuses do not retry in a tight loop."""
    return min(0.5 * 2 ** (refusals - 1), 30.0) * rng.uniform(0.5, 1.0)


class Worker:
    """The client's federation pieces, built from the server's config."""

    def __init__(self, cfg: Config, spec: DataSpec) -> None:
        from koinon.deploy.asynchronous import build_client_federation

        fed = build_client_federation(cfg)  # without [schedule]: the server decides when updates apply
        assert isinstance(fed, Federation)
        self.fed = fed
        self.spec = spec
        self.data: FederatedData = fed.data  # what it trains on (its own data once `bind` installs it)
        if spec.partition >= 0:
            if spec.partition >= fed.data.num_clients:
                raise KoinonError(f"--data partition:{spec.partition}: the server's config has "
                                  f"data.num_clients = {fed.data.num_clients}")
            self.num_samples = held_samples(fed.data, spec.partition)  # labeled or not (koinon.deploy.labels)
        else:
            self.dataset = spec.load()
            self.num_samples = len(self.dataset.y_train)
            weighs_declared = ("privacy.secagg" if cfg.privacy.secagg else
                               f"schedule.name = {cfg.schedule.name!r}" if cfg.schedule.name != "sync" else "")
            fits_model(own_labels(self.dataset, spec.entry_point, fed.algorithm, weighs_declared), fed,
                       spec.entry_point)
        self.bound = -1
        self.model_sha256 = ""  # of the model the last `train` started from
        self.signs_receipts = cfg.ledger.contribution != "none"  # a [ledger] run logs signed receipts
        self.refusals = 0  # uploads refused in a row (backoff)
        # Personal counts go with the uploads (under SecAgg+ no per-client figure leaves a client:
        # koinon.deploy.secure); a FedBuff / FedAsync task names the model version they score.
        self.eval_every = 0 if cfg.privacy.secagg else cfg.server.eval_every
        self.asynchronous = cfg.schedule.name != "sync"
        self.personal = (0, 0)  # (correct, total) of the personalized model the last task carried

    def bind(self, idx: int) -> None:
        """Train under global index `idx` (a custom dataset is installed as that client's data)."""
        if self.spec.partition >= 0 or idx == self.bound:
            return
        from koinon.local import CohortTrainer

        fed = self.fed
        # Other indices hold nothing; the server hands out indices after the config's partitions
        # in join order, so this list stays short. Samples labeled UNLABELED (-100) do not train.
        self.data = data = own_data(self.dataset, idx)
        fed.runtime.setup(CohortTrainer(fed.model, fed.layout, data, fed.algorithm, fed.local,
                                        loss_fn=fed.loss_fn))
        self.bound = idx

    def train(self, idx: int, round_index: int, payloads: list[bytes], streams: list[str],
              state: ClientState, own_count: int = 0, version: int = 0) -> tuple[list[bytes], dict[str, State], Any]:
        """The upload payloads of one round and the codec states they leave behind."""
        fed = self.fed
        numel = fed.layout.numel
        parts = list(zip(streams, payloads))
        model = [p for name, p in parts if name == "model" or name == MODEL or name.startswith(f"{MODEL}@")]
        names = [name for name, _ in parts[: len(model)]]
        try:
            if not model:  # delta downlink: it holds this round's model already
                if state.model is None or state.model_round != round_index:
                    raise Rejected(f"the task holds no model, and this client holds round "
                                   f"{state.model_round + 1}'s, not round {round_index + 1}'s")
                params = state.model
            else:
                reference = None
                if names[0].startswith(f"{MODEL}@"):  # delta downlink: the changes since the model held
                    first = int(names[0].split("@")[1])
                    if state.model is None or first != state.model_round + 1:
                        held = "no model" if state.model is None else f"the model of round {state.model_round + 1}"
                        raise Rejected(f"changes from round {first + 1} on for a client holding {held}")
                    reference = state.model
                params = receive_model(fed.downlink, reference, model, names[0] == "model", numel)
            # The last `own_count` streams are this client's alone (e.g. FedCAC's customized model):
            # they join its own state for this round, as the simulation's per-client downloads do.
            down, own = split_own([(name, fed.downlink.decode(p)) for name, p in parts[len(model):]], own_count)
        except CodecError as exc:  # the server's bytes do not decode: a bad answer, not a crash
            raise Rejected(f"undecodable task: {exc}") from None
        if params.shape != (numel,):
            raise Rejected(f"the server's model has {params.numel()} values, this model {numel}")
        if fed.server.broadcast.delta and model:
            state.hold_model(params, round_index)
        # What the receipt names as the model trained from (hashed before training touches anything).
        if self.signs_receipts:
            self.model_sha256 = hashlib.sha256(params.detach().float().contiguous().numpy().tobytes()).hexdigest()
        scored = version if self.asynchronous else round_index  # server steps done on the model received
        if self.spec.partition >= 0 and self.eval_every and evaluated_round(fed, scored, self.eval_every):
            self.personal = client_counts(fed, idx, params, down, {**state.algorithm, **own},
                                          scored)  # before training
        else:
            self.personal = (0, 0)
        encoder = CohortEncoder(fed.codec, fed.seed, round_index, fed.server.streams, [state.codec],
                                fed.sender.privatize)  # local DP: the noise is added here, on the client
        result = fed.runtime.train([idx], params, down, [{**state.algorithm, **own}], fed.seed, round_index, encoder)
        assert result.payloads is not None and result.codec_states is not None
        return result.payloads[0], result.codec_states[0], result


def _channel(server: str, creds: Credentials) -> grpc.Channel:
    tls = grpc.ssl_channel_credentials(root_certificates=creds.ca, private_key=creds.key,
                                       certificate_chain=creds.cert)
    return grpc.secure_channel(server, tls, options=[
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE),
        ("grpc.max_send_message_length", MAX_GRPC_MESSAGE),
        ("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ])


def run_client(server: str, creds: Credentials, name: str, spec: DataSpec, state_dir: Path,
               give_up_s: float = 120.0, call_timeout_s: float = 600.0, hooks: Hooks | None = None) -> int:
    """Serve the federation until it is done; 0 when it finished (or was told to stop), 1 when
    the server stayed away for `give_up_s`."""
    if not re.fullmatch(r".+:\d+", server):
        raise KoinonError(f"--server {server}: expected HOST:PORT, e.g. fl.example.org:7070")
    torch.set_num_threads(1)
    hooks = hooks or Hooks()
    backoff, last_contact = 0.5, time.monotonic()
    workers: list[Worker] = []  # built once, kept across reconnections
    while True:
        if hooks.stop is not None and hooks.stop.is_set():
            return 0
        channel = _channel(server, creds)
        stub = federation_pb2_grpc.FederationStub(channel)
        stub.Upload = upload_call(channel)  # sends pre-serialized data chunks (`upload_frames`)
        stub.Poll = poll_call(channel)  # reads data chunks without protobuf messages (`parse_task_chunk`)
        try:
            _session(stub, name, spec, state_dir, workers, call_timeout_s, hooks, receipt_key=creds.key,
                     channel=channel, creds=creds)
            return 0
        except grpc.RpcError as exc:
            code = exc.code()
            if code in _FATAL:
                raise KoinonError(f"server refused client {name}: {exc.details()}") from None
            if time.monotonic() - last_contact > give_up_s:
                hooks.log(name, f"giving up: server {server} unreachable for {give_up_s:.0f} s; last error: "
                          f"{_cause(exc)}")
                return 1
            hooks.log(name, f"server unavailable ({code.name}: {exc.details()}); retrying in {backoff:.1f} s")
            time.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, 10.0)
        except _Contact:
            backoff, last_contact = 0.5, time.monotonic()
            time.sleep(random.uniform(0.2, 0.5))
        finally:
            channel.close()


def _cause(exc: grpc.RpcError) -> str:
    """What the last failed call says, with a hint for the usual causes."""
    details = str(exc.details() or exc.code().name)
    if "refused" in details.lower():
        hint = "connection refused: is the server running, and is the port right?"
    elif any(w in details for w in ("SSL", "ssl", "handshake", "CERTIFICATE")):
        hint = ("TLS failed: is --certs the run's ca.crt with this client's certificate, and does the "
                "server's certificate name this host (koinon certs --hosts)?")
    elif "DNS" in details or "resolve" in details.lower():
        hint = "the server's host name does not resolve"
    else:
        hint = exc.code().name
    return f"{hint} ({details[:300]})"


@dataclass
class Hooks:
    """For programs that run many clients in one process (the load benchmark): `stop` makes the
    client leave at its next step (as if its process died), `on_upload(round, accepted, bytes,
    seconds)` reports every upload and the time its transfer took."""

    stop: threading.Event | None = None
    on_upload: Callable[[int, bool, int, float], None] | None = None
    verbose: bool = True

    def log(self, name: str, message: str) -> None:
        if self.verbose:
            log(name, message)


class _Contact(Exception):
    """Raised to the retry loop after a session that had reached the server ended."""


def _session(stub: Any, name: str, spec: DataSpec, state_dir: Path, workers: list[Worker],
             call_timeout_s: float, hooks: Hooks, receipt_key: bytes | None = None,
             channel: grpc.Channel | None = None, creds: Credentials | None = None) -> None:
    """One connection's life: join, then poll / train / upload until the run is done."""
    if not workers:
        probe = _join(stub, spec, None)
        built = Worker(Config.from_dict(tomllib.loads(probe.config_toml)), spec)
        if built.fed.layout.hash() != probe.layout_hash:
            raise KoinonError(f"this client's model (layout {built.fed.layout.hash()}) is not the "
                              f"server's ({probe.layout_hash}); the data shapes differ")
        workers.append(built)
    worker = workers[0]
    reply = _join(stub, spec, worker)
    if reply.layout_hash != worker.fed.layout.hash():
        raise KoinonError("the server now runs another model; restart this client")
    idx = int(reply.client_index)
    worker.bind(idx)
    state = ClientState(state_dir, reply.layout_hash)
    hooks.log(name, f"joined as index {idx} ({worker.num_samples} samples)")
    if state.staged_round >= 0:
        hooks.log(name, f"the upload of round {state.staged_round + 1} was sent or about to be; the server's "
                  "answer decides which states go on")
    if state.codec or state.algorithm:
        hooks.log(name, f"going on with the codec/algorithm (error-feedback) state of round {state.last_round + 1} "
                  f"from {state_dir}")
    max_stream = worker.fed.downlink.max_bytes()
    if worker.fed.server.broadcast.delta or worker.fed.personal is not None:  # the full float32 model (a client
        # that fell behind; the EVALUATE task after the last round)
        max_stream = max(max_stream, worker.fed.layout.numel * 4)
    try:
        while hooks.stop is None or not hooks.stop.is_set():
            header, payloads = read_task(
                # last_round: the round of the model this client holds (delta downlink starts there).
                stub.Poll(pb.PollRequest(client_index=idx, last_round=state.model_round), timeout=60.0),
                max_stream)
            state.settle(int(header.last_accepted_round))
            if header.status == pb.TaskHeader.DONE:
                hooks.log(name, "the run has finished")
                return
            if header.status == pb.TaskHeader.WAIT:
                continue
            if header.status == pb.TaskHeader.EVALUATE:  # after the last round: personal metrics
                report(stub, worker, idx, header, payloads, state, reply.layout_hash)
                continue
            if header.layout_hash != reply.layout_hash:
                raise Rejected("the server switched models; rejoining")
            _train_and_upload(stub, name, idx, int(header.round), payloads, list(header.streams),
                              worker, state, reply.layout_hash, call_timeout_s, hooks, receipt_key, channel, creds,
                              own_count=int(header.own), version=int(header.version))
    except Rejected as exc:
        hooks.log(name, f"bad answer from the server: {exc}")
        raise _Contact from None
    except grpc.RpcError as exc:
        if exc.code() in _FATAL:
            raise
        hooks.log(name, f"connection lost ({exc.code().name}: {exc.details()})")
        raise _Contact from None


def _join(stub: Any, spec: DataSpec, worker: Worker | None) -> Any:
    """Join the run; without a worker yet, only ask for the config (num_samples = 0 registers nothing)."""
    request = pb.JoinRequest(data_spec=spec.entry_point or f"partition:{spec.partition}",
                             partition=spec.partition, num_samples=worker.num_samples if worker else 0,
                             protocol=PROTOCOL)
    return stub.Join(request, timeout=30.0)


def _train_and_upload(stub: Any, name: str, idx: int, round_index: int, payloads: list[bytes],
                      streams: list[str], worker: Worker, state: ClientState, layout_hash: str,
                      call_timeout_s: float, hooks: Hooks, receipt_key: bytes | None = None,
                      channel: grpc.Channel | None = None, creds: Credentials | None = None,
                      own_count: int = 0, version: int = 0) -> None:
    start = time.perf_counter()
    uploads, codec_states, result = worker.train(idx, round_index, payloads, streams, state, own_count, version)
    if hooks.stop is not None and hooks.stop.is_set():
        return  # leaves mid-round, like a client that crashed before uploading
    if idx in result.failed:  # e.g. training diverged to NaN: nothing to send, states unchanged
        hooks.log(name, f"round {round_index + 1}: update not sent: {result.failed[idx]}")
        return
    fed = worker.fed
    if fed.server.privacy is not None and fed.server.privacy.secure is not None:
        if channel is None or creds is None:  # creds: its certificate key signs its protocol key
            raise KoinonError("privacy.secagg: this client needs its gRPC channel and credentials for the SecAgg+ steps")
        from koinon.deploy.secure import client_round  # SecAgg+: the update goes out masked

        client_round(channel, fed, name, idx, round_index, uploads, codec_states, result, worker.num_samples,
                     state, call_timeout_s, hooks.log, creds)
        return
    trained = trained_samples(worker.data, worker.num_samples, result)  # the update's weight
    header = pb.UploadHeader(
        round=round_index, layout_hash=layout_hash, codec=fed.codec.name,
        streams=list(fed.server.streams), sizes=[len(p) for p in uploads],
        num_samples=trained, num_steps=int(result.num_steps[0]),
        train_loss=float(result.train_loss[0]), client_index=idx,
        personal_correct=worker.personal[0], personal_total=worker.personal[1],
    )
    if receipt_key is not None and worker.signs_receipts:  # the receipt, signed with the TLS certificate key
        header.model_sha256 = worker.model_sha256
        header.receipt_signature = sign_receipt(receipt_key, receipt_statement(
            round_index + 1, worker.model_sha256, digest(uploads), trained))
    sent = time.perf_counter()
    # Written before sending: whatever happens next, `settle` makes the states match the server's.
    state.stage(round_index, codec_states, result.client_states[0])
    crash_point("client.staged", round_index)
    reply = stub.Upload(upload_frames(header, uploads), timeout=call_timeout_s)
    took = time.perf_counter() - start
    nbytes = sum(len(p) for p in uploads)
    if hooks.on_upload is not None:
        hooks.on_upload(round_index, bool(reply.accepted), nbytes, time.perf_counter() - sent)
    if reply.accepted:
        crash_point("client.accepted", round_index)
        state.settle(round_index)
        worker.refusals = 0
        hooks.log(name, f"round {round_index + 1}: update accepted ({nbytes} bytes, {took:.2f} s)")
    else:
        state.settle(-1)
        worker.refusals += 1
        wait = refusal_backoff(worker.refusals, random.Random())
        hooks.log(name, f"round {round_index + 1}: update rejected: {reply.reason} (retrying in {wait:.1f} s)")
        if hooks.stop is not None:
            hooks.stop.wait(wait)
        else:
            time.sleep(wait)
