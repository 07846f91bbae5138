"""Codecs: how updates become bytes. Importing this package registers every codec.

Wrappers (`ef`, `ef21`, `econtrol`, `zstd`) take the wrapped codec as an `inner` option: an
inline table such as `inner = {name = "topk", ratio = 0.01, values = "int8"}` or a bare name.
"""

from koinon.compress import dense as _dense  # noqa: F401  (identity, fp16)
from koinon.compress import dgc as _dgc  # noqa: F401  (dgc)
from koinon.compress import entropy as _entropy  # noqa: F401  (zstd)
from koinon.compress import fedzip as _fedzip  # noqa: F401  (fedzip)
from koinon.compress import feedback as _feedback  # noqa: F401  (ef, ef21, econtrol)
from koinon.compress import lowrank as _lowrank  # noqa: F401  (powersgd)
from koinon.compress import quant as _quant  # noqa: F401  (bf16, int8, int4, qsgd)
from koinon.compress import sign as _sign  # noqa: F401  (signsgd)
from koinon.compress import sparse as _sparse  # noqa: F401  (topk, randomk, threshold)
from koinon.compress import spsa as _spsa  # noqa: F401  (spsa)
from koinon.compress.base import CODECS, Codec, CodecState, build_codec
from koinon.compress.sign import majority_vote

__all__ = ["CODECS", "Codec", "CodecState", "build_codec", "majority_vote"]
