"""Dense codecs: `identity` (float32) and `fp16`, the baselines every other codec is measured by."""

from __future__ import annotations

import numpy as np
import torch

from koinon.compress.base import CODECS, CodecState
from koinon.errors import CodecError
from koinon.params import Layout


class _DenseCodec:
    """Little-endian array of `numel` values of one dtype, nothing else."""

    name = "dense"
    np_dtype: np.dtype = np.dtype("<f4")

    def __init__(self, layout: Layout) -> None:
        self.numel = layout.numel

    def init_state(self) -> CodecState:
        return {}

    def encode(
        self, x: torch.Tensor, state: CodecState, rng: torch.Generator
    ) -> tuple[bytes, CodecState]:
        if x.numel() != self.numel:
            raise CodecError(self.name, f"encode got {x.numel()} elements, layout has {self.numel}")
        arr = x.detach().reshape(-1).to(torch.float32).numpy().astype(self.np_dtype, copy=False)
        return arr.tobytes(), state

    def decode(self, data: bytes) -> torch.Tensor:
        expected = self.numel * self.np_dtype.itemsize
        if len(data) != expected:
            raise CodecError(
                self.name, f"payload is {len(data)} bytes, expected exactly {expected}"
            )
        raw = np.frombuffer(data, dtype=self.np_dtype)
        # A writable buffer (a received `bytearray`, owned by nobody else) is decoded in place
        # when it already holds float32: no second copy of a large model. Immutable `bytes` are
        # copied, as torch tensors must be writable.
        arr = raw.astype(np.float32, copy=not raw.flags.writeable)
        # The sum is finite only if every value is (NaN and Inf propagate); it needs no temporary
        # array. A sum that overflows gets the exact test.
        if not np.isfinite(arr.sum(dtype=np.float64)) and not np.isfinite(arr).all():
            raise CodecError(self.name, "payload holds NaN or Inf values")
        return torch.from_numpy(arr)

    def max_bytes(self) -> int:
        return self.numel * self.np_dtype.itemsize

    # A cohort's payloads at once: the same bytes as `encode`/`decode` row by row, in one
    # conversion instead of K (the per-call overhead dominated rounds of 100 small clients).
    def encode_batch(self, stack: torch.Tensor) -> list[bytes]:
        """`encode(row)` for every row of `[K, numel]` (dense codecs need no state or rng)."""
        if stack.dim() != 2 or stack.shape[1] != self.numel:
            raise CodecError(self.name, f"encode got shape {tuple(stack.shape)}, layout has {self.numel}")
        self._check_range(stack)
        arr = stack.detach().to(torch.float32).numpy().astype(self.np_dtype, copy=False)
        return [r.tobytes() for r in arr]

    def decode_batch(self, payloads: list[bytes]) -> tuple[torch.Tensor, list[str | None]]:
        """`decode` of every payload into one `[K, numel]` stack; a malformed payload leaves a
        zero row and its `CodecError` message in the second list (None where it decoded).
        Non-finite values are left for the caller's one check over the stack."""
        expected = self.numel * self.np_dtype.itemsize
        errors: list[str | None] = [
            None if len(d) == expected
            else str(CodecError(self.name, f"payload is {len(d)} bytes, expected exactly {expected}"))
            for d in payloads
        ]
        arr = np.empty((len(payloads), self.numel), dtype=np.float32)  # every row is written once
        for i, (d, e) in enumerate(zip(payloads, errors)):
            arr[i] = np.frombuffer(d, dtype=self.np_dtype) if e is None else 0.0
        return torch.from_numpy(arr), errors

    def _check_range(self, x: torch.Tensor) -> None:
        """Refuse values the format cannot hold (nothing to refuse for float32)."""


@CODECS.register("identity")
class Identity(_DenseCodec):
    """Uncompressed float32 (4 bytes per parameter): the reference for compression ratios."""

    name = "identity"
    np_dtype = np.dtype("<f4")


@CODECS.register("fp16")
class FP16(_DenseCodec):
    """IEEE half precision (2 bytes per parameter); values beyond +-65504 are rejected."""

    name = "fp16"
    np_dtype = np.dtype("<f2")

    def encode(
        self, x: torch.Tensor, state: CodecState, rng: torch.Generator
    ) -> tuple[bytes, CodecState]:
        self._check_range(x)
        return super().encode(x, state, rng)

    def _check_range(self, x: torch.Tensor) -> None:
        if x.abs().max().item() > 65504.0 if x.numel() else False:
            raise CodecError(self.name, "value exceeds the float16 range (|x| > 65504)")
