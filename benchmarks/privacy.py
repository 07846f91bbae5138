"""Privacy benchmark: the cost of SecAgg+ and the accuracy that user-level DP keeps.

1. SecAgg+ (`koinon.privacy.secagg.run_protocol`, every party in this process exchanging the
   real signed messages) for n = 10, 100, 1000 clients and a model of 100,000 parameters, with
   0%, 10% and 30% of the clients dropping after they shared their keys (the costly case: the
   server reconstructs their mask keys and removes their pairwise masks). Per client: compute
   time (fixed-point encoding included) and bytes each way; server: total and unmasking time.
   Next to it, plain aggregation: the identity codec's float32 payload and the server's decode
   and mean. Modulus 2^32, clip range 8, uniform weights (max_weight 1, as under DP).
2. Accuracy against epsilon for user-level central DP (DP-FedAvg with server momentum, adaptive
   clipping at the median, PLD accounting, every client sampled independently with q = 0.1) on
   MNIST-1D with a population of 10,000 clients (4.8 training samples each), for a few seeds.
   The non-private runs use the same model, rounds, cohort and server optimizer. The DP noise
   is seeded (`privacy.noise_seed`, a testing knob: reproducible and NOT private) so that a
   table can be reproduced; a real run draws it from os.urandom.
3. Accuracy against epsilon for sample-level DP-SGD inside the clients (per-sample clipping,
   Poisson sampling, RDP) on scikit-learn's digits: 10 clients with about 144 samples each.

    PYTHONPATH=src nice -n 10 .venv/bin/python benchmarks/privacy.py [--quick] [--only secagg|dp|dpsgd] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch


def secagg_table(sizes: list[int], numel: int, dropouts: list[float]) -> None:
    from koinon.compress import CODECS
    from koinon.params import Layout
    from koinon.privacy.secagg import FixedPoint, Identities, default_degree, run_protocol
    from koinon.seeding import generator

    codec = CODECS.build("identity", {}, "codec", layout=Layout.from_module(torch.nn.Linear(numel, 1, bias=False)))
    print(f"\nSecAgg+ vs plain aggregation, model of {numel:,} parameters (times in ms, bytes per client)")
    print(f"{'n':>5} {'drop':>5} {'k':>3} | {'client ms':>9} {'up bytes':>10} {'down bytes':>10} {'up/plain':>8} | "
          f"{'server s':>8} {'unmask s':>8} | {'plain client ms':>15} {'plain up':>9} {'plain server s':>14}")
    for n in sizes:
        fp = FixedPoint(32, 8.0, 1, n)
        rng = torch.Generator().manual_seed(n)
        updates = torch.randn(n, numel, generator=rng) * 0.01
        ids = Identities()
        for c in range(n):
            ids.of(c)  # long-term identities exist before the round (the PKI)
        # Plain: each client encodes float32; the server decodes and averages.
        start = time.perf_counter()
        payloads = [codec.encode(updates[c], {}, generator(0, 0, c))[0] for c in range(n)]
        plain_client = (time.perf_counter() - start) / n
        start = time.perf_counter()
        torch.stack([codec.decode(p) for p in payloads]).mean(dim=0)
        plain_server = time.perf_counter() - start
        plain_up = len(payloads[0])
        for drop in dropouts:
            start = time.perf_counter()
            inputs = {c: fp.encode(updates[c], 1, 0, generator(0, 0, c, 1)) for c in range(n)}
            encode_s = (time.perf_counter() - start) / n
            dropped = set(np.random.default_rng(1).choice(n, int(round(drop * n)), replace=False).tolist())
            result = run_protocol(inputs, fp, drop={"masked": dropped}, identities=ids,
                                  expected_dropout=max(0.1, drop))
            if result.error:
                print(f"{n:>5} {drop:>5.0%}  failed: {result.error}")
                continue
            expected = np.zeros(numel + 2, dtype=np.uint32)
            for c in result.survivors:
                expected += inputs[c]
            assert np.array_equal(result.total, expected), "unmasked sum differs from the plain sum"
            survivors = result.survivors
            client_ms = 1e3 * (encode_s + statistics.mean(result.client_s[c] for c in survivors))
            up = statistics.mean(result.uplink[c] for c in survivors)
            down = statistics.mean(result.downlink[c] for c in survivors)
            print(f"{n:>5} {drop:>5.0%} {default_degree(n, max(0.1, drop)):>3} | {client_ms:>9.1f} {up:>10,.0f} "
                  f"{down:>10,.0f} {up / plain_up:>8.3f} | {result.server_s:>8.2f} {result.unmask_s:>8.2f} | "
                  f"{1e3 * plain_client:>15.2f} {plain_up:>9,} {plain_server:>14.3f}")
            del inputs, result


def dp_table(num_clients: int, num_samples: int, cohort: int, rounds: int, epsilons: list[float],
             seeds: list[int]) -> None:
    """Accuracy of DP-FedAvg against epsilon, one row per (seed, epsilon), then the mean gap.

    Why these settings (the noise on the mean update has std z C / m, m the expected cohort):
    for a fixed epsilon and number of rounds, a larger sampling rate q = m / N raises z less
    than it raises m (PLD, epsilon 8, 100 rounds: z = 0.70 at q = 0.05, 0.94 at q = 0.1, so
    z / m falls from 1.39e-3 to 0.94e-3); PLD needs about 6% less noise than RDP for the same
    epsilon; server momentum averages the noise of about 1 / (1 - 0.9) rounds."""
    print(f"\nUser-level central DP (DP-FedAvg, server momentum 0.9, adaptive clip at the median, PLD, "
          f"delta = 1e-5) on MNIST-1D: {num_clients:,} clients ({num_samples * 0.8 / num_clients:.1f} training "
          f"samples each), each in a round with probability q = {cohort / num_clients:g} (about {cohort}), "
          f"{rounds} rounds, MLP 128-128; noise seeded per seed (reproducible, not private)")
    print(f"{'seed':>4} {'epsilon':>8} {'z':>7} {'spent':>7} {'final clip':>10} {'accuracy':>9} "
          f"{'vs non-private':>14} {'wall s':>7}")
    gaps: dict[float, list[float]] = {}
    accs: dict[float, list[float]] = {}
    for seed in seeds:
        base = None
        for eps in epsilons:
            overrides = {
                "seed": seed, "data.name": "mnist1d", "data.num_samples": num_samples,
                "data.num_clients": num_clients, "data.partition": "iid", "server.clients_per_round": cohort,
                "server.rounds": rounds, "server.optimizer": "fedavgm", "server.momentum": 0.9,
                "client.epochs": 5, "client.batch_size": 8, "client.lr": 0.1, "model.name": "mlp",
                "model.hidden": [128, 128],
            }
            if math.isfinite(eps):
                overrides.update({"privacy.dp": "central", "privacy.target_epsilon": eps, "privacy.accountant": "pld",
                                  "privacy.clip": 0.5, "privacy.target_quantile": 0.5,
                                  "privacy.clip_count_stddev": cohort / 20, "privacy.noise_seed": seed})
            z, acc, last, wall = _train(overrides, rounds)
            if base is None and not math.isfinite(eps):
                base = acc
            accs.setdefault(eps, []).append(acc)
            gap = f"{100 * (acc - base):+.1f} pts" if base is not None else ""
            if base is not None:
                gaps.setdefault(eps, []).append(100 * (acc - base))
            print(f"{seed:>4} {eps:>8g} {z:>7.3f} {last.get('dp_epsilon', float('inf')):>7.3g} "
                  f"{last.get('dp_clip', float('nan')):>10.3g} {acc:>9.4f} {gap:>14} {wall:>7.1f}", flush=True)
    print(f"mean over seeds {seeds}: " + ", ".join(
        f"epsilon {eps:g}: {statistics.mean(accs[eps]):.4f}"
        + (f" ({statistics.mean(gaps[eps]):+.1f} pts, from {min(gaps[eps]):+.1f} to {max(gaps[eps]):+.1f})"
           if math.isfinite(eps) and eps in gaps else "")
        for eps in epsilons))


def _train(overrides: dict, rounds: int) -> tuple[float, float, dict, float]:
    """(noise multiplier, final test accuracy, last round's metrics, wall seconds) of a run."""
    from koinon.config import Config
    from koinon.experiment.runner import build_federation

    overrides = dict(overrides)
    cfg = Config(seed=overrides.pop("seed", 0)).with_overrides(overrides)
    start = time.perf_counter()
    fed = build_federation(cfg)
    results = [fed.run_round(evaluate=r == rounds - 1) for r in range(rounds)]
    wall = time.perf_counter() - start
    acc = results[-1].test_accuracy
    assert acc is not None
    z = cfg.privacy.noise_multiplier if cfg.privacy.dp != "none" else 0.0
    return z, acc, results[-1].extra, wall


def dpsgd_table(rounds: int, epsilons: list[float]) -> None:

    print(f"\nSample-level DP-SGD in every client (clip 1.0 per sample, batch 16, Poisson sampling, RDP, "
          f"delta = 1e-5) on digits: 10 clients (iid), all in every round, {rounds} rounds, MLP 64")
    print(f"{'epsilon':>8} {'z':>7} {'spent':>7} {'accuracy':>9} {'vs non-private':>14} {'wall s':>7}")
    base = None
    for eps in epsilons:
        overrides: dict = {
            "data.num_clients": 10, "data.partition": "iid", "server.clients_per_round": 10,
            "server.rounds": rounds, "client.epochs": 1, "client.batch_size": 16, "client.lr": 0.5,
            "client.momentum": 0.0, "model.hidden": [64],
        }
        if math.isfinite(eps):
            overrides.update({"privacy.dp": "sample", "privacy.target_epsilon": eps, "privacy.clip": 1.0})
        z, acc, last, wall = _train(overrides, rounds)
        if base is None and not math.isfinite(eps):
            base = acc
        gap = f"{100 * (acc - base):+.1f} pts" if base is not None else ""
        print(f"{eps:>8g} {z:>7.3f} {last.get('dp_epsilon', float('inf')):>7.3g} "
              f"{acc:>9.4f} {gap:>14} {wall:>7.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--only", choices=["secagg", "dp", "dpsgd"], action="append")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="seeds of the central DP table (default 0 1; 0 with --quick)")
    parser.add_argument("--cohort", type=int, default=1000,
                        help="expected clients a round of the central DP table (q = cohort / 10,000)")
    parser.add_argument("--epsilons", type=float, nargs="+", default=None,
                        help="epsilons of the central DP table (default inf 8 3 1; inf 8 with --quick)")
    args = parser.parse_args()
    only = set(args.only or ["secagg", "dp", "dpsgd"])
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if "secagg" in only:
        if args.quick:
            secagg_table([10, 100], 10_000, [0.0, 0.1])
        else:
            secagg_table([10, 100, 1000], 100_000, [0.0, 0.1, 0.3])
    if "dp" in only:
        if args.quick:
            dp_table(1000, 12000, 100, 10, args.epsilons or [float("inf"), 8.0], args.seeds or [0])
        else:
            dp_table(10_000, 60_000, args.cohort, 100, args.epsilons or [float("inf"), 8.0, 3.0, 1.0], args.seeds or [0, 1])
    if "dpsgd" in only:
        dpsgd_table(5 if args.quick else 30, [float("inf"), 8.0] if args.quick else [float("inf"), 8.0, 3.0, 1.0])


if __name__ == "__main__":
    main()
