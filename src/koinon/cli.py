"""The `koinon` command line: every subcommand, its arguments and its handler, in one table.

`COMMANDS` lists them (`koinon --help` shows them all); a handler is a thin driver that calls
the package (`run_experiment`, `serve`, `run_client`, `launch`, ...) and prints what it
returned. `main` is the only place that turns a failure into output: a `KoinonError`, and any
misuse of the command line, ends as one line `koinon: error: ...` on stderr with exit code 2,
never a traceback; Ctrl-C ends with code 130 and, where the command can continue, how.
`python -m koinon.islands.worker` (how `koinon launch` and torchrun start a worker process) is
`koinon worker`.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from koinon.errors import ConfigError, KoinonError

if TYPE_CHECKING:
    from koinon.registry import Registry

T = TypeVar("T")
Handler = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class Command:
    """One `koinon NAME` subcommand."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    handler: Handler
    epilog: Callable[[], str] | None = None  # built only when the parser is
    # Ctrl-C: what to tell the user besides "interrupted" (how to continue), from the arguments
    interrupted: Callable[[argparse.Namespace], str] | None = None
    # Failures other than KoinonError that end in one line: exception -> (exit code, text)
    failure: Callable[[BaseException], tuple[int, str] | None] | None = None
    prefix: str = "koinon"  # who speaks in the error line


class _Parser(argparse.ArgumentParser):
    """argparse that raises a KoinonError instead of printing a usage block and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise KoinonError(message if self.prog == "koinon" else f"{self.prog}: {message}")


def _arg_type(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse `type` from a package parser: its KoinonError names the flag."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except KoinonError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


def _add_set(p: argparse.ArgumentParser, text: str = "override a config key (repeatable)") -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=text)


# ---------------------------------------------------------------- koinon run / list


def _run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="experiment TOML file")
    _add_set(p, "override a config key, e.g. --set server.rounds=5 (repeatable)")
    p.add_argument("--out", help="output folder (default: runs/<config name>)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _keys_epilog() -> str:
    from koinon.config import NAME_KEYS, describe_keys
    from koinon.topology.diloco.build import SPECS

    lines = ["config keys (TOML section.key = default):"]
    lines += [f"  {key} = {value!r}" for key, value in describe_keys()]
    lines += ["", '[diloco] keys (only with topology.name = "diloco"; see koinon.topology.diloco.IslandsSpec):']
    lines += [f"  diloco.{key} = {value!r}" for key, value in SPECS.options("diloco").items()]
    from dataclasses import fields

    from koinon.topology.experts.options import DistillOptions, ExpertsOptions

    for name, kind in (("experts", ExpertsOptions), ("distillation", DistillOptions)):
        lines += ["", f'[topology] keys of topology.name = "{name}":']
        lines += [f"  topology.{f.name} = {getattr(kind(), f.name)!r}" for f in fields(kind)]
    named = ", ".join(f"[{s}] ({s}.{k})" for s, k in NAME_KEYS.items())
    lines += [""] + textwrap.wrap(
        f"component options: besides the keys above, these sections take the options of the "
        f"component they name: {named}; gossip graphs take theirs in topology.options. "
        "`koinon list` shows every component with its options and their defaults. A codec "
        "wrapper (ef, ef21, econtrol, zstd) needs inner = the codec it wraps; it has no default. "
        "A run's config.toml spells out every key and option it ran with, defaults included.", 92)
    lines += ["", "example: koinon run examples/demo.toml --set server.rounds=5 --set client.lr=0.1"]
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    from koinon.experiment import load_config, resume_experiment, run_experiment
    from koinon.records.plots import start_plot_worker

    start_plot_worker()  # matplotlib is imported on another core while the run trains

    if args.resume:
        if args.config or args.out:
            raise KoinonError("--resume DIR takes neither a CONFIG nor --out (the folder holds both)")
        summary = resume_experiment(args.resume, args.overrides, progress=not args.quiet)
        out = Path(args.resume)
    else:
        if not args.config:
            raise KoinonError("koinon run needs a CONFIG.toml (or --resume DIR)")
        cfg = load_config(args.config, args.overrides)
        out = Path(args.out or Path("runs") / Path(args.config).stem)
        summary = run_experiment(cfg, out, overwrite=args.overwrite, progress=not args.quiet)
    print(f"results: {out}/ (metrics.jsonl, summary.json, accuracy.png, model.safetensors)")
    print(
        f"summary: {summary['rounds']} rounds, final accuracy {summary['final_accuracy']:.4f} "
        f"(best {summary['best_accuracy']:.4f} at round {summary['best_round']}), "
        f"uplink {summary['uplink_bytes_total'] / 1e6:.2f} MB, downlink "
        f"{summary['downlink_bytes_total'] / 1e6:.2f} MB, {summary['wall_s']:.1f} s"
    )
    return 0


def _run_interrupted(args: argparse.Namespace) -> str:
    return f"continue with: koinon run --resume {args.resume or args.out or 'the run folder'}"


def _list(args: argparse.Namespace) -> int:
    import koinon.aggregate
    import koinon.compress
    import koinon.runtime  # noqa: F401
    from koinon.aggregate import AGGREGATORS, PRE_AGGREGATORS
    from koinon.attacks import ATTACKS
    from koinon.clients import CLIENT_ALGORITHMS
    from koinon.compress import CODECS
    from koinon.data import DATASETS, PARTITIONERS
    from koinon.ledger import CONTRIBUTIONS
    from koinon.models import MODELS
    from koinon.models.tuning import PEFT_METHODS
    from koinon.runtime import RUNTIMES
    from koinon.schedule import SCHEDULES
    from koinon.server import SAMPLERS, SERVER_OPTIMIZERS
    from koinon.topology import GRAPHS, TOPOLOGIES

    families: list[tuple[str, Registry[Any]]] = [
        ("topologies (topology.name)", TOPOLOGIES),
        ("datasets (data.name)", DATASETS), ("partitions (data.partition)", PARTITIONERS),
        ("models (model.name)", MODELS),
        ("parameter-efficient fine-tuning (model.peft, of a model.init start)", PEFT_METHODS),
        ("client algorithms (client.algorithm)", CLIENT_ALGORITHMS),
        ("server optimizers (server.optimizer)", SERVER_OPTIMIZERS), ("samplers (server.sampler)", SAMPLERS),
        ("codecs (codec.name, downlink.name)", CODECS), ("aggregators (aggregator.name)", AGGREGATORS),
        ("pre-aggregation steps (aggregator.name = \"step+rule\", e.g. nnm+trimmed_mean)", PRE_AGGREGATORS),
        ("runtimes (runtime.name)", RUNTIMES), ("attacks (attack.name)", ATTACKS),
        ("graphs (topology.graph, with topology.name = \"gossip\")", GRAPHS),
        ("schedules (schedule.name, over [clock] simulated time)", SCHEDULES),
        ("contribution methods (ledger.contribution)", CONTRIBUTIONS),
    ]
    for title, registry in families:
        print(title)
        width = max(len(n) for n in registry.names())
        for name, desc in registry.describe():
            opts = {k: v for k, v in registry.options(name).items()
                    if k not in ("layout", "seed", "test_fraction", "num_clients", "input_shape",
                                 "num_classes", "labels", "rng", "groups", "num_byzantine", "num_nodes", "module")}
            extra = f"  [{', '.join(f'{k}={v!r}' for k, v in opts.items())}]" if opts else ""
            print(f"  {name:<{width}}  {desc}{extra}")
        print()
    return 0


# ---------------------------------------------------------------- koinon robustness


def _robustness_arguments(p: argparse.ArgumentParser) -> None:
    from koinon.experiment.robustness import parse_names, parse_numbers, parse_seeds

    names, numbers = _arg_type(parse_names), _arg_type(parse_numbers)
    p.add_argument("config", help="base experiment TOML (its data, model, client and server sections)")
    p.add_argument("--aggregators", type=names,
                   help="comma-separated rules, each optionally with options: fltrust:root_steps=20",
                   default=parse_names("mean,median,trimmed_mean,krum,geometric_median,centered_clipping"))
    p.add_argument("--attacks", type=names, default=parse_names("alie,ipm,sign_flip,label_flip"))
    p.add_argument("--fractions", type=numbers, default=parse_numbers("0,0.1,0.2,0.3,0.4"))
    p.add_argument("--alphas", type=numbers, default=parse_numbers("0.5,0.1"))
    p.add_argument("--rounds", type=int, help="rounds per run (default: the config's server.rounds)")
    p.add_argument("--seeds", type=_arg_type(parse_seeds),
                   help="comma-separated seeds (default: the config's seed); with several, each runs "
                        "the matrix into OUT/seed<k>/ and the tables show per-cell mean ± std")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (cells are independent)")
    p.add_argument("--out", default="runs/robustness", help="output folder (default: runs/robustness)")
    p.add_argument("--quiet", action="store_true", help="no line per finished cell")


def _robustness(args: argparse.Namespace) -> int:
    from koinon.config import load_config
    from koinon.experiment.robustness import goal_report, markdown, run_seeds

    cfg = load_config(args.config)
    seeds = args.seeds or [cfg.seed]
    per_seed, results = run_seeds(cfg, seeds, args.aggregators, args.attacks, args.fractions,
                                  args.alphas, args.rounds or cfg.server.rounds, Path(args.out),
                                  progress=not args.quiet, jobs=max(1, args.jobs))
    print(markdown(results))
    if len(seeds) > 1:
        print(goal_report(results, per_seed))
    print(f"results: {args.out}/ (robustness.json, robustness.md, robustness_alpha*.png)")
    return 0


def _robustness_interrupted(args: argparse.Namespace) -> str:
    return f"the cells that finished are in {args.out}/robustness.json"


# ---------------------------------------------------------------- koinon certs / server / client


def _certs_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="folder for the credentials")
    p.add_argument("--clients", type=int, default=0, help="number of clients (client-0 .. client-N-1)")
    p.add_argument("--hosts", default="localhost,127.0.0.1",
                   help="comma-separated names/IPs clients use to reach the server (default: %(default)s)")
    p.add_argument("--add", metavar="NAME", nargs="+", help="mint more clients from the existing CA in --out")
    p.add_argument("--revoke", metavar="NAME", nargs="+",
                   help="revoke clients (the server refuses them from their next call on)")


def _certs(args: argparse.Namespace) -> int:
    from koinon.deploy.certs import add_clients, create_certs, revoke

    out = Path(args.out)
    if args.revoke:
        revoke(out, args.revoke)
        print(f"revoked: {', '.join(args.revoke)} (listed in {out / 'revoked.txt'})")
    elif args.add:
        names = add_clients(out, args.add)
        print(f"clients: {', '.join(names)} in {out / 'clients'}")
    else:
        hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
        names = create_certs(out, args.clients, hosts)
        print(f"CA, server certificate (for {', '.join(hosts)}) and {len(names)} clients in {out}/")
        if names:
            print(f"clients: {names[0]} .. {names[-1]} (clients/NAME.crt, clients/NAME.key)")
    return 0


def _server_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment TOML (the [deploy] section sets deadlines and limits)")
    p.add_argument("--listen", default="127.0.0.1:7070", help="HOST:PORT (port 0 = any free port; "
                   "the port is written to STATE/server.port) (default: %(default)s)")
    p.add_argument("--certs", required=True, help="folder made by koinon certs")
    p.add_argument("--state", required=True, help="folder for the server's durable state and results")
    _add_set(p)


def _server(args: argparse.Namespace) -> int:
    from koinon.config import load_config
    from koinon.deploy.server import serve

    cfg = load_config(args.config, args.overrides)
    summary = serve(cfg, Path(args.state), Path(args.certs), args.listen)
    print(f"results: {args.state}/ (metrics.jsonl, summary.json, model.safetensors, state.db)")
    print(f"summary: {summary['rounds']} rounds, final accuracy {summary['final_accuracy']:.4f} "
          f"(best {summary['best_accuracy']:.4f} at round {summary['best_round']}), "
          f"uplink {summary['uplink_bytes_total'] / 1e6:.2f} MB, model sha256 {summary['model_sha256'][:16]}")
    return 0


def _client_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", required=True, help="HOST:PORT of koinon server")
    p.add_argument("--certs", required=True,
                   help="folder with ca.crt and this client's NAME.crt/NAME.key (or clients/NAME.*)")
    p.add_argument("--id", required=True, dest="name", help="client name (its certificate's name)")
    p.add_argument("--data", required=True, help="partition:INDEX (that partition of the server config's "
                   "dataset) or module:function (returns a koinon Dataset of your own data)")
    p.add_argument("--state", help="folder for codec/algorithm state (default: client-state/ID)")
    p.add_argument("--give-up", type=float, default=120.0, metavar="SECONDS",
                   help="exit after this long without reaching the server (default: %(default)s)")


def _client(args: argparse.Namespace) -> int:
    from koinon.deploy.certs import client_credentials
    from koinon.deploy.client import DataSpec, run_client

    spec = DataSpec.parse(args.data)
    creds = client_credentials(Path(args.certs), args.name)
    state = Path(args.state or Path("client-state") / args.name)
    return run_client(args.server, creds, args.name, spec, state, give_up_s=args.give_up)


# ---------------------------------------------------------------- koinon launch / worker


def _crash(item: str) -> tuple[int, int]:
    worker, sep, step = item.partition("@")
    if not sep or not worker.isdigit() or not step.isdigit() or int(step) < 1:
        raise argparse.ArgumentTypeError(f"expected WORKER@STEP, e.g. --crash 1@30; got {item!r}")
    return int(worker), int(step)


def _launch_arguments(p: argparse.ArgumentParser) -> None:
    from koinon.islands.dist import add_link_options

    p.add_argument("config", nargs="?", help="TOML config with topology.name = 'diloco' "
                   "(with --join: not needed, the running job's config is used)")
    p.add_argument("--workers", type=int, default=0, help="number of worker processes M")
    p.add_argument("--out", help="run folder (default runs/<config name>-launch)")
    _add_set(p)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--host", default="127.0.0.1", help="address the store listens on")
    p.add_argument("--port", type=int, default=0, help="store port (0: an ephemeral port)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds any wait may take before a silent worker is dropped")
    p.add_argument("--crash", type=_crash, action="append", default=[], metavar="W@STEP",
                   help="fault injection: kill worker W at inner step STEP")
    p.add_argument("--join-at", type=int, action="append", default=[], metavar="S",
                   help="start one new worker when sync event S begins")
    p.add_argument("--join", metavar="HOST:PORT", help="join a running launch as a new worker")
    add_link_options(p)


def _launch(args: argparse.Namespace) -> int:
    if args.join:  # this process becomes one more worker of the running launch
        folder = Path(args.out or Path("runs") / "diloco-join")
        folder.mkdir(parents=True, exist_ok=True)
        link = ["--link-latency-ms", str(args.link_latency_ms), "--link-mbps", str(args.link_mbps)]
        return main(["worker", "--store", args.join, "--config", str(folder / "config.toml"),
                     "--out", str(folder), "--join", "--timeout", str(args.timeout), *link,
                     *(["--blocking"] if args.blocking else [])])
    if not args.config:
        raise ConfigError("koinon launch needs a CONFIG.toml (or --join HOST:PORT)")
    from koinon.config import load_config
    from koinon.islands.cli import launch

    cfg = load_config(args.config, args.overrides)
    out = args.out or str(Path("runs") / (Path(args.config).stem + "-launch"))
    summary = launch(cfg, args.workers, out, host=args.host, port=args.port,
                     timeout_s=args.timeout, crashes=dict(args.crash), join_at=args.join_at,
                     overwrite=args.overwrite, blocking=args.blocking,
                     link_latency_ms=args.link_latency_ms, link_mbps=args.link_mbps,
                     on_start=lambda a: print(f"store {a}: more workers can join with "
                                              f"koinon launch --join {a} {args.config}", flush=True))
    print(f"results: {out}/ (summary.json, metrics.jsonl, worker-*.jsonl)")
    print(f"survivors {summary['survivors']}, identical parameters: {summary['identical_params']}, "
          f"final validation loss {summary['final_test_loss']}, "
          f"{summary['sync_events']} sync events, {summary['retries']} retries")
    ok = summary["survivors"] and summary["identical_params"] and not summary["coordinator_error"]
    return 0 if ok else 1


def _worker_arguments(p: argparse.ArgumentParser) -> None:
    from koinon.islands.dist import add_link_options

    p.add_argument("config_path", nargs="?", metavar="CONFIG",
                   help="TOML config (under torchrun; rank 0 checks it and serves it to all)")
    p.add_argument("--store", help="HOST:PORT of a koinon launch's TCPStore (not under torchrun)")
    p.add_argument("--config", help="TOML config (with --store)")
    p.add_argument("--out", help="run folder (torchrun default: runs/<config name>-torchrun)")
    _add_set(p, "config override (torchrun)")
    p.add_argument("--overwrite", action="store_true", help="reuse a non-empty run folder")
    p.add_argument("--id", type=int, default=-1, help="worker id (-1: ask the store for one)")
    p.add_argument("--join", action="store_true", help="join a running job (state from a peer)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds any wait may take")
    p.add_argument("--crash-at-step", type=int, default=0, help="fault injection: SIGKILL self")
    add_link_options(p)


def _worker(args: argparse.Namespace) -> int:
    from koinon.islands.worker import run_worker

    return run_worker(args)


def _worker_failure(exc: BaseException) -> tuple[int, str] | None:
    """Exit 3: this worker was dropped from the quorum; 4: the store or the coordinator went
    away (rank 0 or the launcher died), one line rather than a C++ trace."""
    from torch.distributed import DistError

    from koinon.islands.dist import Dropped
    from koinon.islands.membership import MembershipTimeout

    if isinstance(exc, Dropped):
        return 3, str(exc)
    if isinstance(exc, (DistError, MembershipTimeout)):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return 4, f"lost the run's store or coordinator: {first}"
    return None


# ---------------------------------------------------------------- koinon predict


def _predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="folder of a finished experts run (topology.name = 'experts')")
    p.add_argument("--exclude", type=int, action="append", default=[], metavar="OWNER",
                   help="opt an owner out (its client index; repeatable): its expert is dropped, no retraining")
    p.add_argument("--input", help="inputs to predict (.npy or .pt tensor); default: report the run's test metrics")
    p.add_argument("--output", help="where --input's predicted classes go (.npy)")
    p.add_argument("--sade", action="store_true",
                   help="weight the experts per domain by SADE's test-time self-supervision (no labels)")


def _predict(args: argparse.Namespace) -> int:
    from koinon.topology.experts import load_experts, opt_out_report

    if bool(args.input) != bool(args.output):
        raise KoinonError("koinon predict: --input and --output go together")
    run = load_experts(args.run)
    if args.input:
        import numpy as np
        import torch

        path = Path(args.input)
        if not path.is_file():
            raise KoinonError(f"--input {path}: no such file")
        x = torch.load(path) if path.suffix == ".pt" else torch.from_numpy(np.load(path))
        expected = tuple(run.dataset.x_test.shape[1:])
        if tuple(x.shape[1:]) != expected:
            raise KoinonError(f"--input {path}: inputs of shape {list(x.shape[1:])}, the run's model takes {list(expected)}")
        x = x.to(run.dataset.x_test.dtype)
        weights = run.sade(x, args.exclude) if args.sade else None  # the inputs as one target domain
        labels = run.predict(x, args.exclude, weights).argmax(dim=-1)
        np.save(args.output, labels.numpy())
        print(f"predicted {len(labels)} inputs without owners {args.exclude or 'none'}: {args.output}")
        return 0
    report = opt_out_report(run, args.exclude, sade=args.sade)
    full, without = report["all"], report["without"]
    print(f"owners excluded: {', '.join(map(str, report['exclude'])) or 'none'}"
          + (" (SADE weights per domain)" if args.sade else ""))
    print(f"{'domain':>8} {'accuracy (all)':>15} {'accuracy (without)':>19} {'change':>8}")
    for d, (a, b) in enumerate(zip(full["domain_accuracy"], without["domain_accuracy"])):
        mark = " (excluded owner's domain)" if d in report["exclude"] else ""
        print(f"{d:>8} {a:>15.4f} {b:>19.4f} {b - a:>+8.4f}{mark}")
    print(f"{'overall':>8} {full['accuracy']:>15.4f} {without['accuracy']:>19.4f} "
          f"{without['accuracy'] - full['accuracy']:>+8.4f}")
    return 0


# ---------------------------------------------------------------- koinon verify


def _verify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="a run folder written with a [ledger] section")
    p.add_argument("--receipt", type=int, nargs=2, metavar=("ROUND", "CLIENT"),
                   help="instead, print a client's receipt with its inclusion and consistency proofs (JSON)")
    p.add_argument("--server-key", metavar="HEX",
                   help="the expected server public key (hex, from the run's owner): the log must be signed by it")
    p.add_argument("--ca", metavar="CA.pem", type=Path,
                   help="the run's CA: check that it issued every client certificate in the receipts")


def _verify(args: argparse.Namespace) -> int:
    from koinon.ledger.verify import receipt_proof, verify_run

    if args.receipt:
        import json

        proof = receipt_proof(args.run, *args.receipt)
        print(json.dumps(proof, indent=1))
        return 0 if proof["included"] and proof["prefix"] else 1

    if args.ca is not None and not args.ca.is_file():
        raise KoinonError(f"--ca {args.ca}: no such file")
    report = verify_run(args.run, server_key=args.server_key, ca=args.ca.read_bytes() if args.ca else None)
    for note in report.notes:
        print(f"note: {note}")
    if report.server_key and not report.pinned:
        print(f"note: server key {report.server_key} trusted as the log names it (unpinned: pass "
              "--server-key HEX to check it is the expected one)")
    if not report.ok:
        print(f"entry {report.failed_entry} does not verify: {report.failure} "
              f"({report.verified} of {report.entries} entries verified before it)")
        return 1
    if report.partial:
        print(f"partially verified: {report.entries} entries of {args.run} (hashes, signatures, payouts); "
              f"not checked: {report.partial}")
        return 1
    print(f"verified: all {report.entries} entries of {args.run} (hashes, signatures, aggregates, scores, payouts)")
    return 0


# ---------------------------------------------------------------- koinon pretrain


def _pretrain_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment TOML file: [data] is the public split, [model] the model")
    _add_set(p, "override a config key, e.g. --set data.plays=18 (repeatable)")
    p.add_argument("--out", required=True, metavar="PATH.safetensors", help="where to write the weights")


def _pretrain(args: argparse.Namespace) -> int:
    from koinon.experiment import load_config
    from koinon.experiment.pretrain import pretrain

    summary = pretrain(load_config(args.config, args.overrides), args.out, report=print)
    last = summary["history"][-1] if summary["history"] else {}
    print(f"wrote {summary['path']} ({summary['parameters']} values, {summary['steps']} steps, "
          f"validation loss {last.get('val_loss', float('nan')):.4f}); start a run from it with "
          f"--set model.init={summary['path']}")
    return 0


# ---------------------------------------------------------------- the table

COMMANDS: tuple[Command, ...] = (
    Command("run", "run an experiment described by a TOML file (or --resume one)",
            _run_arguments, _run, epilog=_keys_epilog, interrupted=_run_interrupted),
    Command("list", "list every registered component with a one-line description",
            lambda p: None, _list),
    Command("predict", "predict or report per-domain accuracy with a finished experts run, owners "
            "opted out with --exclude (no retraining)", _predict_arguments, _predict),
    Command("robustness", "aggregator x attack x fraction x alpha accuracy matrix, with heat maps",
            _robustness_arguments, _robustness, interrupted=_robustness_interrupted),
    Command("certs", "create a CA, a server certificate and client credentials (mutual TLS); give "
            "each client ca.crt and its own clients/NAME.crt + NAME.key, keep ca.key",
            _certs_arguments, _certs),
    Command("server", "run a federation over gRPC with mutual TLS; state (SQLite + checkpoints) "
            "lives in --state: after a crash, the same command continues from the last committed "
            "round; writes metrics.jsonl and summary.json there, like koinon run",
            _server_arguments, _server,
            interrupted=lambda args: "run the same command to continue from the last committed round"),
    Command("client", "join a federation server with local data; trains when sampled, reconnects "
            "with backoff", _client_arguments, _client),
    Command("launch", "start DiLoCo worker processes over torch.distributed on this machine and "
            "coordinate them (or --join a running launch)", _launch_arguments, _launch),
    Command("worker", "one DiLoCo worker process, as koinon launch and torchrun start it "
            "(python -m koinon.islands.worker)", _worker_arguments, _worker,
            failure=_worker_failure, prefix="koinon worker"),
    Command("verify", "replay a run's round log ([ledger]): check every hash, signature, aggregate, "
            "score and payout; names the first entry that does not verify (exit code 1)",
            _verify_arguments, _verify),
    Command("pretrain", "train a config's model centrally on its pooled training data (a public "
            "split) and write safetensors that model.init starts later runs from",
            _pretrain_arguments, _pretrain),
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="koinon", description="Federated learning that runs fast and for real.")
    sub = parser.add_subparsers(dest="name", required=True, metavar="COMMAND")
    for command in COMMANDS:
        short = command.help.split(";")[0]
        p = sub.add_parser(command.name, help=short, description=command.help,
                           epilog=command.epilog() if command.epilog else None,
                           formatter_class=argparse.RawDescriptionHelpFormatter if command.epilog
                           else argparse.HelpFormatter)
        command.add_arguments(p)
        p.set_defaults(command=command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `koinon ARGV...`; returns the exit code (0 ok, 2 user error, 130 interrupted)."""
    try:
        args, extra = build_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
        if extra:
            raise KoinonError(f"koinon {args.name}: unrecognized arguments: {' '.join(extra)}")
    except KoinonError as exc:
        print(f"koinon: error: {exc}", file=sys.stderr)
        return 2
    command: Command = args.command
    try:
        return command.handler(args)
    except KeyboardInterrupt:
        hint = command.interrupted(args) if command.interrupted else ""
        print(f"koinon: interrupted{'; ' + hint if hint else ''}", file=sys.stderr)
        return 130
    except Exception as exc:
        known = command.failure(exc) if command.failure else None
        if known is None and not isinstance(exc, KoinonError):
            raise  # a bug: the traceback is what helps
        code, text = known or (2, f"error: {exc}")
        print(f"{command.prefix}: {text}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
