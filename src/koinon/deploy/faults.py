"""Kill points for the fault tests: `KOINON_CRASH_AT=NAME` or `NAME@ROUND` ends the process there.

A test that must kill a server or client between two particular steps (after a commit, before
its clean-up; after the server accepted an upload, before the client saved what goes with it)
cannot find that moment by sleeping. The code calls `crash_point(name, round)` at each such
place; when the environment names it, the process exits at once with `CRASH_EXIT`, as SIGKILL
would leave it: no handler, no flush, no clean-up. Unset (always, outside tests) it does nothing.
"""

from __future__ import annotations

import os
import sys

CRASH_EXIT = 86

POINTS = {
    "server.committed": "after a round's commit transaction, before old checkpoints and pending files go",
    "client.staged": "after the client wrote the states of its upload, before sending it",
    "client.accepted": "after the server answered 'accepted', before the client made those states current",
    "client.secagg_masked": "after the server answered the client's masked input, before it unmasks (SecAgg+)",
}


def crash_point(name: str, round_index: int) -> None:
    """Exit now if `KOINON_CRASH_AT` names this point (optionally `@round_index`)."""
    wanted = os.environ.get("KOINON_CRASH_AT")
    if wanted and wanted in (name, f"{name}@{round_index}"):
        print(f"KOINON_CRASH_AT={wanted}: exiting at {name} (round {round_index})", file=sys.stderr, flush=True)
        os._exit(CRASH_EXIT)
