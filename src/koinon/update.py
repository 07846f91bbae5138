"""What local training hands back: a cohort's updates, before and after the wire.

`CohortResult` is the one update type of koinon. A runtime returns it for the clients it
trained; rows follow `client_ids`. Before the wire it holds the raw `deltas` (`[K, P]`) and the
algorithm's extra `uploads`; after the client side of the wire has encoded it (`koinon.wire`),
`payloads` holds each client's bytes, stream by stream, and `codec_states` the codec state each
client keeps (error feedback). A runtime that encodes where it trained (Ray actors) sends only
the bytes, so `deltas` is then None.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

State = dict[str, torch.Tensor]


@dataclass
class CohortResult:
    """What a cohort's local training produced (rows follow `client_ids`)."""

    client_ids: list[int]
    deltas: torch.Tensor | None  # [K, P] local model minus the model the client received
    uploads: dict[str, torch.Tensor]  # algorithm extras, each [K, P]
    num_samples: torch.Tensor  # [K] local dataset sizes (FedAvg weights)
    num_steps: torch.Tensor  # [K]
    train_loss: torch.Tensor  # [K] mean per-sample training loss over local training
    client_states: list[State]
    messages: list[bytes] | None = None  # payloads of algorithms with their own wire format
    payloads: list[list[bytes]] | None = None  # after the wire: [client][stream] bytes
    codec_states: list[dict[str, State]] | None = None  # after the wire: [client] stream -> state
    failed: dict[int, str] = field(default_factory=dict)  # client -> why it could not encode (no payloads)

    def to(self, device: torch.device) -> CohortResult:
        """The same result with its tensors on `device` (one transfer per tensor)."""
        def move(state: State) -> State:
            return {k: v.to(device) for k, v in state.items()}

        return CohortResult(
            self.client_ids, None if self.deltas is None else self.deltas.to(device), move(self.uploads),
            self.num_samples.to(device), self.num_steps.to(device), self.train_loss.to(device),
            [move(st) for st in self.client_states], self.messages, self.payloads, self.codec_states,
            dict(self.failed),
        )

    def take(self, rows: torch.Tensor) -> CohortResult:
        """The same result with its clients in the order `rows`."""
        order = rows.tolist()

        def pick(items: list | None) -> list | None:
            return None if items is None else [items[i] for i in order]

        def sel(t: torch.Tensor) -> torch.Tensor:
            # index_select: the same rows as `t[rows]`, several times faster on [K, P] stacks.
            return t.index_select(0, rows.to(t.device))

        return CohortResult(
            [self.client_ids[i] for i in order], None if self.deltas is None else sel(self.deltas),
            {k: sel(v) for k, v in self.uploads.items()}, sel(self.num_samples),
            sel(self.num_steps), sel(self.train_loss), [self.client_states[i] for i in order],
            pick(self.messages), pick(self.payloads), pick(self.codec_states), dict(self.failed),
        )

    @staticmethod
    def concat(parts: list[CohortResult]) -> CohortResult:
        if len(parts) == 1:
            return parts[0]
        keys = parts[0].uploads.keys()

        def joined(items: list[list | None]) -> list | None:
            return None if items[0] is None else [x for part in items for x in part or []]

        first = parts[0].deltas
        return CohortResult(
            [c for p in parts for c in p.client_ids],
            None if first is None else torch.cat([p.deltas for p in parts if p.deltas is not None]),
            {k: torch.cat([p.uploads[k] for p in parts]) for k in keys},
            torch.cat([p.num_samples for p in parts]),
            torch.cat([p.num_steps for p in parts]),
            torch.cat([p.train_loss for p in parts]),
            [s for p in parts for s in p.client_states],
            joined([p.messages for p in parts]),
            joined([p.payloads for p in parts]),
            joined([p.codec_states for p in parts]),
            {c: why for p in parts for c, why in p.failed.items()},
        )
