"""`signsgd`: one bit per parameter plus one float32 scale per layout entry, with error feedback.

EF-SignSGD (Karimireddy et al. 2019, https://arxiv.org/abs/1901.09847): p = x + e,
Delta = (||p||_1 / d) sign(p) per layout entry, e <- p - Delta. Scaling by the mean magnitude
makes the decoded tensor usable by plain averaging. For signSGD with majority vote (Bernstein et
al. 2018, https://arxiv.org/abs/1802.04434) the server calls `majority_vote` on the payloads and
broadcasts the sign of the sum of the clients' signs.
"""

from __future__ import annotations

import numpy as np
import torch

from koinon.compress.base import CODECS, CodecState
from koinon.compress.wire import Reader, check_input, check_size, finite
from koinon.params import Layout


@CODECS.register("signsgd")
class SignSGD:
    """Scaled signs (1 bit per parameter, a float32 scale per layout entry), error feedback.

    Option: `error_feedback` (keep the residual e in the state under `error`; without it the
    codec is biased). Zeros are sent as +scale; the residual absorbs that.
    """

    name = "signsgd"

    def __init__(self, layout: Layout, error_feedback: bool = True) -> None:
        self.numel = layout.numel
        self.error_feedback = error_feedback
        self.sizes = torch.tensor([e.numel for e in layout.entries], dtype=torch.int64)
        self.num_entries = len(layout.entries)

    def init_state(self) -> CodecState:
        return {"error": torch.zeros(self.numel)} if self.error_feedback else {}

    def encode(
        self, x: torch.Tensor, state: CodecState, rng: torch.Generator
    ) -> tuple[bytes, CodecState]:
        p = check_input(self.name, x, self.numel)
        if self.error_feedback:
            p = p + state["error"]
        sums = torch.segment_reduce(p.abs(), "sum", lengths=self.sizes) if self.numel else p
        scales = (sums / self.sizes.clamp(min=1)).to(torch.float32)
        bits = np.packbits((p >= 0).numpy(), bitorder="little").tobytes()
        payload = scales.numpy().astype("<f4").tobytes() + bits
        if not self.error_feedback:
            return payload, state
        return payload, {"error": p - self.decode(payload)}

    def _parse(self, data: bytes) -> tuple[torch.Tensor, torch.Tensor]:
        check_size(self.name, data, self.max_bytes(), self.max_bytes())
        reader = Reader(self.name, data)
        scales = reader.scales("scales", self.num_entries)
        bits = np.unpackbits(reader.array("u1", reader.remaining), bitorder="little")
        if bits[self.numel :].any():
            raise reader.fail("nonzero padding bits")
        signs = torch.from_numpy(bits[: self.numel].astype(np.float32)) * 2 - 1
        return torch.from_numpy(scales.astype(np.float32)), signs

    def decode_signs(self, data: bytes) -> torch.Tensor:
        """The +-1 signs alone (what a majority vote counts)."""
        return self._parse(data)[1]

    def decode(self, data: bytes) -> torch.Tensor:
        scales, signs = self._parse(data)
        return finite(self.name, signs * torch.repeat_interleave(scales, self.sizes))

    def max_bytes(self) -> int:
        return 4 * self.num_entries + -(-self.numel // 8)


def majority_vote(codec: SignSGD, payloads: list[bytes]) -> torch.Tensor:
    """Server side of signSGD with majority vote: sign of the summed client signs (ties -> 0)."""
    if not payloads:
        raise ValueError("majority vote needs at least one payload")
    votes = torch.zeros(codec.numel)
    for data in payloads:  # one vectorized pass per client
        votes += codec.decode_signs(data)
    return torch.sign(votes)
