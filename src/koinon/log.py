"""One-line messages to the user on stderr (fallbacks, rejections, resumptions)."""

from __future__ import annotations

import sys


def notice(message: str) -> None:
    """One-line message to the user on stderr."""
    print(f"koinon: {message}", file=sys.stderr, flush=True)
