"""The wire, written once: what a sender encodes and what a receiver accepts.

Every topology and both deployment ends use these four pieces, so a byte that crosses a socket
in `koinon server` is the byte the simulation counted:

- `CohortEncoder` (sender side, pure): encodes a cohort's updates, stream by stream, with each
  client's own codec state and a generator seeded by (seed, round, client, stream). Runtimes call
  it where the work ran, so a Ray actor ships bytes, not `[K, P]` float stacks.
- `Sender` (sender side, stateful): keeps every client's codec state (error-feedback residuals)
  between rounds and hands a round's cohort its share; one serializer for checkpoints.
- `Receiver` (receiving side): decodes and validates (codec errors, shape, NaN/Inf: each a reason
  naming the client), adds the running sums of codecs that send increments (EF21, EControl).
- `Broadcast` (server to clients): the downlink codec with its server-side state, and, in delta
  mode, the history that lets a client that missed rounds catch up on the changes it missed, or
  get the full model when that is smaller.

Streams: the model update is stream 0 (`MODEL`), then the client algorithm's extra uploads in
their declared order; the stream index is part of the seed, so adding a stream never changes
another stream's bytes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from koinon.compress.base import Codec
from koinon.errors import CodecError, KoinonError
from koinon.seeding import generator
from koinon.update import CohortResult, State

Privatize = Callable[[torch.Tensor, list[int], int], torch.Tensor]
"""What clients release instead of their updates `[K, P]` (local DP), given their ids and the round."""

MODEL = "delta"  # the model stream's name (its values are the local model minus the received one)


class Rejected(KoinonError):
    """An update the receiver refuses; the message is the reason its sender is told."""


def encode_one(codec: Codec, tensor: torch.Tensor, state: State | None, seed: int, round_index: int,
               sender: int, salt: int) -> tuple[bytes, State]:
    """One payload: `tensor` encoded with the sender's state and its seeded generator."""
    gen = generator(seed, round_index, sender, salt)
    return codec.encode(tensor, state or codec.init_state(), gen)


@dataclass
class CohortEncoder:
    """A round's sender side for a cohort: pure, picklable, sliceable (a Ray actor gets its rows)."""

    codec: Codec
    seed: int
    round_index: int
    streams: tuple[str, ...]  # MODEL, then the algorithm's uploads
    states: list[dict[str, State]]  # per client (rows follow the cohort), stream -> codec state
    privatize: Privatize | None = None  # local DP: (updates, clients, round) -> what they release

    def rows(self, start: int, stop: int) -> CohortEncoder:
        return dataclasses.replace(self, states=self.states[start:stop])

    def encode(self, result: CohortResult) -> CohortResult:
        """`result` with `payloads` (`[client][stream]` bytes) and new `codec_states`; the float
        tensors are dropped: from here on only bytes travel."""
        k = len(result.client_ids)
        if self.privatize is not None and result.deltas is not None:
            result = dataclasses.replace(
                result, deltas=self.privatize(result.deltas, result.client_ids, self.round_index))
        codec_states: list[dict[str, State]] = [dict(s) for s in self.states]
        failed: dict[int, str] = {}
        if result.messages is not None:  # the algorithm's own wire format (SPSA's bytes)
            payloads = [[m] for m in result.messages]
        else:
            assert result.deltas is not None, "nothing to encode"
            stacks = [result.deltas, *(result.uploads[name] for name in self.streams[1:])]
            if hasattr(self.codec, "encode_batch"):
                # Stateless dense codecs encode the whole stack at once: the same bytes as row
                # by row, without K small conversions (they dominated rounds of 100 clients).
                columns = [self.codec.encode_batch(stack) for stack in stacks]
                payloads = [[column[i] for column in columns] for i in range(k)]
            else:
                payloads = []
                for i, client in enumerate(result.client_ids):
                    row: list[bytes] = []
                    try:
                        for s, (name, stack) in enumerate(zip(self.streams, stacks)):
                            payload, new_state = encode_one(self.codec, stack[i], codec_states[i].get(name),
                                                            self.seed, self.round_index, client, s)
                            if new_state:
                                codec_states[i][name] = new_state
                            row.append(payload)
                    except CodecError as exc:  # e.g. a diverged client's NaN: it sends nothing
                        failed[client] = str(exc)
                        row, codec_states[i] = [], dict(self.states[i])
                    payloads.append(row)
        return dataclasses.replace(result, deltas=None, uploads={}, payloads=payloads,
                                   codec_states=codec_states, failed=failed)


class Sender:
    """Every client's codec state between rounds (in a deployment: one client's own)."""

    def __init__(self, codec: Codec, seed: int, streams: tuple[str, ...]) -> None:
        self.codec = codec
        self.seed = seed
        self.streams = streams
        self.states: dict[int, dict[str, State]] = {}
        self.privatize: Privatize | None = None

    def for_cohort(self, cohort: list[int], round_index: int) -> CohortEncoder:
        return CohortEncoder(self.codec, self.seed, round_index, self.streams,
                             [self.states.get(c, {}) for c in cohort], self.privatize)

    def encode(self, client: int, tensor: torch.Tensor, round_index: int, salt: int,
               stream: str = MODEL) -> bytes:
        """One payload of `client` (a gossip or MoDeST peer encodes alone): `encode_one` with
        `salt` as the seed's last part; the client's new codec state is kept."""
        payload, state = encode_one(self.codec, tensor, self.states.get(client, {}).get(stream),
                                    self.seed, round_index, client, salt)
        if state:
            self.states.setdefault(client, {})[stream] = state
        return payload

    def forget(self, client: int) -> None:
        """`client` lost its state (a peer that crashed with its data)."""
        self.states.pop(client, None)

    def keep(self, result: CohortResult, clients: set[int] | None = None) -> None:
        """Take the new codec states (after `CohortEncoder.encode`) of `clients` (default: all):
        a client whose update was refused goes on with the state it had."""
        assert result.codec_states is not None
        for client, states in zip(result.client_ids, result.codec_states):
            if states and (clients is None or client in clients):
                self.states[client] = states

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{c}/{stream}/{k}": v for c, st in self.states.items()
                for stream, s in st.items() for k, v in s.items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.states = {}
        for key, v in tensors.items():
            c, stream, name = key.split("/", 2)
            self.states.setdefault(int(c), {}).setdefault(stream, {})[name] = v.clone()


OwnFormat = Callable[[bytes, int, int, int], torch.Tensor]  # (payload, client, round, steps) -> row


class Receiver:
    """Decodes and validates what senders send; keeps the sums of increment codecs."""

    def __init__(self, codec: Codec, numel: int, streams: tuple[str, ...],
                 own_format: OwnFormat | None = None,
                 check: Callable[[dict[str, torch.Tensor]], str] | None = None) -> None:
        self.codec = codec
        self.check = check  # an algorithm's check of one client's rows ('' accepts; `check_uploads`)
        self.numel = numel
        self.streams = streams
        self.own_format = own_format
        self.increments = bool(getattr(codec, "decodes_increment", False))
        self.sums: dict[tuple[int, str], torch.Tensor] = {}
        self.max_norm = 0.0  # largest L2 norm of a model update (0: no bound); see `bound_norm`

    def bound_norm(self, max_norm: float) -> None:
        """Refuse model updates whose L2 norm exceeds `max_norm` (0 lifts the bound): a
        validation rule against finite but huge updates (`deploy.max_update_norm`)."""
        if not max_norm >= 0:
            raise ValueError(f"max_update_norm must be >= 0, got {max_norm}")
        self.max_norm = float(max_norm)

    def decode(self, client: int, payloads: list[bytes], round_index: int = 0,
               num_steps: int = 0) -> dict[str, torch.Tensor]:
        """One client's rows, stream by stream, or `Rejected` with the reason. Pure: increment
        sums move only when the server keeps the update (`keep`)."""
        if len(payloads) != len(self.streams):
            raise Rejected(f"{len(payloads)} payloads, this run sends {len(self.streams)} "
                           f"({', '.join(self.streams)})")
        rows = {}
        for stream, payload in zip(self.streams, payloads):
            try:
                if self.own_format is not None:
                    row = self.own_format(payload, client, round_index, num_steps)
                else:
                    row = self.codec.decode(payload)
            except CodecError as exc:
                raise Rejected(f"undecodable {stream}: {exc}") from None
            if row.shape != (self.numel,):
                raise Rejected(f"{stream} has shape {tuple(row.shape)}, the model has ({self.numel},)")
            if self.increments:
                row = self.sums.get((client, stream), torch.zeros_like(row)) + row
            # The sum is finite only if every value is; the exact test only when it is not.
            if not bool(torch.isfinite(row.sum())) and not bool(torch.isfinite(row).all()):
                raise Rejected(f"{stream} holds NaN or Inf values")
            if self.max_norm and stream == MODEL:
                norm = float(row.double().norm())
                if norm > self.max_norm:
                    raise Rejected(f"{stream} has L2 norm {norm:.4g}, over the bound of {self.max_norm:g} "
                                   "(deploy.max_update_norm)")
            rows[stream] = row
        if self.check is not None and (why := self.check(rows)):
            raise Rejected(why)
        return rows

    def keep(self, client: int, rows: dict[str, torch.Tensor]) -> None:
        """The server kept `client`'s update: its increment sums move on."""
        if self.increments:
            for stream, row in rows.items():
                self.sums[(client, stream)] = row

    def forget(self, client: int) -> None:
        """`client` restarts from nothing: its increment sums go."""
        self.sums = {key: v for key, v in self.sums.items() if key[0] != client}

    def decode_cohort(self, cohort: list[int], result: CohortResult, round_index: int,
                      ) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[int, str]]:
        """Every client's rows as `[K, P]` stacks, which rows are valid, and why the others are not."""
        assert result.payloads is not None
        k = len(cohort)
        ok = torch.ones(k, dtype=torch.bool)
        reasons: dict[int, str] = {}
        if (self.own_format is None and not self.increments and not self.max_norm
                and hasattr(self.codec, "decode_batch")):
            stacks = {}
            for s, stream in enumerate(self.streams):
                stacks[stream], errors = self.codec.decode_batch([p[s] for p in result.payloads])
                for i, err in enumerate(errors):
                    if err is not None and ok[i]:
                        ok[i] = False
                        reasons[cohort[i]] = f"undecodable {stream}: {err}"
            for stream, stack in stacks.items():
                # A row's sum is finite when all its values are (the cheap test); rows whose sum
                # is not (NaN, Inf, or only an overflowing sum) get the exact test.
                suspect = ~torch.isfinite(stack.sum(dim=1))
                if suspect.any():
                    suspect[suspect.clone()] = ~torch.isfinite(stack[suspect]).all(dim=1)
                for i in (ok & suspect).nonzero().flatten().tolist():
                    reasons[cohort[i]] = f"{stream} holds NaN or Inf values"
                ok &= ~suspect
            return stacks, ok, reasons
        stacks = {stream: torch.zeros(k, self.numel) for stream in self.streams}
        for i, client in enumerate(cohort):
            try:
                rows = self.decode(client, result.payloads[i], round_index, int(result.num_steps[i]))
            except Rejected as exc:
                ok[i] = False
                reasons[client] = str(exc)
                continue
            self.keep(client, rows)
            for stream, row in rows.items():
                stacks[stream][i] = row
        return stacks, ok, reasons

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{c}/{stream}": v for (c, stream), v in self.sums.items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.sums = {}
        for key, v in tensors.items():
            c, stream = key.split("/", 1)
            self.sums[(int(c), stream)] = v.clone()


class Broadcast:
    """Server to clients: the global model (stream `MODEL`) and the algorithm's downloads.

    Full mode: each round the model is encoded once and every sampled client receives those
    bytes. Delta mode (`delta = True`): every client that is up to date holds `reference`; the
    server encodes the change of the model since then, and a client last served at round j
    receives the payloads of rounds j+1..r in order (it adds each decoded change to its own copy,
    reproducing `reference` exactly), or the full reference in float32 when that is smaller.
    """

    def __init__(self, codec: Codec, params: torch.Tensor, seed: int, num_clients: int,
                 downloads: tuple[str, ...], delta: bool) -> None:
        self.codec = codec
        self.seed = seed
        self.downloads = downloads
        self.delta = delta
        self.states: dict[str, State] = {}
        self.reference = params.clone()
        self.full_bytes = params.numel() * 4
        self.last_seen = torch.full((num_clients,), -1, dtype=torch.long)
        self.history: dict[int, bytes] = {}  # round -> change payload (delta mode, bounded)

    def _encode(self, name: str, tensor: torch.Tensor, round_index: int, stream: int) -> bytes:
        gen = generator(self.seed, round_index, -1, stream)
        payload, self.states[name] = self.codec.encode(tensor, self.states.get(name) or self.codec.init_state(), gen)
        return payload

    def open(self, round_index: int, params: torch.Tensor, server_state: State) -> list[tuple[str, bytes]]:
        """Encode round `round_index`'s broadcast (once per round): the model (or its change) and
        the downloads. In delta mode `reference` moves on by the decoded change."""
        if self.delta:
            payload = self._encode(MODEL, params - self.reference, round_index, 0)
            self.reference = self.reference + self.codec.decode(payload)
            self.history[round_index] = payload
            self._prune(round_index)
        else:
            payload = self._encode(MODEL, params, round_index, 0)
        out = [(MODEL, payload)]
        for i, name in enumerate(self.downloads, start=1):
            out.append((name, self._encode(name, server_state[name], round_index, i)))
        return out

    def _prune(self, round_index: int) -> None:
        """Keep only the changes a client could still be sent: older ones sum past a full model."""
        total = 0
        for r in sorted(self.history, reverse=True):
            total += len(self.history[r])
            if total > self.full_bytes and r < round_index:
                del self.history[r]

    def _missed(self, client: int, round_index: int) -> list[int] | None:
        """The rounds whose changes `client` lacks, or None when the full model is smaller (or it
        holds no model, or its changes are no longer kept); `client` is served up to `round_index`."""
        seen = int(self.last_seen[client])
        self.last_seen[client] = round_index
        if seen < 0 or seen > round_index:
            return None
        missed = list(range(seen + 1, round_index + 1))
        if not all(r in self.history for r in missed):
            return None
        return missed if sum(len(self.history[r]) for r in missed) <= self.full_bytes else None

    def model_payloads(self, client: int, round_index: int, payload: bytes) -> tuple[list[bytes], bool]:
        """What `client` receives for the model this round: ([payload], False) in full mode; in
        delta mode the changes it missed (none if it holds this round's model), or
        ([reference as float32], True) when that is smaller."""
        if not self.delta:
            return [payload], False
        missed = self._missed(client, round_index)
        if missed is None:
            return [self.reference.numpy().tobytes()], True
        return [self.history[r] for r in missed], False

    def bytes_for(self, client: int, round_index: int) -> int:
        """Model bytes `client` receives this round (delta mode), without building them."""
        missed = self._missed(client, round_index)
        return self.full_bytes if missed is None else sum(len(self.history[r]) for r in missed)

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"codec/{name}/{k}": v for name, st in self.states.items() for k, v in st.items()}
        if self.delta:
            out["reference"] = self.reference
            out["last_seen"] = self.last_seen
            out.update({f"history/{r}": torch.frombuffer(bytearray(p), dtype=torch.uint8)
                        for r, p in self.history.items()})
        return out

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.states, self.history = {}, {}
        for key, v in tensors.items():
            parts = key.split("/")
            if parts[0] == "codec":
                self.states.setdefault(parts[1], {})[parts[2]] = v.clone()
            elif parts[0] == "history":
                self.history[int(parts[1])] = v.numpy().tobytes()
            elif key == "reference":
                self.reference = v.clone()
            elif key == "last_seen":
                self.last_seen = v.clone()


def receive_model(codec: Codec, reference: torch.Tensor | None, payloads: list[bytes], full: bool,
                  numel: int) -> torch.Tensor:
    """Client side of `Broadcast`: the model a client starts from. `reference` is the client's
    copy from its last round (delta mode); changes are added in order, as the server did."""
    if full:
        data = payloads[0]
        if len(data) != numel * 4:
            raise Rejected(f"full model of {len(data)} bytes, expected {numel * 4}")
        return torch.frombuffer(bytearray(data), dtype=torch.float32).clone()
    if reference is None:
        if len(payloads) != 1:
            raise Rejected("a model change arrived for a client that holds no model")
        return codec.decode(payloads[0])
    model = reference
    for payload in payloads:
        model = model + codec.decode(payload)
    return model
