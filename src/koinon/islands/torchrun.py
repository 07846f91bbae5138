"""The worker processes under torchrun: `torchrun --nproc-per-node M -m koinon.islands.worker
CONFIG.toml`, the same job as `koinon launch --workers M CONFIG.toml`.

torchrun starts the processes and tells each RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT. We map them onto `koinon launch`'s setup, not onto a second protocol: rank r is
worker r, all control traffic goes through one TCPStore, and rank 0 also does the launcher's
part: it checks the config (one-line error, served to every rank), makes the run folder, serves
the config through the store, runs the `Coordinator` in a thread and, once every rank is done,
writes summary.json. The store is torchrun's own agent store at MASTER_ADDR:MASTER_PORT when
torchrun serves one (TORCHELASTIC_USE_AGENT_STORE=True, its default; the port is then taken, so
we cannot host ours there), under a prefix of the run id and restart count so that a restarted
group never reads a stale key; otherwise (the variables set by hand or another launcher) rank 0
hosts the TCPStore on MASTER_PORT.

What torchrun does not give is the fault tolerance of `koinon launch`: when a worker dies,
torchrun stops the whole group (and restarts it from step 0 with --max-restarts), so dropping
a dead worker and joining a new one mid-run stay `koinon launch`'s. Here the coordinator counts
a worker as gone when it has said so (`exit/{id}`) or stayed silent past `--timeout`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from torch.distributed import PrefixStore, Store, TCPStore

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from koinon.config import Config, load_config
from koinon.errors import KoinonError
from koinon.islands.cli import prepare_run, summarize
from koinon.islands.dist import DistExchange, Link
from koinon.islands.membership import Coordinator, MembershipTimeout, connect, wait_key
from koinon.islands.process import train

REQUIRED = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
HOW = ("start the workers with torchrun --nproc-per-node M -m koinon.islands.worker CONFIG.toml, "
       "or with koinon launch --workers M CONFIG.toml")


@dataclass(frozen=True)
class TorchrunEnv:
    """What torchrun tells each process, checked."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    agent_store: bool  # torchrun serves its TCPStore at MASTER_ADDR:MASTER_PORT
    run_id: str
    restart: int

    @staticmethod
    def from_environ(env: Mapping[str, str]) -> TorchrunEnv:
        """One-line KoinonError naming the variable that is missing or inconsistent."""
        missing = [k for k in REQUIRED if not env.get(k, "").strip()]
        if missing:
            raise KoinonError(f"no --store and no torchrun environment ({', '.join(missing)} "
                              f"not set): {HOW}")
        rank, world, port = (_int(env, k) for k in ("RANK", "WORLD_SIZE", "MASTER_PORT"))
        local = _int(env, "LOCAL_RANK") if env.get("LOCAL_RANK") else rank
        if world < 1:
            raise KoinonError(f"WORLD_SIZE = {world}: must be >= 1")
        if not 0 <= rank < world:
            raise KoinonError(f"RANK = {rank}: must be in [0, WORLD_SIZE = {world})")
        if not 1 <= port <= 65535:
            raise KoinonError(f"MASTER_PORT = {port}: must be in [1, 65535]")
        if not 0 <= local <= rank:
            raise KoinonError(f"LOCAL_RANK = {local}: must be in [0, RANK = {rank}]")
        if env.get("LOCAL_WORLD_SIZE"):
            local_world = _int(env, "LOCAL_WORLD_SIZE")
            if not local < local_world <= world:
                raise KoinonError(f"LOCAL_WORLD_SIZE = {local_world}: must be in "
                                  f"(LOCAL_RANK = {local}, WORLD_SIZE = {world}]")
        restart = _int(env, "TORCHELASTIC_RESTART_COUNT") if env.get(
            "TORCHELASTIC_RESTART_COUNT") else 0
        return TorchrunEnv(rank, world, local, env["MASTER_ADDR"].strip(), port,
                           env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true",
                           env.get("TORCHELASTIC_RUN_ID", "none"), restart)


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise KoinonError(f"{key} = {env[key]!r}: must be an integer") from None


def open_store(env: TorchrunEnv, timeout_s: float, host: bool = False) -> Store:
    """A client of the run's store; `host`: rank 0 creates it (when torchrun serves none)."""
    if env.agent_store:
        base: Store = connect(env.master_addr, env.master_port, timeout_s, "torchrun agent store")
        return PrefixStore(f"koinon/{env.run_id}/{env.restart}", base)
    if not host:
        return connect(env.master_addr, env.master_port, timeout_s, "rank 0 store")
    try:
        return TCPStore(env.master_addr, env.master_port, is_master=True,
                        wait_for_workers=False, timeout=timedelta(seconds=timeout_s))
    except RuntimeError as exc:
        raise KoinonError(f"rank 0 cannot host the store at {env.master_addr}:{env.master_port} "
                          f"({type(exc).__name__}): is MASTER_PORT in use?") from None


def run_under_torchrun(args: argparse.Namespace, link: Link) -> int:
    """This process's part of the job: rank 0 hosts, every rank trains."""
    env = TorchrunEnv.from_environ(os.environ)
    config = args.config_path or args.config
    if not config:
        raise KoinonError(f"no CONFIG.toml given: {HOW}")
    if args.join or args.id >= 0:
        raise KoinonError("--join / --id: under torchrun the worker id is RANK and nobody "
                          "joins mid-run (use koinon launch for that)")
    out = Path(args.out or Path("runs") / (Path(config).stem + "-torchrun"))
    timeout = args.timeout
    store = open_store(env, timeout, host=env.rank == 0)
    coordinator: Coordinator | None = None
    thread: threading.Thread | None = None
    started = time.monotonic()
    if env.rank == 0:
        try:
            cfg = load_config(config, args.overrides)
            # A torchrun restart (--max-restarts) starts the group again from step 0 in the
            # same folder, which its first attempt filled: that is not a user's old run.
            prepare_run(cfg, env.world_size, out, args.overwrite or env.restart > 0, "WORLD_SIZE")
        except KoinonError as exc:
            store.set("abort", str(exc))  # the other ranks print it too, and stop
            raise
        text = cfg.to_toml()
        cfg = Config.from_dict(tomllib.loads(text))  # what every other rank trains with
        store.add("next_id", env.world_size)
        store.set("config", text)
        coord_store = open_store(env, timeout)  # its own client: it polls all the time

        def alive(w: int) -> bool:
            return not coord_store.check([f"exit/{w}"])

        coordinator = Coordinator(coord_store, list(range(env.world_size)), alive, timeout)
        thread = threading.Thread(target=coordinator.run, name="koinon-coordinator", daemon=True)
        thread.start()
    else:
        cfg = _config_from_rank0(store, timeout)
        out.mkdir(parents=True, exist_ok=True)
    exchange = DistExchange(store, env.rank, timeout, overlap=not args.blocking, link=link)
    try:
        final = train(cfg, store, env.rank, out, exchange, crash_at_step=args.crash_at_step)
        store.set(f"final/{env.rank}", json.dumps(final))
    finally:
        store.set(f"exit/{env.rank}", "1")
    if coordinator is None or thread is None:
        return 0
    return _finish_rank0(store, env, out, coordinator, thread, timeout, started)


def _config_from_rank0(store: Store, timeout_s: float) -> Config:
    def aborted() -> bool:
        return store.check(["abort"])

    try:
        raw = wait_key(store, "config", 4 * timeout_s, abort=aborted)
    except MembershipTimeout:
        if aborted():
            raise KoinonError(f"rank 0 stopped the run: {store.get('abort').decode()}") from None
        raise KoinonError(f"rank 0 served no config within {4 * timeout_s:.0f} s") from None
    return Config.from_dict(tomllib.loads(raw.decode()))


def _finish_rank0(store: Store, env: TorchrunEnv, out: Path, coordinator: Coordinator,
                  thread: threading.Thread, timeout_s: float, started: float) -> int:
    """Wait for every rank (the store may live in this process), then write summary.json."""
    deadline = time.monotonic() + 4 * timeout_s
    while time.monotonic() < deadline:
        if all(store.check([f"exit/{w}"]) for w in range(env.world_size)):
            break
        time.sleep(0.01)
    thread.join(timeout=4 * timeout_s)
    coordinator.stop()
    finals = {w: json.loads(store.get(f"final/{w}")) for w in range(env.world_size)
              if store.check([f"final/{w}"])}
    codes: dict[int, int | None] = {w: 0 if w in finals else 1 for w in range(env.world_size)}
    summary = summarize(out, codes, coordinator, time.monotonic() - started, finals)
    print(f"results: {out}/ (summary.json, metrics.jsonl, worker-*.jsonl)")
    print(f"survivors {summary['survivors']}, identical parameters: "
          f"{summary['identical_params']}, final validation loss {summary['final_test_loss']}, "
          f"{summary['sync_events']} sync events, {summary['retries']} retries", flush=True)
    ok = summary["survivors"] and summary["identical_params"] and not summary["coordinator_error"]
    return 0 if ok else 1
