"""SecAgg+: exact sums under dropouts at every step, refused tampering and replay, masked
messages independent of the input, never both secrets of one client revealed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.stats import chi2_contingency

from koinon.privacy.secagg import (
    STEPS,
    FixedPoint,
    Identities,
    default_degree,
    harary_graph,
    run_protocol,
    shamir,
)
from koinon.privacy.secagg.messages import (
    ADVERTISE,
    MASKED,
    NEIGHBOURS,
    SERVER,
    SHARES_FOR,
    SURVIVORS,
    UNMASK,
    ProtocolError,
    Reader,
    seal,
)
from koinon.privacy.secagg.protocol import (
    MASK_KEY,
    SELF_MASK,
    SecAggClient,
    SecAggServer,
    new_session,
)


def plain_sum(inputs: dict[int, np.ndarray], clients: list[int], fp: FixedPoint) -> np.ndarray:
    total = np.zeros_like(next(iter(inputs.values())))
    for c in clients:
        total += inputs[c]
    return total & fp.dtype(fp.mask)


def random_inputs(n: int, length: int, fp: FixedPoint, seed: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {c: rng.integers(0, 1 << fp.modulus_bits, length, dtype=np.uint64).astype(fp.dtype)
            for c in range(n)}


def test_shamir_any_threshold_subset_reconstructs_and_fewer_do_not() -> None:
    secret = bytes(range(32))
    shares = shamir.split(secret, 3, [1, 2, 3, 4, 5])
    assert shamir.reconstruct({x: shares[x] for x in (1, 3, 5)}, 3) == secret
    assert shamir.reconstruct({x: shares[x] for x in (2, 4, 5)}, 3) == secret
    with pytest.raises(ValueError, match="3 needed"):
        shamir.reconstruct({1: shares[1], 2: shares[2]}, 3)
    # Two shares and a made-up third give some other value, never the secret.
    fake = dict(shares)
    fake[3] = (int.from_bytes(fake[3], "big") ^ 1).to_bytes(shamir.SHARE_BYTES, "big")
    try:
        assert shamir.reconstruct({x: fake[x] for x in (1, 2, 3)}, 3) != secret
    except ValueError:
        pass  # out of the 32-byte range: refused


def test_fixed_point_round_trip_and_no_overflow_at_the_bounds() -> None:
    fp = FixedPoint(32, 2.0, 7, 5)
    x = torch.tensor([2.0, -2.0, 0.5, -0.3, 5.0])  # 5.0 is clipped to 2.0
    words = [fp.encode(x, 7, 1, torch.Generator().manual_seed(i)) for i in range(5)]
    total = words[0].copy()
    for w in words[1:]:
        total += w
    values, weight, count = fp.decode_sum(total, 5)
    assert (weight, count) == (35, 5)
    expected = torch.tensor([2.0, -2.0, 0.5, -0.3, 2.0], dtype=torch.float64) * 35
    assert torch.allclose(values, expected, atol=35 * 5 / fp.scale)
    # The extreme inputs of the largest cohort do not wrap.
    assert values[0] > 0 and values[1] < 0
    with pytest.raises(ValueError, match="too small"):
        FixedPoint(16, 8.0, 1000, 100)
    with pytest.raises(ValueError, match="at most 5"):
        fp.decode_sum(total, 6)


def test_stochastic_rounding_is_unbiased() -> None:
    fp = FixedPoint(16, 1.0, 1, 10)
    x = torch.full((20000,), 0.3 / fp.scale + 1e-9)  # 0.3 of a quantization step
    q = fp.centred(fp.encode(x, 1, 0, torch.Generator().manual_seed(0)))[:-2]
    assert abs(q.mean() - 0.3) < 0.02


def test_harary_graph_degree_and_symmetry() -> None:
    clients = list(range(40))
    graph = harary_graph(clients, 8)
    assert all(len(v) == 8 for v in graph.values())
    assert all(u in graph[v] for u in clients for v in graph[u])
    assert harary_graph([1, 2, 3], 8) == {1: [2, 3], 2: [1, 3], 3: [1, 2]}
    assert default_degree(1000) == 60 and default_degree(100) == 40 and default_degree(10) == 9
    assert default_degree(1000, 0.3) == 160 and default_degree(100, 0.3) == 99


@pytest.mark.parametrize("bits", [16, 32, 48])
def test_unmasked_sum_equals_the_plain_sum(bits: int) -> None:
    fp = FixedPoint(bits, 1.0, 1, 30)
    inputs = random_inputs(30, 50, fp, bits)
    result = run_protocol(inputs, fp, degree=10)
    assert result.error == "" and result.survivors == list(range(30))
    assert np.array_equal(result.total, plain_sum(inputs, list(range(30)), fp))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(3, 14), degree=st.integers(2, 13), data=st.data())
def test_dropouts_at_every_step(n: int, degree: int, data: st.DataObject) -> None:
    fp = FixedPoint(32, 1.0, 1, 16)
    inputs = random_inputs(n, 8, fp, n * 100 + degree)
    drop = {step: set(data.draw(st.lists(st.integers(0, n - 1), max_size=3), label=step)) for step in STEPS}
    result = run_protocol(inputs, fp, degree=degree, drop=drop)
    gone = set().union(*drop.values())
    sent_masked = [c for c in range(n) if c not in drop["advertise"] | drop["share"] | drop["masked"]]
    if not drop["share"] | drop["masked"] | drop["unmask"]:
        assert result.error == ""  # dropping before the graph is drawn never stops a run
    if result.error:
        # Only a threshold that dropouts left unmet may stop a run, and it says so.
        assert "threshold" in result.error or "too many dropouts" in result.error
        return
    assert result.survivors == sent_masked
    assert np.array_equal(result.total, plain_sum(inputs, sent_masked, fp))
    assert not set(result.dropped) & set(result.survivors)
    assert gone >= set(result.dropped)


def test_dropouts_of_ten_percent_at_each_step_with_many_clients() -> None:
    fp = FixedPoint(32, 1.0, 1, 120)
    inputs = random_inputs(120, 16, fp, 7)
    rng = np.random.default_rng(1)
    order = rng.permutation(120).tolist()
    drop = {step: set(order[12 * i:12 * (i + 1)]) for i, step in enumerate(STEPS)}
    # 36 of 120 gone after the graph is drawn: the degree is sized for 30% (sized for 10%, a
    # client was left one share short in about one run of ten).
    result = run_protocol(inputs, fp, drop=drop, expected_dropout=0.3)
    assert result.error == ""
    survivors = sorted(set(range(120)) - drop["advertise"] - drop["share"] - drop["masked"])
    assert result.survivors == survivors and len(result.dropped) == 12
    assert np.array_equal(result.total, plain_sum(inputs, survivors, fp))


def test_tampered_message_is_refused_and_the_rest_sums_exactly() -> None:
    fp = FixedPoint(32, 1.0, 1, 10)
    inputs = random_inputs(10, 8, fp, 3)
    transcript: list = []
    ids = Identities()
    run_protocol(inputs, fp, identities=ids, transcript=transcript)
    masked3 = next(m for step, c, m in transcript if step == "masked" and c == 3)
    flipped = bytearray(masked3)
    flipped[60] ^= 1
    result = run_protocol(inputs, fp, identities=ids, tamper={("masked", 3): bytes(flipped)})
    assert "bad signature" in result.rejected[3]
    assert result.survivors == [c for c in range(10) if c != 3] and result.dropped == [3]
    assert np.array_equal(result.total, plain_sum(inputs, result.survivors, fp))
    # The same bytes replayed in a new session (same identities, valid signature) are refused.
    replay = run_protocol(inputs, fp, identities=ids, tamper={("masked", 3): masked3})
    assert "another session" in replay.rejected[3]
    assert np.array_equal(replay.total, plain_sum(inputs, replay.survivors, fp))
    # A message of another step or another client is refused too.
    advert4 = next(m for step, c, m in transcript if step == "advertise" and c == 4)
    moved = run_protocol(inputs, fp, identities=ids, tamper={("advertise", 5): advert4})
    assert 5 in moved.rejected and 5 not in moved.survivors


def test_forged_or_tampered_keys_and_shares_make_a_client_abort() -> None:
    fp = FixedPoint(32, 1.0, 1, 6)
    ids = Identities()
    inputs = random_inputs(6, 4, fp, 0)
    # A client that never signed: nobody can pass off keys in its name.
    impostor = run_protocol(inputs, fp, identities=ids,
                            tamper={("advertise", 2): seal(Identities().of(2), 1, bytes(32), 2, SERVER, bytes(64))})
    assert "bad signature" in impostor.rejected[2]
    # A server that swaps a neighbour's key (to read its shares): the client aborts.
    session = new_session()
    directory = {c: ids.of(c).public_key() for c in range(3)}
    parties = {c: SecAggClient(c, ids.of(c), ids.server.public_key(), directory, session, fp, 0.5)
               for c in range(3)}
    adverts = {c: p.advertise() for c, p in parties.items()}

    def neighbours_for(c: int, swap: bool) -> bytes:
        body = [(2).to_bytes(4, "little")]
        for v in sorted(set(parties) - {c}):
            keys = adverts[v][49:49 + 64]
            if swap:
                keys = bytes(32) + keys[32:]
            body.append(v.to_bytes(4, "little") + keys + adverts[v][-64:])
        return seal(ids.server, NEIGHBOURS, session, SERVER, c, b"".join(body))

    with pytest.raises(ProtocolError, match="not signed"):
        parties[0].share_keys(neighbours_for(0, swap=True))
    shares = {c: parties[c].share_keys(neighbours_for(c, swap=False)) for c in (1, 2)}
    # A forwarded share ciphertext with one bit flipped fails AES-GCM at its recipient.
    r = Reader(shares[2][49:-64], "shares")
    entries = {}
    for _ in range(r.u32()):
        v = r.u32()
        entries[v] = r.take(r.u32())
    ct = bytearray(entries[1])
    ct[5] ^= 1
    body = (1).to_bytes(4, "little") + (2).to_bytes(4, "little") + len(ct).to_bytes(4, "little") + bytes(ct)
    with pytest.raises(ProtocolError, match="fail authentication"):
        parties[1].masked_input(seal(ids.server, SHARES_FOR, session, SERVER, 1, body), inputs[1])


def test_a_server_naming_one_client_survivor_and_dropped_gets_nothing() -> None:
    fp = FixedPoint(32, 1.0, 1, 4)
    ids = Identities()
    session = new_session()
    directory = {c: ids.of(c).public_key() for c in range(4)}
    client = SecAggClient(0, ids.of(0), ids.server.public_key(), directory, session, fp, 0.5)
    client.held = {1: (bytes(66), bytes(66)), 2: (bytes(66), bytes(66))}
    client.threshold = 1
    client.state = "masked"  # as after masked_input
    body = b"".join(x.to_bytes(4, "little") for x in (1, 1, 1, 1))  # 1 survived, 1 dropped
    with pytest.raises(ProtocolError, match="both survived and dropped"):
        client.unmask(seal(ids.server, SURVIVORS, session, SERVER, 0, body))
    ok = b"".join(x.to_bytes(4, "little") for x in (1, 1, 1, 2))
    client.unmask(seal(ids.server, SURVIVORS, session, SERVER, 0, ok))
    with pytest.raises(ProtocolError, match="twice"):
        client.unmask(seal(ids.server, SURVIVORS, session, SERVER, 0, ok))


def test_no_client_has_both_its_secrets_revealed() -> None:
    fp = FixedPoint(32, 1.0, 1, 40)
    inputs = random_inputs(40, 4, fp, 5)
    transcript: list = []
    ids = Identities()
    result = run_protocol(inputs, fp, identities=ids, drop={"masked": {3, 9, 17}, "unmask": {5}},
                          transcript=transcript)
    assert result.error == ""
    revealed: dict[int, set[int]] = {}
    for step, _, message in transcript:
        if step != "unmask":
            continue
        r = Reader(message[49:-64], "unmask")
        for _ in range(r.u32()):
            about, kind, _share = r.u32(), r.u8(), r.take(shamir.SHARE_BYTES)
            revealed.setdefault(about, set()).add(kind)
    assert revealed, "no unmask message parsed"
    assert all(len(kinds) == 1 for kinds in revealed.values())
    assert {c for c, k in revealed.items() if k == {MASK_KEY}} == {3, 9, 17}
    assert {c for c, k in revealed.items() if k == {SELF_MASK}} == set(result.survivors)
    assert UNMASK == 7


def test_what_the_server_sees_is_independent_of_the_input() -> None:
    """Chi-square test of homogeneity: client 0's masked words when its input is all zeros vs
    all at the top of the range, over 60 sessions each; the same test on the unmasked
    encodings rejects (so the test can fail)."""
    fp = FixedPoint(16, 1.0, 1, 3)
    length = 64

    def seen(value: int) -> np.ndarray:
        words = []
        for _ in range(60):
            inputs = {0: np.full(length, value, dtype=fp.dtype), 1: np.zeros(length, fp.dtype),
                      2: np.zeros(length, fp.dtype)}
            transcript: list = []
            run_protocol(inputs, fp, transcript=transcript)
            masked = next(m for step, c, m in transcript if step == "masked" and c == 0)
            words.append(np.frombuffer(masked[49:-64], dtype="<u4") & 0xFFFF)
        return np.concatenate(words) >> 12  # 16 bins

    a, b = seen(0), seen(0xF000)
    table = np.array([np.bincount(a, minlength=16), np.bincount(b, minlength=16)])
    assert chi2_contingency(table).pvalue > 1e-5  # a false alarm once in 100,000 runs
    plain = np.array([np.bincount(np.zeros(100, int), minlength=16) + 1,
                      np.bincount(np.full(100, 15), minlength=16) + 1])
    assert chi2_contingency(plain).pvalue < 1e-5


def _parties(n: int, fp: FixedPoint, length: int) -> tuple[Identities, bytes, dict[int, SecAggClient], SecAggServer]:
    ids = Identities()
    session = new_session()
    directory = {c: ids.of(c).public_key() for c in range(n)}
    parties = {c: SecAggClient(c, ids.of(c), ids.server.public_key(), directory, session, fp, 0.5)
               for c in range(n)}
    server = SecAggServer(ids.server, directory, session, fp, n - 1, 0.5, length)
    return ids, session, parties, server


def test_a_signed_but_malformed_message_rejects_its_client_not_the_session() -> None:
    fp = FixedPoint(32, 1.0, 1, 5)
    inputs = random_inputs(5, 6, fp, 2)
    ids, session, parties, server = _parties(5, fp, 6)
    adverts = {c: p.advertise() for c, p in parties.items()}
    adverts[4] = seal(ids.of(4), ADVERTISE, session, 4, SERVER, bytes(10))  # signed, too short
    neighbours = server.receive_adverts(adverts)
    assert "truncated" in server.rejected[4] and sorted(neighbours) == [0, 1, 2, 3]
    forwarded = server.receive_shares({c: parties[c].share_keys(m) for c, m in neighbours.items()})
    masked = {c: parties[c].masked_input(m, inputs[c]) for c, m in forwarded.items()}
    masked[3] = seal(ids.of(3), MASKED, session, 3, SERVER, bytes(6 * fp.word_bytes + 2))  # trailing bytes
    survivors = server.receive_masked(masked)
    assert "trailing" in server.rejected[3] and server.survivors == [0, 1, 2] and server.dropped == [3]
    total = server.receive_unmask({c: parties[c].unmask(m) for c, m in survivors.items()})
    assert np.array_equal(total, plain_sum(inputs, [0, 1, 2], fp))


def test_client_steps_run_once_and_in_order() -> None:
    fp = FixedPoint(32, 1.0, 1, 3)
    inputs = random_inputs(3, 4, fp, 1)
    ids, session, parties, server = _parties(3, fp, 4)
    with pytest.raises(ProtocolError, match="out of order"):
        parties[0].masked_input(b"", inputs[0])  # before anything
    neighbours = server.receive_adverts({c: p.advertise() for c, p in parties.items()})
    with pytest.raises(ProtocolError, match="advertise out of order or twice"):
        parties[0].advertise()
    shares = {c: parties[c].share_keys(m) for c, m in neighbours.items()}
    # A second share_keys would encrypt new shares under the same AES-GCM key and nonce.
    with pytest.raises(ProtocolError, match="share_keys out of order or twice"):
        parties[0].share_keys(neighbours[0])
    with pytest.raises(ProtocolError, match="unmask out of order"):
        parties[0].unmask(b"")
    forwarded = server.receive_shares(shares)
    masked = {c: parties[c].masked_input(m, inputs[c]) for c, m in forwarded.items()}
    with pytest.raises(ProtocolError, match="masked_input out of order or twice"):
        parties[0].masked_input(forwarded[0], inputs[0])
    server.receive_masked(masked)
    # A server naming the client itself among its survivors or dropped neighbours is refused.
    for lists in ((2, 0, 1, 0), (1, 1, 1, 0)):
        body = b"".join(x.to_bytes(4, "little") for x in lists)
        with pytest.raises(ProtocolError, match="the client itself"):
            parties[0].unmask(seal(ids.server, SURVIVORS, session, SERVER, 0, body))
    # A client whose step failed midway is out of the session.
    bad = SecAggClient(0, ids.of(0), ids.server.public_key(), {}, session, fp, 0.5)
    bad.advertise()
    with pytest.raises(ProtocolError):
        bad.share_keys(b"garbage")
    with pytest.raises(ProtocolError, match="state aborted"):
        bad.share_keys(b"garbage")


@pytest.mark.parametrize("bits, clip_range, weight, clients", [
    (64, 1.0, 1, 1), (64, 3.7, 1, 1), (64, 1.0, 7, 3), (63, 0.1, 1, 1), (32, 1.0, 1, 1), (33, 5.0, 3, 7),
])
def test_fixed_point_bound_holds_in_exact_integers(bits: int, clip_range: float, weight: int, clients: int) -> None:
    fp = FixedPoint(bits, clip_range, weight, clients)
    largest = clients * weight * (math.floor(clip_range * fp.scale) + 1)  # the largest |sum|, as encoded
    assert largest <= (1 << (bits - 1)) - 1
    x = torch.tensor([clip_range, -clip_range, 10 * clip_range, -10 * clip_range])
    for seed in range(20):
        words = [fp.encode(x, weight, 1, torch.Generator().manual_seed(seed * clients + i)) for i in range(clients)]
        total = words[0].copy()
        for w in words[1:]:
            total += w
        total &= fp.dtype(fp.mask)
        values, _, _ = fp.decode_sum(total, clients)
        expected = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64) * clip_range * clients * weight
        assert torch.allclose(values, expected, rtol=1e-6), values  # +R stays +R, -R stays -R


def test_central_dp_clients_clip_so_that_the_encoded_update_stays_within_the_bound() -> None:
    from koinon.privacy import SecureAggregation

    fp = FixedPoint(16, 1.0, 1, 4)  # a coarse step (1 / 8190), so rounding shows
    secure = SecureAggregation(fp, seed=3)
    clip, length = 0.5, 1000
    assert secure.encoded_clip(clip, length) == pytest.approx(clip - math.sqrt(length) / fp.scale)
    for r in range(5):
        updates = torch.zeros(4, length)
        updates[2] = torch.randn(length, generator=torch.Generator().manual_seed(r))  # norm ~ 30: clipped
        result = secure.run([0, 1, 2, 3], updates, [1, 1, 1, 1], r, clip)
        assert result.count == 3  # the zero updates were not clipped
        # Zero updates encode exactly, so the sum is client 2's update as the server decodes it.
        assert float(result.total.norm()) <= clip
    with pytest.raises(ValueError, match="raise the modulus bits"):
        secure.encoded_clip(0.001, length)
