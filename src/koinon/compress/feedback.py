"""Error feedback around any biased codec: `ef`, `ef21`, `econtrol`.

The "sent" value is always `inner.decode(payload)`, i.e. exactly what the receiver will see, so
stochastic inner codecs and lossy value formats are accounted for and the bookkeeping is exact
(EF: sum of sent + residual == sum of inputs, up to float32 rounding).

`ef` is a drop-in for plain averaging: the receiver uses `decode` as the update. `ef21` and
`econtrol` instead send *increments* of a running estimate h_i of the owner's input: their
`decode` returns Delta_i and the receiver must keep sum_t Delta_i (per client, or their mean
over a cohort that always participates). They mark this with `decodes_increment = True`.
"""

from __future__ import annotations

import torch

from koinon.compress.base import CODECS, CodecState, build_inner, nest_state, unnest_state
from koinon.compress.wire import check_input
from koinon.params import Layout


class _Wrapper:
    name = "wrapper"
    decodes_increment = False
    own_keys: tuple[str, ...] = ()

    def __init__(self, layout: Layout, inner: dict | str | None) -> None:
        self.numel = layout.numel
        self.inner = build_inner(inner, layout, "codec.inner")

    def init_state(self) -> CodecState:
        own = {key: torch.zeros(self.numel) for key in self.own_keys}
        return own | nest_state("inner", self.inner.init_state())

    def _send(
        self, p: torch.Tensor, state: CodecState, rng: torch.Generator
    ) -> tuple[bytes, torch.Tensor, CodecState]:
        payload, inner_state = self.inner.encode(p, unnest_state("inner", state), rng)
        return payload, self.inner.decode(payload), nest_state("inner", inner_state)

    def decode(self, data: bytes) -> torch.Tensor:
        return self.inner.decode(data)

    def max_bytes(self) -> int:
        return self.inner.max_bytes()


@CODECS.register("ef")
class ErrorFeedback(_Wrapper):
    """Error feedback (EF14/EF-SGD) around any codec: send C(x + e), keep e <- x + e - C(x + e).

    Seide et al. 2014; Karimireddy et al. 2019, https://arxiv.org/abs/1901.09847.
    Option: `inner` (required: the wrapped codec, an inline table `{name = "topk", ratio = 0.01}`
    or a name).
    State: `error` (the residual e) plus the inner codec's state under `inner.`.
    """

    name = "ef"
    own_keys = ("error",)

    def __init__(self, layout: Layout, inner: dict | str | None = None) -> None:
        super().__init__(layout, inner)

    def encode(
        self, x: torch.Tensor, state: CodecState, rng: torch.Generator
    ) -> tuple[bytes, CodecState]:
        p = check_input(self.name, x, self.numel) + state["error"]
        payload, sent, inner_state = self._send(p, state, rng)
        return payload, {"error": p - sent} | inner_state


@CODECS.register("ef21")
class EF21(_Wrapper):
    """EF21: send Delta = C(x - h), keep h <- h + Delta; the receiver sums the Deltas.

    Richtarik et al. 2021, https://arxiv.org/abs/2106.05203. `decode` returns the increment
    Delta (see `decodes_increment`). Option: `inner` (required). State: `h` plus the inner state.
    """

    name = "ef21"
    decodes_increment = True
    own_keys = ("h",)

    def __init__(self, layout: Layout, inner: dict | str | None = None) -> None:
        super().__init__(layout, inner)

    def encode(
        self, x: torch.Tensor, state: CodecState, rng: torch.Generator
    ) -> tuple[bytes, CodecState]:
        x = check_input(self.name, x, self.numel)
        payload, delta, inner_state = self._send(x - state["h"], state, rng)
        return payload, {"h": state["h"] + delta} | inner_state


@CODECS.register("econtrol")
class EControl(_Wrapper):
    """EControl: Delta = C(eta * e + x - h); e <- e + x - h - Delta; h <- h + Delta.

    Gao, Islamov, Stich, ICLR 2024, https://arxiv.org/abs/2311.05645. With eta = 0 it is
    `ef21`. Options: `inner`, `eta` (error weight; theory suggests ~delta/400, tune it).
    `inner` is required. `decode` returns the increment Delta. State: `e`, `h` plus the inner state.
    """

    name = "econtrol"
    decodes_increment = True
    own_keys = ("e", "h")

    def __init__(self, layout: Layout, inner: dict | str | None = None, eta: float = 0.1) -> None:
        if eta < 0:
            raise ValueError(f"eta = {eta}: must be >= 0")
        super().__init__(layout, inner)
        self.eta = eta

    def encode(
        self, x: torch.Tensor, state: CodecState, rng: torch.Generator
    ) -> tuple[bytes, CodecState]:
        diff = check_input(self.name, x, self.numel) - state["h"]
        payload, delta, inner_state = self._send(self.eta * state["e"] + diff, state, rng)
        new = {"e": state["e"] + diff - delta, "h": state["h"] + delta}
        return payload, new | inner_state
