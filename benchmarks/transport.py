"""Deployment transport: what `koinon server` / `koinon client` cost over real sockets.

Two runs, both with the server as its own process, each client with its own TLS connection and
certificate:

1. Large model: an MLP of about 10M parameters (40 MB in float32), 10 clients (each its own
   process, as real clients are; `--client-threads`: threads of this process, as the figures
   before issue 22's data-path work were taken), one local step each, so the round time is
   transport + validation + aggregation + checkpointing. Prints
   seconds per round, the upload throughput (bytes of a round over the time its uploads took),
   the raw TCP throughput of this machine's loopback measured in the same run, the ceiling of
   the same uploads over bare gRPC with mutual TLS (raw bytes, no protobuf, no koinon code; also
   in the same run), and the server's resident memory (before the clients join and at its peak
   while receiving).
2. Load: 100 clients (threads of this process) joining, training a small model and leaving at random for 20 rounds; the
   server is SIGKILLed once half-way and restarted. Prints rounds completed, updates accepted and
   rejected, the longest round and upload, and checks that every upload the server confirmed
   ended up in a committed round.

    .venv/bin/python benchmarks/transport.py [--quick] [--part large|load] [--client-threads]
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import tomli_w

from koinon.deploy.certs import client_credentials, create_certs
from koinon.deploy.client import DataSpec, Hooks, run_client

KOINON = [sys.executable, "-c", "import sys; from koinon.cli import main; sys.exit(main())"]


def raw_tcp_mb_s(total_mb: int) -> float:
    """Loopback TCP throughput: one connection, 1 MiB writes, the reader drains."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    received = 0

    def drain() -> None:
        nonlocal received
        conn, _ = listener.accept()
        while chunk := conn.recv(1 << 20):
            received += len(chunk)
        conn.close()

    reader = threading.Thread(target=drain)
    reader.start()
    block = b"\x00" * (1 << 20)
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for _ in range(total_mb):
            sock.sendall(block)
    reader.join()
    listener.close()
    return received / 1e6 / (time.perf_counter() - start)


def _bare_server(certs: str, port_file: str, chunk_mb: float) -> None:
    """A gRPC server with mutual TLS and one client-streaming method that counts the bytes it
    receives: no protobuf, no koinon code (the ceiling of gRPC's Python stack with TLS)."""
    import grpc  # noqa: PLC0415 - only this mode needs it at module level

    from koinon.deploy.certs import server_credentials  # noqa: PLC0415

    def upload(request_iterator, context):  # noqa: ANN001, ANN202
        return sum(len(chunk) for chunk in request_iterator).to_bytes(8, "little")

    limit = int(chunk_mb * (1 << 20)) + (64 << 10)
    server = grpc.server(__import__("concurrent.futures").futures.ThreadPoolExecutor(max_workers=32),
                         options=[("grpc.max_receive_message_length", limit)])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "bare.Bare", {"Upload": grpc.stream_unary_rpc_method_handler(upload)})])
    creds = server_credentials(Path(certs))
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
        [(creds.key, creds.cert)], root_certificates=creds.ca, require_client_auth=True))
    server.start()
    Path(port_file).write_text(str(port))
    server.wait_for_termination()


def bare_grpc_tls_mb_s(tmp: Path, certs: Path, names: list[str], nbytes: int, chunk_mb: float = 1.0,
                       repeats: int = 2) -> tuple[float, int]:
    """Upload throughput of bare gRPC over mutual TLS on loopback: `len(names)` clients (threads,
    one channel and certificate each) each stream `nbytes` in `chunk_mb` messages of raw bytes to
    a server process at once, `repeats` times. Returns (MB/s while uploads were in flight, the
    server's peak resident memory in bytes)."""
    import grpc  # noqa: PLC0415

    port_file = tmp / f"bare-{chunk_mb}.port"
    port_file.unlink(missing_ok=True)
    p = subprocess.Popen([sys.executable, __file__, "--bare-server", str(certs), str(port_file), str(chunk_mb)])
    try:
        while not port_file.is_file() or not port_file.read_text():
            if p.poll() is not None:
                raise SystemExit("bare gRPC server did not start")
            time.sleep(0.05)
        address = f"127.0.0.1:{port_file.read_text()}"
        chunk = int(chunk_mb * (1 << 20))
        payload = memoryview(b"\x01" * nbytes)
        limit = chunk + (64 << 10)
        peak = [0]

        def sample() -> None:
            while p.poll() is None:
                try:
                    for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            peak[0] = max(peak[0], int(line.split()[1]) * 1024)
                except OSError:
                    return
                time.sleep(0.05)

        threading.Thread(target=sample, daemon=True).start()
        intervals: list[tuple[float, float]] = []

        def client(name: str) -> None:
            creds = client_credentials(certs, name)
            tls = grpc.ssl_channel_credentials(root_certificates=creds.ca, private_key=creds.key,
                                               certificate_chain=creds.cert)
            with grpc.secure_channel(address, tls, options=[("grpc.max_send_message_length", limit)]) as ch:
                call = ch.stream_unary("/bare.Bare/Upload")
                call(iter([b""]), timeout=60)  # connect and handshake before timing
                for _ in range(repeats):
                    start = time.perf_counter()
                    got = call((bytes(payload[i : i + chunk]) for i in range(0, nbytes, chunk)), timeout=300)
                    end = time.perf_counter()
                    assert int.from_bytes(got, "little") == nbytes
                    intervals.append((start, end))

        threads = [threading.Thread(target=client, args=(n,)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return len(names) * repeats * nbytes / 1e6 / busy_seconds(intervals), peak[0]
    finally:
        p.kill()
        p.wait()


class Server:
    """`koinon server` as a subprocess, with its resident memory sampled every 50 ms."""

    def __init__(self, tmp: Path, config: Path, certs: Path, state: Path, port: int = 0) -> None:
        (state / "server.port").unlink(missing_ok=True)
        self.log = (tmp / "server.log").open("ab")
        self.p = subprocess.Popen([*KOINON, "server", str(config), "--listen", f"127.0.0.1:{port}",
                                   "--certs", str(certs), "--state", str(state)],
                                  stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not (state / "server.port").is_file():
            if self.p.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start; see {tmp / 'server.log'}")
            time.sleep(0.05)
        self.port = int((state / "server.port").read_text())
        self.rss_start = self.rss()
        self.rss_peak = self.rss_start
        self.trace: list[tuple[float, int]] = []  # (wall-clock seconds, resident bytes)
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def rss(self) -> int:
        try:
            for line in Path(f"/proc/{self.p.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _sample(self) -> None:
        while self.p.poll() is None:
            now = self.rss()
            self.rss_peak = max(self.rss_peak, now)
            self.trace.append((time.time(), now))
            time.sleep(0.05)

    def peaks(self, intervals: list[tuple[float, float]]) -> tuple[int, int]:
        """Peak resident memory while one of `intervals` was in progress, and outside them."""
        spans = sorted(intervals)
        inside = outside = 0
        for t, rss in self.trace:
            if any(a <= t <= b for a, b in spans):
                inside = max(inside, rss)
            else:
                outside = max(outside, rss)
        return inside, outside

    def kill(self) -> None:
        self.p.send_signal(signal.SIGKILL)
        self.p.wait(10)

    def wait(self, timeout: float) -> int:
        return self.p.wait(timeout)


def write_config(path: Path, **sections: dict) -> Path:
    cfg: dict = {"seed": 0, "data": {"name": "digits", "partition": "dirichlet", "alpha": 1.0},
                 "runtime": {"name": "inprocess"}}
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path.write_text(tomli_w.dumps(cfg))
    return path


class Uploads:
    """Every upload the clients made: (client, round, accepted, bytes, start, end), wall-clock
    seconds (comparable across processes)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rows: list[tuple[str, int, bool, int, float, float]] = []

    def hook(self, name: str):
        def record(round_index: int, accepted: bool, nbytes: int, seconds: float) -> None:
            end = time.time()
            with self.lock:
                self.rows.append((name, round_index, accepted, nbytes, end - seconds, end))
        return record


def _client_process(address: str, certs: str, name: str, index: int, state: str, out: str) -> None:
    """One benchmark client in its own process; each upload is appended to `out` as JSON."""
    uploads = Uploads()

    def record(round_index: int, accepted: bool, nbytes: int, seconds: float) -> None:
        uploads.hook(name)(round_index, accepted, nbytes, seconds)
        with open(out, "a") as f:
            f.write(json.dumps(uploads.rows[-1]) + "\n")

    run_client(address, client_credentials(Path(certs), name), name, DataSpec(index, ""), Path(state),
               hooks=Hooks(on_upload=record, verbose=False))


def run_clients(address: str, certs: Path, names: list[str], tmp: Path, threads: bool) -> Uploads:
    """The large run's clients until the run is done: processes, or threads of this process."""
    uploads = Uploads()
    if threads:
        workers = [threading.Thread(target=run_client, args=(
            address, client_credentials(certs, name), name, DataSpec(i, ""), tmp / "cs-large" / name),
            kwargs={"hooks": Hooks(on_upload=uploads.hook(name), verbose=False)}) for i, name in enumerate(names)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(600)
        return uploads
    out = tmp / "uploads.jsonl"
    out.unlink(missing_ok=True)
    procs = [subprocess.Popen([sys.executable, __file__, "--client", address, str(certs), name, str(i),
                               str(tmp / "cs-large" / name), str(out)]) for i, name in enumerate(names)]
    for p in procs:
        if p.wait(600) != 0:
            raise SystemExit(f"a benchmark client exited with {p.returncode}")
    uploads.rows = [tuple(json.loads(line)) for line in out.read_text().splitlines()]  # type: ignore[misc]
    return uploads


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of time intervals: how long at least one upload was in flight."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def large_model(tmp: Path, rounds: int, threads: bool = False) -> None:
    certs = tmp / "certs-large"
    names = create_certs(certs, 10, ["127.0.0.1"])
    config = write_config(
        tmp / "large.toml", data={"num_clients": 10}, model={"name": "mlp", "hidden": [3100, 3100]},
        client={"steps": 1, "batch_size": 16, "lr": 0.01}, server={"rounds": rounds, "clients_per_round": 10},
        deploy={"round_timeout_s": 300.0, "wait_clients_s": 300.0})
    state = tmp / "state-large"
    tcp = raw_tcp_mb_s(400)
    bare, bare_peak = bare_grpc_tls_mb_s(tmp, certs, names, 39_400_000, repeats=1 if rounds <= 2 else 2)
    server = Server(tmp, config, certs, state)
    uploads = run_clients(f"127.0.0.1:{server.port}", certs, names, tmp, threads)
    server.wait(60)
    records = [json.loads(ln) for ln in (state / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((state / "summary.json").read_text())
    walls = [r["wall_s"] for r in records]
    per_round = [b - a for a, b in zip(walls, walls[1:])] or walls
    rows = [u for u in uploads.rows if u[2]]
    busy = busy_seconds([(u[4], u[5]) for u in rows])
    per_upload = sorted(u[3] / 1e6 / (u[5] - u[4]) for u in rows)
    params = summary["num_parameters"]
    print(f"large model: {params / 1e6:.2f}M parameters ({params * 4 / 1e6:.1f} MB float32), "
          f"10 clients ({'threads of one process' if threads else 'one process each'}), {rounds} rounds")
    print(f"  s/round (after the first): {sum(per_round) / len(per_round):.2f} "
          f"(first round {walls[0]:.2f} s, includes joining)")
    print(f"  upload: {sum(u[3] for u in rows) / 1e6 / busy:.0f} MB/s aggregate while uploads were in "
          f"flight ({sum(u[3] for u in rows) / 1e6:.0f} MB in {len(rows)} uploads, {busy:.1f} s); per "
          f"upload (10 at once, 4 read at a time): median {per_upload[len(per_upload) // 2]:.0f} MB/s")
    print(f"  raw loopback TCP in the same run: {tcp:.0f} MB/s")
    print(f"  bare gRPC over mutual TLS in the same run (10 clients at once stream 39.4 MB each in 1 MiB "
          f"messages of raw bytes to a server process that only counts them): {bare:.0f} MB/s "
          f"(that server's peak memory {bare_peak / 1e6:.0f} MB)")
    print(f"  server memory: {server.rss_start / 1e6:.0f} MB before clients joined, peak "
          f"{server.rss_peak / 1e6:.0f} MB while receiving, {(server.rss_peak - server.rss_start) / 1e6:.0f} MB "
          f"above the start (one round's updates: {10 * params * 4 / 1e6:.0f} MB)")
    inside, outside = server.peaks([(u[4], u[5]) for u in uploads.rows])
    print(f"  server peak above the start while uploads were in flight: {(inside - server.rss_start) / 1e6:.0f} MB; "
          f"at other times (closing and opening rounds, sending the model): {(outside - server.rss_start) / 1e6:.0f} MB")


def load_run(tmp: Path, num_clients: int, rounds: int) -> None:
    certs = tmp / "certs-load"
    names = create_certs(certs, num_clients, ["127.0.0.1"])
    config = write_config(
        tmp / "load.toml", data={"num_clients": num_clients}, model={"name": "mlp", "hidden": [32]},
        client={"epochs": 5, "batch_size": 16, "lr": 0.05, "momentum": 0.9},
        server={"rounds": rounds, "clients_per_round": 10},
        deploy={"min_clients": 8, "min_connected": 10, "round_timeout_s": 5.0, "wait_clients_s": 60.0})
    state = tmp / "state-load"
    server = Server(tmp, config, certs, state)
    address = f"127.0.0.1:{server.port}"
    uploads = Uploads()
    rng = random.Random(0)
    online: dict[int, tuple[threading.Thread, threading.Event]] = {}
    joins = leaves = 0

    def join(i: int) -> None:
        nonlocal joins
        stop = threading.Event()
        t = threading.Thread(target=run_client, daemon=True, args=(
            address, client_credentials(certs, names[i]), names[i], DataSpec(i, ""), tmp / "cs-load" / names[i]),
            kwargs={"hooks": Hooks(stop=stop, on_upload=uploads.hook(names[i]), verbose=False),
                    "give_up_s": 120.0})
        t.start()
        online[i] = (t, stop)
        joins += 1

    for i in rng.sample(range(num_clients), num_clients * 3 // 5):
        join(i)
    killed = False
    start = time.monotonic()
    while server.p.poll() is None and time.monotonic() - start < 900:
        time.sleep(0.5)
        for i in list(online):
            t, stop = online[i]
            if not t.is_alive():
                del online[i]
            elif rng.random() < 0.02:  # leaves (mid-round if it was training)
                stop.set()
                del online[i]
                leaves += 1
        for i in range(num_clients):
            if i not in online and rng.random() < 0.02:
                join(i)
        done = len((state / "metrics.jsonl").read_text().splitlines()) if (state / "metrics.jsonl").is_file() else 0
        if not killed and done >= rounds // 2:
            server.kill()
            killed = True
            server = Server(tmp, config, certs, state, port=server.port)
    server.wait(60)
    for _thread, stop in online.values():
        stop.set()
    records = [json.loads(ln) for ln in (state / "metrics.jsonl").read_text().splitlines()]
    applied = {(c, r["round"] - 1) for r in records for c in r["cohort"] if c not in r["missing"]}
    confirmed = {(int(row[0].split("-")[1]), row[1]) for row in uploads.rows if row[2]}
    db = sqlite3.connect(state / "state.db")
    statuses = dict(db.execute("SELECT status, COUNT(*) FROM updates GROUP BY status").fetchall())
    walls = [0.0] + [r["wall_s"] for r in records]
    longest_round = max(b - a for a, b in zip(walls, walls[1:]))
    longest_upload = max((row[5] - row[4] for row in uploads.rows), default=0.0)
    lost = confirmed - applied
    print(f"load run: {num_clients} clients (threads, one TLS connection and certificate each), "
          f"{joins} joins, {leaves} leaves at random, server SIGKILLed and restarted at round "
          f"{rounds // 2}")
    print(f"  rounds completed: {len(records)}/{rounds}, final accuracy {records[-1]['test_accuracy']:.4f}")
    print(f"  updates accepted: {statuses.get('accepted', 0)}, rejected: {statuses.get('rejected', 0)}, "
          f"late (discarded): {statuses.get('late', 0)}, lost pending files: {statuses.get('lost', 0)}")
    print(f"  longest round: {longest_round:.2f} s (deadline 5 s once the cohort is asked), "
          f"longest upload call: {longest_upload:.2f} s")
    print(f"  confirmed to clients: {len(confirmed)}; applied in committed rounds: {len(applied)}; "
          f"confirmed but not applied: {len(lost)}" + (" -> NO ACCEPTED UPDATE LOST" if not lost else " !!"))
    if lost:
        raise SystemExit(f"accepted updates lost: {sorted(lost)[:10]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 large rounds, 30 clients x 6 rounds")
    p.add_argument("--part", choices=["all", "large", "load"], default="all")
    p.add_argument("--client-threads", action="store_true",
                   help="large run: clients as threads of this process (default: one process each)")
    p.add_argument("--bare-server", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--client", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.bare_server:
        _bare_server(args.bare_server[0], args.bare_server[1], float(args.bare_server[2]))
        return
    if args.client:
        address, certs, name, index, state, out = args.client
        _client_process(address, certs, name, int(index), state, out)
        return
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        if args.part in ("all", "large"):
            large_model(tmp, rounds=2 if args.quick else 4, threads=args.client_threads)
        if args.part in ("all", "load"):
            load_run(tmp, num_clients=30 if args.quick else 100, rounds=6 if args.quick else 20)


if __name__ == "__main__":
    main()
