"""Exceptions with one-line messages that name what is wrong and what is allowed.

The CLI turns every `KoinonError` into a single line on stderr and exit code 2, so raise these
(never bare `ValueError`) for anything a user can get wrong.
"""

from __future__ import annotations


class KoinonError(Exception):
    """Base class of every error a user can cause."""


class ConfigError(KoinonError):
    """A configuration key, value or component name is not allowed."""


class CodecError(KoinonError):
    """Bytes that a codec cannot decode (truncated, oversized, inconsistent)."""

    def __init__(self, codec: str, problem: str) -> None:
        super().__init__(f"codec {codec!r}: {problem}")
        self.codec = codec
        self.problem = problem
