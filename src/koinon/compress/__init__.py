"""Codecs: how updates become bytes. Importing this package registers every codec."""

from koinon.compress import dense as _dense  # noqa: F401  (registers identity, fp16)
from koinon.compress.base import CODECS, Codec, CodecState, build_codec

__all__ = ["CODECS", "Codec", "CodecState", "build_codec"]
