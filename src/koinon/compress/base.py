"""The `Codec` interface: real bytes on the wire.

A codec turns a flat float32 tensor into `bytes` and back. Its state (error-feedback residuals,
momentum) belongs to the tensor's owner: the client for uplink, the server for downlink. The
runtime keeps one state per owner and saves it in checkpoints, so `encode` is pure:
`encode(x, state, rng) -> (bytes, new_state)`.

Payloads carry no framing of their own: the round number, layout hash and codec name travel in
the message around them, and the expected size comes from the layout the codec was built for.
`decode` must reject anything that does not fit that size with a `CodecError`; it never returns
garbage and never allocates more than the layout needs.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from koinon.errors import ConfigError
from koinon.params import Layout
from koinon.registry import Registry

CodecState = dict[str, torch.Tensor]


@runtime_checkable
class Codec(Protocol):
    """Encodes a flat float32 tensor of `layout.numel` elements to bytes and back."""

    name: str

    def init_state(self) -> CodecState:
        """Fresh per-owner state (empty for stateless codecs)."""
        ...

    def encode(
        self, x: torch.Tensor, state: CodecState, rng: torch.Generator
    ) -> tuple[bytes, CodecState]:
        """Bytes for `x` and the owner's next state."""
        ...

    def decode(self, data: bytes) -> torch.Tensor:
        """The float32 tensor the bytes describe; `CodecError` if they are malformed."""
        ...

    def max_bytes(self) -> int:
        """Upper bound on `len(encode(...)[0])`; `decode` refuses anything longer."""
        ...


CODECS: Registry[Codec] = Registry("codec")
"""Factories are called as `factory(layout=..., **options)`."""


def build_codec(name: str, options: dict, layout: Layout, section: str = "codec") -> Codec:
    return CODECS.build(name, options, section, layout=layout)


def build_inner(spec: dict | str | None, layout: Layout, section: str) -> Codec:
    """A wrapped codec from an inline table (`{name = "topk", ratio = 0.01}`) or a bare name.

    A wrapper has no default inner codec: what it sends (and how well the model trains) is
    whatever it wraps, so leaving `inner` out is an error rather than a silent choice."""
    if spec is None:
        raise ValueError(f"inner is not set (a wrapper has no default); allowed: a codec name "
                         f"({', '.join(CODECS.names())}) or a table such as "
                         f'inner = {{ name = "topk", ratio = 0.01 }}')
    if isinstance(spec, str):
        return build_codec(spec, {}, layout, section)
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ConfigError(f"{section}: expected a codec name or a table with a 'name' key")
    options = {k: v for k, v in spec.items() if k != "name"}
    return build_codec(spec["name"], options, layout, section)


def nest_state(prefix: str, state: CodecState) -> CodecState:
    """A wrapped codec's state under `prefix.` keys, so wrappers can stack in one flat dict."""
    return {f"{prefix}.{k}": v for k, v in state.items()}


def unnest_state(prefix: str, state: CodecState) -> CodecState:
    cut = len(prefix) + 1
    return {k[cut:]: v for k, v in state.items() if k.startswith(prefix + ".")}
