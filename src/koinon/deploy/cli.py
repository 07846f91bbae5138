"""`koinon certs`, `koinon server`, `koinon client`: argument parsing, errors as one line.

Each entry point is `function(argv) -> exit code` (see `koinon.cli`); anything a user can get
wrong raises `KoinonError`, printed as `koinon: error: ...` with exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from koinon.errors import KoinonError


def _fail(exc: KoinonError) -> int:
    print(f"koinon: error: {exc}", file=sys.stderr)
    return 2


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing a usage block and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise KoinonError(f"{self.prog}: {message}")


def certs_main(argv: list[str]) -> int:
    p = _Parser(prog="koinon certs", description=(
        "Create a CA, a server certificate and client credentials for a deployment (mutual TLS). "
        "Give each client machine ca.crt and its own clients/NAME.crt + NAME.key; keep ca.key."))
    p.add_argument("--out", required=True, help="folder for the credentials")
    p.add_argument("--clients", type=int, default=0, help="number of clients (client-0 .. client-N-1)")
    p.add_argument("--hosts", default="localhost,127.0.0.1",
                   help="comma-separated names/IPs clients use to reach the server (default: %(default)s)")
    p.add_argument("--add", metavar="NAME", nargs="+", help="mint more clients from the existing CA in --out")
    p.add_argument("--revoke", metavar="NAME", nargs="+",
                   help="revoke clients (the server refuses them from their next call on)")
    try:
        args = p.parse_args(argv)
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
    except KoinonError as exc:
        return _fail(exc)


def server_main(argv: list[str]) -> int:
    p = _Parser(prog="koinon server", description=(
        "Run a federation over gRPC with mutual TLS. State (SQLite + checkpoints) lives in --state: "
        "after a crash, run the same command again and the run continues where it was committed. "
        "Writes metrics.jsonl and summary.json there, like koinon run."))
    p.add_argument("config", help="experiment TOML (the [deploy] section sets deadlines and limits)")
    p.add_argument("--listen", default="127.0.0.1:7070", help="HOST:PORT (port 0 = any free port; "
                   "the port is written to STATE/server.port) (default: %(default)s)")
    p.add_argument("--certs", required=True, help="folder made by koinon certs")
    p.add_argument("--state", required=True, help="folder for the server's durable state and results")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    try:
        args = p.parse_args(argv)
        from koinon.config import load_config
        from koinon.deploy.server import serve

        cfg = load_config(args.config, args.overrides)
        summary = serve(cfg, Path(args.state), Path(args.certs), args.listen)
    except KoinonError as exc:
        return _fail(exc)
    except KeyboardInterrupt:
        print("koinon: interrupted; run the same command to continue from the last committed round",
              file=sys.stderr)
        return 130
    print(f"results: {args.state}/ (metrics.jsonl, summary.json, model.safetensors, state.db)")
    print(f"summary: {summary['rounds']} rounds, final accuracy {summary['final_accuracy']:.4f} "
          f"(best {summary['best_accuracy']:.4f} at round {summary['best_round']}), "
          f"uplink {summary['uplink_bytes_total'] / 1e6:.2f} MB, model sha256 {summary['model_sha256'][:16]}")
    return 0


def client_main(argv: list[str]) -> int:
    p = _Parser(prog="koinon client", description=(
        "Join a federation server with local data; trains when sampled, reconnects with backoff."))
    p.add_argument("--server", required=True, help="HOST:PORT of koinon server")
    p.add_argument("--certs", required=True,
                   help="folder with ca.crt and this client's NAME.crt/NAME.key (or clients/NAME.*)")
    p.add_argument("--id", required=True, dest="name", help="client name (its certificate's name)")
    p.add_argument("--data", required=True, help="partition:INDEX (that partition of the server config's "
                   "dataset) or module:function (returns a koinon Dataset of your own data)")
    p.add_argument("--state", help="folder for codec/algorithm state (default: client-state/ID)")
    p.add_argument("--give-up", type=float, default=120.0, metavar="SECONDS",
                   help="exit after this long without reaching the server (default: %(default)s)")
    try:
        args = p.parse_args(argv)
        from koinon.deploy.certs import client_credentials
        from koinon.deploy.client import DataSpec, run_client

        spec = DataSpec.parse(args.data)
        creds = client_credentials(Path(args.certs), args.name)
        state = Path(args.state or Path("client-state") / args.name)
        return run_client(args.server, creds, args.name, spec, state, give_up_s=args.give_up)
    except KoinonError as exc:
        return _fail(exc)
    except KeyboardInterrupt:
        return 130
