"""The malicious-server consistency check: clients sign the survivor list before revealing
shares; a server that shows clients different lists is caught and nothing more is revealed."""

from __future__ import annotations

import numpy as np

from koinon.privacy.secagg import FixedPoint, Identities, run_protocol
from koinon.privacy.secagg.messages import (
    CHECKS,
    HEADER,
    SERVER,
    SURVIVORS,
    UNMASK,
    Reader,
    seal,
    u32,
)
from koinon.privacy.secagg.protocol import MASK_KEY, SELF_MASK

FP = FixedPoint(32, 1.0, 1, 16)


def inputs(n: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(n)
    return {c: rng.integers(0, 1 << 32, 6, dtype=np.uint64).astype(np.uint32) for c in range(n)}


def total(xs: dict[int, np.ndarray], clients: list[int]) -> np.ndarray:
    out = np.zeros(6, dtype=np.uint32)
    for c in clients:
        out += xs[c]
    return out


def equivocating(ids: Identities, victim: int, target: int, consistency: bool):
    """A server that tells `victim` that `target` dropped (everyone else: it survived)."""

    def hook(step: str, replies: dict[int, bytes]) -> dict[int, bytes]:
        if step == "check":  # forward the victim the others' signatures (the honest server dropped it)
            signatures: dict[int, bytes] = {}
            for msg in replies.values():
                r = Reader(msg[HEADER.size:-64], "checks")
                for _ in range(r.u32()):
                    u, sig = r.u32(), r.take(64)
                    signatures[u] = sig
            body = u32(len(signatures)) + b"".join(u32(u) + sig for u, sig in sorted(signatures.items()))
            session = next(iter(replies.values()))[5:37]
            replies[victim] = seal(ids.server, CHECKS, session, SERVER, victim, body)
            return replies
        if step != "masked":
            return replies
        msg = replies[victim]
        session = msg[5:37]
        r = Reader(msg[HEADER.size:-64], "survivors")
        alive = [r.u32() for _ in range(r.u32())]
        gone = [r.u32() for _ in range(r.u32())]
        everyone = [r.u32() for _ in range(r.u32())] if consistency else []
        alive.remove(target)
        gone.append(target)
        body = u32(len(alive)) + b"".join(map(u32, alive)) + u32(len(gone)) + b"".join(map(u32, gone))
        if consistency:
            everyone.remove(target)
            body += u32(len(everyone)) + b"".join(map(u32, everyone))
        replies[victim] = seal(ids.server, SURVIVORS, session, SERVER, victim, body)
        return replies

    return hook


def revealed(transcript: list[tuple[str, int, bytes]], client: int) -> list[tuple[int, int]]:
    """(whose share, kind) that `client` revealed in its unmask message (empty: none sent)."""
    for step, c, msg in transcript:
        if step == "unmask" and c == client:
            assert msg[4] == UNMASK
            r = Reader(msg[HEADER.size:-64], "unmask")
            out = []
            for _ in range(r.u32()):
                u, kind = r.u32(), r.u8()
                r.take(66)
                out.append((u, kind))
            return out
    return []


def test_consistency_check_keeps_the_exact_sum_with_dropouts() -> None:
    xs = inputs(8)
    result = run_protocol(xs, FP, degree=6, consistency=True, drop={"masked": {2}, "check": {5}})
    assert result.error == ""
    survivors = [c for c in range(8) if c != 2]
    assert result.survivors == survivors
    assert np.array_equal(result.total, total(xs, survivors))


def test_an_equivocating_server_is_detected_before_anything_is_revealed() -> None:
    xs = inputs(5)
    ids = Identities()
    seen: list[tuple[str, int, bytes]] = []
    result = run_protocol(xs, FP, degree=4, identities=ids, consistency=True, transcript=seen,
                          server_hook=equivocating(ids, victim=0, target=1, consistency=True))
    # The server's own check dropped the victim's signature; the malicious one forwarded the
    # victim the others' signatures anyway, and the victim, which had signed its list, aborted on
    # them: no share of client 1's mask key went out.
    assert any(step == "check" and c == 0 for step, c, _ in seen)
    assert "another survivor list" in result.rejected[0]
    assert revealed(seen, 0) == []
    # The honest clients agree on one list (the server's own) and still sum everyone exactly.
    assert result.error == "" and result.survivors == [0, 1, 2, 3, 4]
    assert np.array_equal(result.total, total(xs, [0, 1, 2, 3, 4]))


def test_without_the_check_the_same_server_gets_a_mask_key_share() -> None:
    ids = Identities()
    seen: list[tuple[str, int, bytes]] = []
    run_protocol(inputs(5), FP, degree=4, identities=ids, transcript=seen,
                 server_hook=equivocating(ids, victim=0, target=1, consistency=False))
    assert (1, MASK_KEY) in revealed(seen, 0)  # the victim believed client 1 dropped
    assert (1, SELF_MASK) in revealed(seen, 2)  # ... while the others revealed its self-mask seed
