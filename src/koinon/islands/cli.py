"""`koinon launch`: start M DiLoCo worker processes on this machine and coordinate them.

The launcher hosts the TCPStore (127.0.0.1 and an ephemeral port by default), runs the
`Coordinator` in a thread, starts `python -m koinon.islands.worker` processes, and when they are
done writes `summary.json`: which workers survived, whether their shared parameters are
bit-identical (one SHA-256 for all), the final validation loss, bytes exchanged and the
coordinator's log. Fault injection for tests and demos: `--crash W@STEP` kills worker W at inner
step STEP (SIGKILL, no clean-up); `--join-at S` starts a new worker when sync event S begins,
which receives the state from a live peer. `--join HOST:PORT` joins a running launch from
another shell or machine as one more worker; its final record comes back through the store, so
the summary counts it among the survivors. `--blocking` turns the workers' communication
overlap off (for comparisons); `--link-latency-ms` / `--link-mbps` emulate a slow network.

The same workers also run under torchrun (`koinon.islands.torchrun`); rank 0 then does this
module's part with `prepare_run` and `summarize`.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from torch.distributed import TCPStore

from koinon.config import Config
from koinon.errors import ConfigError, KoinonError
from koinon.files import atomic_write_text
from koinon.islands.membership import Coordinator, MembershipTimeout, wait_key
from koinon.topology.diloco.build import build_parts


def launch(
    cfg: Config, workers: int, out: str | Path, *, host: str = "127.0.0.1", port: int = 0,
    timeout_s: float = 60.0, crashes: dict[int, int] | None = None,
    join_at: list[int] | None = None, overwrite: bool = False, max_wall_s: float = 0.0,
    on_start: Callable[[str], None] | None = None, blocking: bool = False,
    link_latency_ms: float = 0.0, link_mbps: float = 0.0,
) -> dict[str, Any]:
    """Run a DiLoCo job as real processes; returns (and writes) the summary."""
    if timeout_s <= 0:
        raise ConfigError(f"--timeout = {timeout_s}: must be > 0")
    if link_latency_ms < 0 or link_mbps < 0:
        raise ConfigError(f"--link-latency-ms = {link_latency_ms}, --link-mbps = {link_mbps}: "
                          "both must be >= 0")
    crashes = crashes or {}
    for w in crashes:
        if w >= max(workers, 1):
            raise ConfigError(f"--crash {w}@...: worker ids are 0..{workers - 1}")
    out_dir = prepare_run(cfg, workers, out, overwrite, "--workers")
    store = TCPStore(host, port, is_master=True, wait_for_workers=False,
                     timeout=timedelta(seconds=timeout_s))
    store.add("next_id", workers)
    store.set("config", cfg.to_toml())  # joiners from elsewhere train with the job's config
    address = f"{host}:{store.port}"
    atomic_write_text(out_dir / "store_address", address + "\n")
    if on_start is not None:
        on_start(address)
    procs: dict[int, subprocess.Popen] = {}
    lock = threading.Lock()

    def start(worker_id: int, joining: bool) -> None:
        cmd = [sys.executable, "-m", "koinon.islands.worker", "--store", f"{host}:{store.port}",
               "--config", str(out_dir / "config.toml"), "--out", str(out_dir),
               "--id", str(worker_id), "--timeout", str(timeout_s)]
        if joining:
            cmd.append("--join")
        if worker_id in crashes:
            cmd += ["--crash-at-step", str(crashes[worker_id])]
        if blocking:
            cmd.append("--blocking")
        if link_latency_ms or link_mbps:
            cmd += ["--link-latency-ms", str(link_latency_ms), "--link-mbps", str(link_mbps)]
        logf = (out_dir / f"worker-{worker_id}.log").open("w")
        with lock:
            procs[worker_id] = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)

    def alive(worker_id: int) -> bool:
        with lock:
            proc = procs.get(worker_id)
        return proc is None or proc.poll() is None

    pending_joins = sorted(join_at or [])

    def on_sync(s: int) -> None:
        """Start the joiners due at sync event s and wait until they ask to join, so that an
        injected join lands exactly at s (a real joiner just arrives when it arrives)."""
        while pending_joins and pending_joins[0] <= s:
            pending_joins.pop(0)
            worker_id = int(store.add("next_id", 1)) - 1
            start(worker_id, joining=True)
            gone = functools.partial(_dead, alive, worker_id)
            try:
                wait_key(store, f"join/{worker_id}", timeout_s, abort=gone)
            except MembershipTimeout:
                pass  # it will be left out; the summary shows it did not survive

    started = time.monotonic()
    for w in range(workers):
        start(w, joining=False)
    coordinator = Coordinator(store, list(range(workers)), alive, timeout_s, on_sync)
    thread = threading.Thread(target=coordinator.run, daemon=True)
    thread.start()
    try:
        while True:
            with lock:
                running = [p for p in procs.values() if p.poll() is None]
            if not running and not thread.is_alive():
                break
            if not running and time.monotonic() - started > 1.0:
                coordinator.stop()
            if max_wall_s and time.monotonic() - started > max_wall_s:
                raise KoinonError(f"the launch ran past {max_wall_s:.0f} s; workers stopped")
            time.sleep(0.05)
    finally:
        coordinator.stop()
        with lock:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=10)
        thread.join(timeout=10)
    codes = {w: p.returncode for w, p in procs.items()}
    finals = read_finals(out_dir, codes)
    for w in coordinator.log.joined:
        if w not in procs:  # joined from elsewhere (koinon launch --join): its record comes by the store
            try:
                finals[w] = json.loads(wait_key(store, f"final/{w}", timeout_s))
            except MembershipTimeout:
                pass  # it did not finish: not a survivor
    return summarize(out_dir, codes, coordinator, time.monotonic() - started, finals)


def prepare_run(cfg: Config, workers: int, out: str | Path, overwrite: bool,
                workers_flag: str) -> Path:
    """Check the job (one-line ConfigError, before any worker trains) and make its folder.
    `workers_flag` names where the worker count came from, for the message."""
    if workers < 1:
        raise ConfigError(f"{workers_flag} = {workers}: must be >= 1")
    if cfg.topology.name != "diloco":
        raise ConfigError(f"topology.name = {cfg.topology.name!r}: worker processes need 'diloco'")
    cfg.diloco.options["workers"] = workers
    build_parts(cfg)  # every config error now, in one line, before any process starts
    out_dir = Path(out)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ConfigError(f"output folder {str(out_dir)!r} is not empty; pass --overwrite or another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in [*out_dir.glob("worker-*"), *out_dir.glob("final-*"), *out_dir.glob("params-*")]:
        old.unlink()
    atomic_write_text(out_dir / "config.toml", cfg.to_toml())
    return out_dir


def _dead(alive: Callable[[int], bool], worker_id: int) -> bool:
    return not alive(worker_id)


def read_finals(out: Path, exit_codes: dict[int, int | None]) -> dict[int, dict]:
    """The final records (final-{id}.json) of the workers that exited with 0."""
    finals = {}
    for w in sorted(exit_codes):
        path = out / f"final-{w}.json"
        if exit_codes[w] == 0 and path.is_file():
            finals[w] = json.loads(path.read_text())
    return finals


def summarize(out: Path, exit_codes: dict[int, int | None], coordinator: Coordinator,
              wall: float, finals: dict[int, dict]) -> dict[str, Any]:
    """Write (and return) summary.json and metrics.jsonl. `finals`: the final record of every
    worker that finished (the survivors), whoever started it."""
    hashes = sorted({f["params_sha256"] for f in finals.values()})
    reporter = finals[min(finals)] if finals else {}
    rounds: dict[int, dict] = {}
    for w in sorted(exit_codes):  # metrics.jsonl: each round from the lowest-id worker that has it
        path = out / f"worker-{w}.jsonl"
        for line in path.read_text().splitlines() if path.is_file() else []:
            rec = json.loads(line)
            if rec["round"] not in rounds or rec["test_loss"] is not None:
                rounds.setdefault(rec["round"], rec)
                if rec["test_loss"] is not None and rounds[rec["round"]]["test_loss"] is None:
                    rounds[rec["round"]] = rec
    atomic_write_text(out / "metrics.jsonl",
                      "".join(json.dumps(rounds[r]) + "\n" for r in sorted(rounds)))
    log = coordinator.log
    summary = {
        "survivors": sorted(finals), "exit_codes": {str(w): c for w, c in exit_codes.items()},
        "identical_params": len(hashes) == 1, "params_sha256": hashes,
        "final_test_loss": reporter.get("test_loss"),
        "final_accuracy": reporter.get("test_accuracy"),
        "inner_steps": reporter.get("inner_steps"), "sync_events": log.committed,
        "uplink_bytes_total": reporter.get("uplink_bytes_total"),
        "retries": log.retries, "dropped": log.dropped, "joined": log.joined,
        "hash_checks": log.hash_checks, "hash_mismatches": log.hash_mismatches,
        "coordinator_error": log.error, "wall_s": round(wall, 3),
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    return summary
