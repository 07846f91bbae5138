"""`koinon` command line: `run` an experiment from TOML, `list` the registered components.

Every user error ends as one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from koinon.errors import KoinonError

if TYPE_CHECKING:
    from koinon.registry import Registry


def _keys_epilog() -> str:
    from koinon.config import describe_keys

    lines = ["config keys (TOML section.key = default; component sections also take the",
             "component's own options, see `koinon list`):"]
    lines += [f"  {key} = {value!r}" for key, value in describe_keys()]
    lines += ["", "example: koinon run examples/demo.toml --set server.rounds=5 --set client.lr=0.1"]
    return "\n".join(lines)


# Commands with their own parsers, in their own modules (imported only when used).
# Each is `function(argv) -> exit code`, argv without the command name.
_DELEGATED = {
    "robustness": ("koinon.experiment.robustness", "main"),
    "certs": ("koinon.deploy.cli", "certs_main"),
    "server": ("koinon.deploy.cli", "server_main"),
    "client": ("koinon.deploy.cli", "client_main"),
    "launch": ("koinon.islands.cli", "launch_main"),
}
_DELEGATED_HELP = {
    "certs": "create a CA, a server certificate and client credentials (koinon certs --help)",
    "server": "run a federation server over gRPC with TLS (koinon server --help)",
    "client": "join a federation server with local data (koinon client --help)",
    "launch": "start DiLoCo worker processes over torch.distributed (koinon launch --help)",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="koinon", description="Federated learning that runs fast and for real.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run", help="run an experiment described by a TOML file",
        epilog=_keys_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("config", nargs="?", help="experiment TOML file")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set server.rounds=5 (repeatable)")
    run.add_argument("--out", help="output folder (default: runs/<config name>)")
    run.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    run.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    sub.add_parser("list", help="list every registered component with a one-line description")
    sub.add_parser("robustness", add_help=False,
                   help="aggregator x attack x fraction accuracy matrix (koinon robustness --help)")
    for name, text in _DELEGATED_HELP.items():
        sub.add_parser(name, add_help=False, help=text)
    return p


def _list() -> None:
    import koinon.aggregate
    import koinon.compress
    import koinon.runtime  # noqa: F401
    from koinon.aggregate import AGGREGATORS, PRE_AGGREGATORS
    from koinon.attacks import ATTACKS
    from koinon.clients import CLIENT_ALGORITHMS
    from koinon.compress import CODECS
    from koinon.data import DATASETS, PARTITIONERS
    from koinon.models import MODELS
    from koinon.runtime import RUNTIMES
    from koinon.server import SAMPLERS, SERVER_OPTIMIZERS
    from koinon.topology import TOPOLOGIES

    families: list[tuple[str, Registry[Any]]] = [
        ("datasets (data.name)", DATASETS), ("partitions (data.partition)", PARTITIONERS),
        ("models (model.name)", MODELS), ("client algorithms (client.algorithm)", CLIENT_ALGORITHMS),
        ("server optimizers (server.optimizer)", SERVER_OPTIMIZERS), ("samplers (server.sampler)", SAMPLERS),
        ("codecs (codec.name, downlink.name)", CODECS), ("aggregators (aggregator.name)", AGGREGATORS),
        ("pre-aggregation steps (aggregator.name = \"step+rule\", e.g. nnm+trimmed_mean)", PRE_AGGREGATORS),
        ("runtimes (runtime.name)", RUNTIMES), ("attacks (attack.name)", ATTACKS),
        ("graphs (topology.graph, with topology.name = \"gossip\")", TOPOLOGIES),
    ]
    for title, registry in families:
        print(title)
        width = max(len(n) for n in registry.names())
        for name, desc in registry.describe():
            opts = {k: v for k, v in registry.options(name).items()
                    if k not in ("layout", "seed", "test_fraction", "num_clients", "input_shape",
                                 "num_classes", "labels", "rng", "groups", "num_byzantine", "num_nodes")}
            extra = f"  [{', '.join(f'{k}={v!r}' for k, v in opts.items())}]" if opts else ""
            print(f"  {name:<{width}}  {desc}{extra}")
        print()


def _run(args: argparse.Namespace) -> None:
    from koinon.experiment import load_config, resume_experiment, run_experiment

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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in _DELEGATED:  # its own parser, e.g. koinon robustness CONFIG.toml [...]
        import importlib

        module, function = _DELEGATED[argv[0]]
        return int(getattr(importlib.import_module(module), function)(argv[1:]))
    args = _parser().parse_args(argv)
    try:
        if args.command == "list":
            _list()
        else:
            _run(args)
    except KoinonError as exc:
        print(f"koinon: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        where = args.resume or getattr(args, "out", None) or "the run folder"
        print(f"koinon: interrupted; continue with: koinon run --resume {where}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
