"""Codecs: how updates become bytes. Importing this package registers every codec."""

from koinon.compress import dense as _dense  # noqa: F401  (identity, fp16)
from koinon.compress import entropy as _entropy  # noqa: F401  (zstd)
from koinon.compress import quant as _quant  # noqa: F401  (bf16, int8, int4, qsgd)
from koinon.compress import sparse as _sparse  # noqa: F401  (topk, randomk, threshold)
from koinon.compress.base import CODECS, Codec, CodecState, build_codec

__all__ = ["CODECS", "Codec", "CodecState", "build_codec"]
