"""Personalization under heterogeneity: every method, every client, measured on its own data.

Each setting splits sklearn's digits over 24 clients, of which 4 are kept out of training
(`data.holdout_clients`) and every client holds a quarter of its samples out
(`data.client_test_fraction`); 20 train with full participation, one local epoch a round, on
an MLP 64-64-10 with LayerNorm (FedBN's normalization layer; every method gets the same model):

- `dirichlet`: label skew, Dirichlet(0.1);
- `shards`: pathological label skew, 2 classes per client;
- `rotation`: feature shift, 4 groups of clients see the digits rotated by 0/90/180/270 degrees
  (labels i.i.d.);
- `unlabeled`: Dirichlet(0.5), a quarter of the clients without labels, a quarter of the labels
  kept elsewhere, classes 8 and 9 never labeled (`fedossl`; seen / novel accuracy below);
- `active`: Dirichlet(0.5), 5% of labels (`kafal` buys more; accuracy against labels below).
- `hetero`: model heterogeneity on Dirichlet(0.1) label skew: a third of the clients each can
  afford the full model, half of it, a quarter of it (`client.budgets = [1.0, 0.5, 0.25]`);
  `pfedgate` and `fedconv` give each client a sub-model within its budget, every other method
  trains the model all clients can run (hidden width 16); the server holds 200 training samples
  no client holds (`data.public_samples`, the same for every method), on which `fedconv+learnt`
  learns FedConv's compression and dilation kernels;
- `domains`: every client its own rotation (15 degrees apart), so the 4 new clients are domains
  no client trained on (domain generalization: FedKA's setting). Not in the default run
  (`--settings domains`).

For each method and setting, over 3 seeds (mean; +- the standard deviation of the mean over
clients between seeds): personalized accuracy over clients (mean / 10th percentile / worst),
new-client accuracy (the method's new-client procedure on the 4 held-out clients), the global
model's test accuracy, bytes up + down, and wall time. The goal: on each setting the best method
beats FedAvg + local fine-tuning (`finetune`) on both the mean and the 10th percentile by at
least 3 points; the last lines say where it does and where not.

`--tune` (label skew where fine-tuning has room: `--tune --dataset mnist1d --samples 10000`)
compares the label-skew methods tuned alike: every method's adaptation budget (`adapt_steps` 20 or
100) and its own options (`GRID`) are chosen on a seed of their own (TUNE_SEED), and the table
reports seeds 0 .. S-1 with those choices (see `tuned_table`).

    .venv/bin/python benchmarks/personalization.py [--quick] [--rounds R] [--seeds S] [--only m1,m2]
        [--settings dirichlet,shards,rotation,unlabeled,active,hetero,domains] [--prompts] [--dataset digits|mnist1d]
        [--samples N] [--tune [--model mlp|cnn1d] [--epochs E]]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import koinon as kn
from koinon.experiment.runner import build_federation

SETTINGS = {
    "dirichlet": {"partition": "dirichlet", "alpha": 0.1},
    "shards": {"partition": "shards", "classes_per_client": 2},
    "rotation": {"partition": "iid", "feature_shift": "rotation", "shift_groups": 4},
    "unlabeled": {"partition": "dirichlet", "alpha": 0.5, "unlabeled_clients": 0.25, "label_fraction": 0.25,
                  "unseen_classes": [8, 9]},
    "active": {"partition": "dirichlet", "alpha": 0.5, "label_fraction": 0.05},
    "hetero": {"partition": "dirichlet", "alpha": 0.1, "public_samples": 200},
    "domains": {"partition": "iid", "feature_shift": "rotation", "shift_groups": 0},
}
# Model heterogeneity: client budgets (cycled over client ids) for the methods that take them;
# every other method trains the width all clients can run (the narrowest).
BUDGETS = {"hetero": [1.0, 0.5, 0.25]}
METHODS = {
    "fedavg": {},
    "finetune": {"adapt_steps": 20},
    "fedbn": {"adapt_steps": 20},
    "fedper": {"adapt_steps": 20},
    "fedrep": {"adapt_steps": 20, "head_steps": 10},
    "ditto": {"lam": 0.1, "adapt_steps": 20},
    "perfedavg": {"alpha": 0.05, "adapt_steps": 5},
    "ifca": {"clusters": 4, "adapt_steps": 20},
    "clustered_meta": {"clusters": 4, "alpha": 0.05, "adapt_steps": 20},
    "fedcac": {"tau": 0.5, "beta": 170.0, "adapt_steps": 20},
    "fedbabu": {"adapt_steps": 20},
    "fedossl": {"lam": 0.5, "threshold": 0.5, "pair": 0.25},
    "fedlgd": {"ipc": 5, "dm_steps": 10, "match_steps": 10},
    "pfedpg": {"gen_lr": 0.1, "adapt_steps": 20},
    "pfedgate": {"budgets": [1.0], "gate_lr": 5.0, "adapt_steps": 20},
    "fedconv": {"budgets": [1.0], "adapt_steps": 20},
    # FedConv with kernels learnt on the server's public samples (`hetero`: 200, held by no client)
    "fedconv+learnt": {"budgets": [1.0], "adapt_steps": 20, "kernels": "learnt"},
    "reconnaissance": {},
    "fedka": {"lam": 0.1, "voters": 5, "agreement": 0.6, "adapt_steps": 20},
    "fedins": {"pool_size": 8, "top": 2, "key_weight": 0.1},
    "fraug": {"aug_weight": 1.0, "gen_hidden": 16, "adapt_steps": 20},
}


def config(setting: str, method: str, seed: int, rounds: int, dataset: str = "digits",
           samples: int = 4000) -> kn.Config:
    cfg = kn.Config()
    cfg.seed = seed
    cfg.data.name = dataset
    if dataset == "mnist1d":
        cfg.data.options = {"num_samples": samples}
    cfg.data.num_clients = 24
    cfg.data.client_test_fraction = 0.25
    cfg.data.holdout_clients = 4
    for key, value in SETTINGS[setting].items():
        setattr(cfg.data, key, value)
    cfg.model.name, cfg.model.options = "mlp_norm", {"hidden": [64], "norm": "layer"}
    cfg.client.algorithm = method.split("+")[0]  # "name+variant": the method with other options
    cfg.client.options = dict(METHODS.get(method, {}))
    if setting in BUDGETS and "budgets" in cfg.client.options:
        cfg.client.options["budgets"] = BUDGETS[setting]
    elif setting in BUDGETS:
        cfg.model.options["hidden"] = [int(64 * min(BUDGETS[setting]))]
    if method == "fedlgd" and setting in BUDGETS:
        cfg.client.options["ipc"] = 1  # the global virtual data must fit the narrow model's download
    cfg.client.lr, cfg.client.batch_size, cfg.client.epochs = 0.1, 16, 1
    cfg.server.rounds, cfg.server.clients_per_round = rounds, 20
    cfg.runtime.name = "vectorized"
    return cfg


def run(setting: str, method: str, seed: int, rounds: int, dataset: str, samples: int = 4000,
        options: dict | None = None, model: str = "mlp", epochs: int = 1) -> dict[str, float]:
    cfg = config(setting, method, seed, rounds, dataset, samples)
    if options is not None:
        cfg.client.options = dict(options)
    if model == "cnn1d":  # MNIST-1D's 1-D CNN (three convolutions, a linear head); no normalization layer
        cfg.model.name, cfg.model.options = "cnn1d", {"channels": 32}
    cfg.client.epochs = epochs
    fed = build_federation(cfg)
    start = time.perf_counter()
    result = fed.fit(rounds, eval_every=rounds)[-1]
    wall = time.perf_counter() - start
    out = {k: v for k, v in result.extra.items() if k.startswith(("personal_", "new_client_"))}
    out.update(test=result.test_accuracy or 0.0, mb=(fed.uplink_total + fed.downlink_total) / 1e6, wall=wall)
    fed.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed, 5 rounds")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated methods")
    parser.add_argument("--settings", default=None, help="default: all but domains (with --tune: dirichlet,shards)")
    parser.add_argument("--dataset", default="digits", choices=["digits", "mnist1d"],
                        help="mnist1d: 4,000 generated 1-D signals (rotation = circular shift)")
    parser.add_argument("--samples", type=int, default=4000, help="MNIST-1D's size (train + test)")
    parser.add_argument("--model", default="mlp", choices=["mlp", "cnn1d"],
                        help="with --tune: cnn1d (MNIST-1D's 1-D CNN; fedbn has no normalization layer to keep)")
    parser.add_argument("--epochs", type=int, default=1, help="with --tune: local epochs a round")
    parser.add_argument("--prompts", action="store_true", help="also pFedPG on a pretrained char transformer")
    parser.add_argument("--plot", default="", metavar="PNG",
                        help="also draw each method's gain over fine-tuning (mean, p10) per setting into PNG")
    parser.add_argument("--tune", action="store_true",
                        help="label skew, tuned: each method's options searched on a separate seed (see tuned_table)")
    args = parser.parse_args()
    rounds, seeds = (5, 1) if args.quick else (args.rounds, args.seeds)
    if args.tune:
        tuned_table((args.settings or "dirichlet,shards").split(","), args.only.split(",") if args.only else TUNED,
                    rounds, seeds, args.dataset, args.samples, args.model, args.epochs)
        return
    settings = (args.settings or ",".join(s for s in SETTINGS if s != "domains")).split(",")
    methods = [m for m in METHODS if not args.only or m in args.only.split(",")]
    torch.set_num_threads(1)
    print(f"{args.dataset}, 20 training + 4 new clients, MLP 64-64-10 + LayerNorm, {rounds} rounds, "
          f"{seeds} seed(s); accuracies in %, mean over seeds (+- std between seeds)")
    head = (f"{'setting':<10} {'method':<15} {'personal mean':>14} {'p10':>6} {'worst':>6} "
            f"{'new mean':>9} {'global':>7} {'MB':>7} {'wall s':>7}")
    verdicts = []
    measured: dict[str, dict[str, dict[str, float]]] = {}
    for setting in settings:
        print()
        print(head)
        rows: dict[str, dict[str, float]] = measured.setdefault(setting, {})
        for method in methods:
            if method == "fedconv+learnt" and setting not in BUDGETS:
                continue  # without budgets there is nothing to compress
            runs = [run(setting, method, seed, rounds, args.dataset, args.samples) for seed in range(seeds)]

            def avg(key: str, runs: list[dict[str, float]] = runs) -> float:
                return statistics.fmean(r.get(key, float("nan")) for r in runs)

            means = [100 * r["personal_accuracy_mean"] for r in runs]
            spread = statistics.stdev(means) if len(means) > 1 else 0.0
            rows[method] = {"mean": 100 * avg("personal_accuracy_mean"), "p10": 100 * avg("personal_accuracy_p10")}
            print(f"{setting:<10} {method:<15} {rows[method]['mean']:>8.1f} +-{spread:>3.1f} "
                  f"{rows[method]['p10']:>6.1f} {100 * avg('personal_accuracy_min'):>6.1f} "
                  f"{100 * avg('new_client_accuracy_mean'):>9.1f} {100 * avg('test'):>7.1f} "
                  f"{avg('mb'):>7.1f} {avg('wall'):>7.2f}", flush=True)
        if "finetune" in rows and len(rows) > 1:
            base = rows["finetune"]
            others = {m: r for m, r in rows.items() if m not in ("finetune", "fedavg")}
            best = max(others, key=lambda m: min(others[m]["mean"] - base["mean"], others[m]["p10"] - base["p10"]))
            gain_mean, gain_p10 = others[best]["mean"] - base["mean"], others[best]["p10"] - base["p10"]
            met = gain_mean >= 3 and gain_p10 >= 3
            verdicts.append(f"{setting}: best {best} vs finetune: mean {gain_mean:+.1f}, p10 {gain_p10:+.1f} points "
                            f"-> goal (>= 3 on both) {'met' if met else 'MISSED'}")
    print()
    for line in verdicts:
        print(line)
    if args.plot:
        plot_gains(measured, args.plot, f"{args.dataset}, {rounds} rounds, {seeds} seed(s)")
    labels_tables(seeds, rounds, args.dataset, settings)
    if args.prompts:
        prompt_table(seeds, args.quick)


def plot_gains(measured: dict[str, dict[str, dict[str, float]]], path: str, title: str) -> None:
    """One panel per setting: each method's personal mean and p10 minus fine-tuning's, with the
    goal's region (at least +3 points on both) shaded, so a glance shows where it is met."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [s for s, rows in measured.items() if "finetune" in rows and len(set(rows) - {"fedavg"}) > 1]
    cols = min(2, len(panels))
    rows_n = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(6.0 * cols, 4.6 * rows_n), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, setting in zip(axes.flat, panels, strict=False):
        rows, base = measured[setting], measured[setting]["finetune"]
        gains = {m: (r["mean"] - base["mean"], r["p10"] - base["p10"])  # FedAvg, far below, left out
                 for m, r in rows.items() if m not in ("finetune", "fedavg")}
        top = max(6.0, *(max(g) + 2 for g in gains.values()))
        ax.fill_between([3, top], 3, top, color="tab:green", alpha=0.12, label="goal: >= +3 on both")
        ax.axhline(0, color="grey", lw=0.8)
        ax.axvline(0, color="grey", lw=0.8)
        # Methods far below fine-tuning are listed in a corner with their gains, not drawn, so the
        # region near the goal keeps its scale.
        low_x = max(-12.0, min(dx for dx, _ in gains.values()) - 1)
        low_y = max(-18.0, min(dy for _, dy in gains.values()) - 1)
        placed: list[tuple[float, float]] = []
        off = []
        for m, (dx, dy) in sorted(gains.items(), key=lambda kv: -kv[1][1]):
            if dx < low_x or dy < low_y:
                off.append(f"{m} ({dx:+.1f}, {dy:+.1f})")
                continue
            ax.scatter(dx, dy, s=18, color="tab:blue")
            # Methods that tie sit on one spot: their names step down instead of overprinting.
            near = sum(abs(dx - a) < 0.8 and abs(dy - b) < 0.8 for a, b in placed)
            placed.append((dx, dy))
            ax.annotate(m, (dx, dy), fontsize=7, xytext=(4, 2 - 8 * near), textcoords="offset points")
        if off:
            ax.text(0.02, 0.02, "below the chart:\n" + "\n".join(off), transform=ax.transAxes, fontsize=7,
                    va="bottom", ha="left", color="dimgrey")
        ax.set_xlim(left=low_x)
        ax.set_ylim(bottom=low_y)
        ax.set_title(setting)
        ax.set_xlabel("personal mean - fine-tuning's (points)")
        ax.set_ylabel("personal p10 - fine-tuning's (points)")
        ax.set_xlim(right=top)
        ax.set_ylim(top=top)
    axes.flat[0].legend(loc="upper left", fontsize=7)
    fig.suptitle(f"Personalization: gain over FedAvg + fine-tuning ({title})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot: {path}")


# The tuned comparison (--tune): the methods built for label skew, each with the same adapt budget
# choices (`adapt_steps`, every method's new-client and fine-tuning steps) and its own options,
# searched on TUNE_SEED alone; the chosen options then run on seeds 0 .. S-1, which no choice saw.
TUNED = ["fedavg", "finetune", "fedbn", "fedper", "fedrep", "ditto", "perfedavg", "ifca", "clustered_meta",
         "fedcac", "fedbabu"]
TUNE_SEED = 100
ADAPT_STEPS = [20, 100]
GRID: dict[str, list[dict]] = {
    "ditto": [{"lam": 0.1}, {"lam": 1.0}],
    "fedrep": [{"head_steps": 10}, {"head_steps": 50}],
    "perfedavg": [{"alpha": 0.05}, {"alpha": 0.1}],
    "ifca": [{"clusters": 2}, {"clusters": 4}],
    "clustered_meta": [{"clusters": 2}, {"clusters": 4}],
    "fedbabu": [{"adapt_part": "all"}, {"adapt_part": "head"}],
}


def candidates(method: str) -> list[dict]:
    """Every option set searched for `method`: its defaults, with each adapt budget and each of
    its own choices."""
    base = METHODS.get(method, {})
    own = GRID.get(method, [{}])
    if "adapt_steps" not in base:
        return [{**base, **o} for o in own]
    return [{**base, **o, "adapt_steps": a} for a in ADAPT_STEPS for o in own]


def tuned_table(settings: list[str], methods: list[str], rounds: int, seeds: int, dataset: str,
                samples: int, model: str = "mlp", epochs: int = 1) -> None:
    """Label skew with fair tuning: for each setting and method, the options (`candidates`) with
    the best (mean + p10) / 2 personal accuracy on TUNE_SEED, then those options on seeds
    0 .. seeds-1; the verdict compares the best method with `finetune` tuned the same way."""
    per_client = samples * 0.8 * 0.75 / 24 if dataset == "mnist1d" else 1797 * 0.8 * 0.75 / 24
    print(f"{dataset} ({samples if dataset == 'mnist1d' else 1797} samples: about {per_client:.0f} training and "
          f"{per_client / 3:.0f} held-out samples a client), 20 training + 4 new clients, "
          f"{'1-D CNN (32 channels)' if model == 'cnn1d' else 'MLP 64-64-10 + LayerNorm'}, {rounds} rounds of {epochs} "
          f"local epoch(s); options chosen on seed {TUNE_SEED} by (mean + p10) / 2, reported over seeds "
          f"0-{seeds - 1}; accuracies in %, +- std between seeds")
    if model == "cnn1d" and "fedbn" in methods:
        methods = [m for m in methods if m != "fedbn"]
        print("fedbn left out: the 1-D CNN has no normalization layer to keep local")
    verdicts = []
    for setting in settings:
        print(f"\n{'setting':<10} {'method':<15} {'chosen options':<34} {'personal mean':>14} {'p10':>9} "
              f"{'worst':>6} {'new mean':>9} {'global':>7} {'MB':>6} {'wall s':>7}")
        rows: dict[str, dict[str, float]] = {}
        for method in methods:
            tried = []
            for opts in candidates(method):
                r = run(setting, method, TUNE_SEED, rounds, dataset, samples, opts, model, epochs)
                tried.append(((r["personal_accuracy_mean"] + r["personal_accuracy_p10"]) / 2, opts))
            best = max(tried, key=lambda t: t[0])[1]
            runs = [run(setting, method, seed, rounds, dataset, samples, best, model, epochs) for seed in range(seeds)]

            def pct(key: str, runs: list[dict[str, float]] = runs) -> list[float]:
                return [100 * r.get(key, float("nan")) for r in runs]

            def sd(values: list[float]) -> float:
                return statistics.stdev(values) if len(values) > 1 else 0.0

            mean, p10 = pct("personal_accuracy_mean"), pct("personal_accuracy_p10")
            rows[method] = {"mean": statistics.fmean(mean), "p10": statistics.fmean(p10)}
            shown = ", ".join(f"{k}={v}" for k, v in best.items() if k in ("adapt_steps", *GRID.get(method, [{}])[0]))
            print(f"{setting:<10} {method:<15} {shown or '-':<34} {rows[method]['mean']:>8.1f} +-{sd(mean):>3.1f} "
                  f"{rows[method]['p10']:>5.1f}+-{sd(p10):>2.0f} {statistics.fmean(pct('personal_accuracy_min')):>6.1f} "
                  f"{statistics.fmean(pct('new_client_accuracy_mean')):>9.1f} {statistics.fmean(pct('test')):>7.1f} "
                  f"{statistics.fmean(r['mb'] for r in runs):>6.1f} {statistics.fmean(r['wall'] for r in runs):>7.2f}",
                  flush=True)
            if method == "finetune":
                # The check against a win from the baseline's tuning noise: fine-tuning's other
                # choices on the reported seeds too, and the best of them (a choice no other
                # method gets: it only makes the verdict stricter).
                for opts in candidates(method):
                    if opts == best:
                        continue
                    other = [run(setting, method, seed, rounds, dataset, samples, opts, model, epochs)
                             for seed in range(seeds)]
                    m = statistics.fmean(100 * r["personal_accuracy_mean"] for r in other)
                    q = statistics.fmean(100 * r["personal_accuracy_p10"] for r in other)
                    print(f"{setting:<10} {'(finetune)':<15} {'adapt_steps=' + str(opts['adapt_steps']):<34} "
                          f"{m:>8.1f}       {q:>5.1f}     (its other choice, on the reported seeds)", flush=True)
                    if (m + q) / 2 > (rows["finetune"]["mean"] + rows["finetune"]["p10"]) / 2:
                        rows["finetune_best"] = {"mean": m, "p10": q}
        if "finetune" in rows and len(rows) > 1:
            base = rows["finetune"]
            strict = rows.pop("finetune_best", base)
            others = {m: r for m, r in rows.items() if m not in ("finetune", "fedavg")}
            if not others:
                continue
            best_m = max(others, key=lambda m: min(others[m]["mean"] - base["mean"], others[m]["p10"] - base["p10"]))
            gm, gp = others[best_m]["mean"] - base["mean"], others[best_m]["p10"] - base["p10"]
            sm, sp = others[best_m]["mean"] - strict["mean"], others[best_m]["p10"] - strict["p10"]
            verdicts.append(f"{setting}: best {best_m} vs finetune (both tuned): mean {gm:+.1f}, p10 {gp:+.1f} points; "
                            f"vs fine-tuning's best choice on these seeds: {sm:+.1f}, {sp:+.1f} -> goal (>= 3 on both, "
                            f"against both) {'met' if min(gm, gp, sm, sp) >= 3 else 'MISSED'}")
    print()
    for line in verdicts:
        print(line)


def labels_tables(seeds: int, rounds: int, dataset: str, settings: list[str]) -> None:
    """Open-world accuracy on the `unlabeled` setting (seen / novel classes, novel by Hungarian
    match), and active learning on the `active` setting: accuracy against labels used, KAFAL's
    KSAS vs random and entropy sampling at three budgets."""
    from koinon.personal.kafal import labels_used

    def one(setting: str, method: str, options: dict, seed: int) -> dict[str, float]:
        cfg = config(setting, method, seed, rounds, dataset)
        cfg.client.options = dict(options)
        fed = build_federation(cfg)
        r = fed.fit(rounds, eval_every=rounds)[-1]
        out = {"test": r.test_accuracy or 0.0, "labels": float(labels_used(fed.data, fed.client_states)), **r.extra}
        fed.close()
        return out

    def mean(runs: list[dict[str, float]], key: str) -> float:
        return statistics.fmean(r.get(key, float("nan")) for r in runs)

    if "unlabeled" in settings:
        print(f"\nunlabeled: 5 of 20 clients without labels, 25% labels elsewhere, classes 8, 9 never labeled "
              f"({rounds} rounds, {seeds} seed(s))")
        print(f"{'method':<26} {'seen':>6} {'novel':>6} {'global':>7} {'personal':>9} {'p10':>6}")
        rows = [("fedavg", {}), ("finetune", METHODS["finetune"]), ("fedossl", METHODS["fedossl"]),
                ("fedossl cap=1", {**METHODS["fedossl"], "cap": 1.0}),
                ("fedossl pair=0", {**METHODS["fedossl"], "pair": 0.0}),
                ("fedossl discover=false", {**METHODS["fedossl"], "discover": False}),
                ("fedossl calibrate=false", {**METHODS["fedossl"], "calibrate": False})]
        for label, options in rows:
            runs = [one("unlabeled", label.split()[0], options, s) for s in range(seeds)]
            print(f"{label:<26} {100 * mean(runs, 'seen_accuracy'):>6.1f} {100 * mean(runs, 'novel_accuracy'):>6.1f} "
                  f"{100 * mean(runs, 'test'):>7.1f} {100 * mean(runs, 'personal_accuracy_mean'):>9.1f} "
                  f"{100 * mean(runs, 'personal_accuracy_p10'):>6.1f}", flush=True)
    if "active" in settings:
        print(f"\nactive: 5% of labels at the start; KAFAL buys query_per_round = budget / 4 a round "
              f"({rounds} rounds, {seeds} seed(s)); training: plain local SGD on the labels (the sampling alone), "
              f"or + KCFU (balanced classifier + compensation)")
        print(f"{'budget':>6} {'sampling':<8} {'training':<8} {'labels':>7} {'global':>7} {'personal':>9} {'p10':>6}")
        plain = {"kd": 0.0, "balanced": False}
        plans = [(0, "none", {})] + [(b, smp, plain) for b in (4, 8, 16) for smp in ("ksas", "random", "entropy")]
        plans += [(16, smp, {}) for smp in ("ksas", "random")]
        for budget, sampling, training in plans:
            opts = {"label_budget": budget, "query_per_round": max(1, budget // 4), "sampling": sampling, **training}
            runs = [one("active", "kafal", opts, s) if budget else one("active", "fedavg", {}, s) for s in range(seeds)]
            kind = "-" if not budget else ("plain" if training else "KCFU")
            print(f"{budget:>6} {sampling:<8} {kind:<8} {mean(runs, 'labels'):>7.0f} {100 * mean(runs, 'test'):>7.1f} "
                  f"{100 * mean(runs, 'personal_accuracy_mean'):>9.1f} {100 * mean(runs, 'personal_accuracy_p10'):>6.1f}",
                  flush=True)


def prompt_table(seeds: int, quick: bool) -> None:
    """pFedPG where it belongs: a char transformer pretrained on Shakespeare's plays 1-18, frozen,
    with a 16-vector prompt tuned federatedly on plays 19-26, one play a client (8 clients, all
    each round, AdamW). Personal accuracy: next-character accuracy of each client's model on a
    tenth of its own sequences."""
    import tempfile
    from pathlib import Path

    from koinon.config import Config
    from koinon.experiment.pretrain import pretrain

    data = {"data.name": "shakespeare", "data.partition": "natural", "data.test_fraction": 0.1, "data.seq_len": 32}
    model = {"model.name": "char_transformer", "model.dim": 64, "model.layers": 2, "model.heads": 4}
    base = Path(tempfile.mkdtemp(prefix="koinon-pfedpg-")) / "charlm.safetensors"
    start = time.perf_counter()
    pretrain(Config().with_overrides({**data, **model, "data.plays": 18, "data.num_clients": 6,
                                      "client.optimizer": "adamw", "client.lr": 0.003, "client.batch_size": 32,
                                      "client.steps": 30 if quick else 250, "server.rounds": 4}), base)
    rounds = 2 if quick else 10
    print(f"\nprompts: char transformer pretrained on plays 1-18 ({time.perf_counter() - start:.0f} s), frozen; "
          f"a 16-vector prompt tuned on plays 19-26, 8 clients (one play each), {rounds} rounds of 20 AdamW steps, "
          f"{seeds} seed(s); next-character accuracy in %")
    print(f"{'method':<10} {'personal mean':>13} {'p10':>6} {'worst':>6} {'global':>7} {'MB':>7} {'wall s':>7}")
    for method, options in (("fedavg", {}), ("finetune", {"adapt_steps": 20}), ("pfedpg", METHODS["pfedpg"])):
        runs = []
        for seed in range(seeds):
            cfg = Config().with_overrides({
                **data, **model, "seed": seed, "data.skip_plays": 18, "data.plays": 8, "data.num_clients": 8,
                "data.client_test_fraction": 0.1, "model.init": str(base), "model.peft": {"name": "prompt", "tokens": 16},
                "client.algorithm": method, **{f"client.{k}": v for k, v in options.items()}, "client.optimizer": "adamw",
                "client.lr": 0.02, "client.batch_size": 32, "client.steps": 20, "server.rounds": rounds,
                "server.clients_per_round": 8, "runtime.name": "inprocess"})
            fed = build_federation(cfg)
            t = time.perf_counter()
            r = fed.fit(rounds, eval_every=rounds)[-1]
            runs.append({**r.extra, "test": r.test_accuracy or 0.0, "wall": time.perf_counter() - t,
                         "mb": (fed.uplink_total + fed.downlink_total) / 1e6})
            fed.close()

        def avg(key: str, runs: list[dict[str, float]] = runs) -> float:
            return statistics.fmean(r.get(key, float("nan")) for r in runs)

        print(f"{method:<10} {100 * avg('personal_accuracy_mean'):>13.1f} {100 * avg('personal_accuracy_p10'):>6.1f} "
              f"{100 * avg('personal_accuracy_min'):>6.1f} {100 * avg('test'):>7.1f} {avg('mb'):>7.2f} "
              f"{avg('wall'):>7.1f}", flush=True)


if __name__ == "__main__":
    main()
