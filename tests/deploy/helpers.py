"""Real processes on 127.0.0.1 for the deployment tests: start, wait (always with a deadline), kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import tomli_w

KOINON = [sys.executable, "-c", "import sys; from koinon.cli import main; sys.exit(main())"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def write_config(path: Path, **sections: dict) -> Path:
    """A digits federation for tests; `sections` override whole keys per section."""
    cfg: dict = {
        "seed": 0,
        "data": {"name": "digits", "partition": "dirichlet", "alpha": 1.0, "num_clients": 3},
        "model": {"name": "mlp", "hidden": [32]},
        "client": {"epochs": 1, "batch_size": 32, "lr": 0.1, "momentum": 0.9},
        "server": {"rounds": 6, "clients_per_round": 3},
        "runtime": {"name": "inprocess"},
        "deploy": {"round_timeout_s": 20.0, "wait_clients_s": 60.0},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path.write_text(tomli_w.dumps(cfg))
    return path


class Proc:
    """A koinon subprocess whose stderr goes to a file (read it when a test fails)."""

    def __init__(self, args: list[str], log: Path, cwd: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self.handle = log.open("ab")
        self.p = subprocess.Popen([*KOINON, *args], stdout=self.handle, stderr=subprocess.STDOUT,
                                  cwd=cwd, env={**ENV, **(env or {})})

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.log.name} still running after {timeout} s:\n{self.text()[-3000:]}") from None

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGKILL)
            self.p.wait(10)
        self.handle.close()


def start_server(tmp: Path, config: Path, certs: Path, state: Path, name: str = "server",
                 port: int = 0, env: dict[str, str] | None = None) -> tuple[Proc, str]:
    """A server (on an ephemeral port unless given); returns it and its HOST:PORT once it listens.
    `env`: extra environment, e.g. `KOINON_CRASH_AT` (koinon.deploy.faults)."""
    (state / "server.port").unlink(missing_ok=True)
    proc = Proc(["server", str(config), "--listen", f"127.0.0.1:{port}", "--certs", str(certs),
                 "--state", str(state)], tmp / f"{name}.log", tmp, env)
    port_file = state / "server.port"
    wait_for(lambda: port_file.is_file() and port_file.read_text().strip(), 60, proc, "server listening")
    return proc, f"127.0.0.1:{port_file.read_text().strip()}"


def start_client(tmp: Path, address: str, certs: Path, name: str, data: str, give_up: float = 60,
                 env: dict[str, str] | None = None) -> Proc:
    return Proc(["client", "--server", address, "--certs", str(certs), "--id", name, "--data", data,
                 "--state", str(tmp / "client-state" / name), "--give-up", str(give_up)],
                tmp / f"{name}.log", tmp, env)


def wait_for(condition, timeout: float, proc: Proc | None = None, what: str = "condition"):
    """Poll `condition` until truthy; fail with the process log after `timeout` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        if proc is not None and proc.p.poll() is not None:
            raise AssertionError(f"{what}: process exited ({proc.p.returncode}):\n{proc.text()[-3000:]}")
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}" + (f":\n{proc.text()[-3000:]}" if proc else ""))


def committed_rounds(state: Path) -> int:
    path = state / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def metrics(state: Path) -> list[dict]:
    return [json.loads(line) for line in (state / "metrics.jsonl").read_text().splitlines() if line]


def run_deployment(tmp: Path, config: Path, certs: Path, clients: int = 3, server_s: float = 120) -> Path:
    """`koinon server` and `clients` client processes (client i holds partition i) run `config`
    to its end, each exiting 0; returns the server's state folder."""
    state = tmp / "state"
    server, address = start_server(tmp, config, certs, state)
    procs = [start_client(tmp, address, certs, f"client-{i}", f"partition:{i}") for i in range(clients)]
    assert server.wait(server_s) == 0, server.text()[-3000:]
    for c in procs:
        assert c.wait(30) == 0, c.text()[-3000:]
    return state


def simulate(tmp: Path, config: Path, state: Path | None = None) -> list[dict]:
    """`koinon run` of `config` into tmp/sim; with `state`, the deployment's final model must be
    the simulation's bit for bit. Returns the simulation's metrics records."""
    from koinon.experiment import load_config, run_experiment

    reference = run_experiment(load_config(config), tmp / "sim", progress=False)
    if state is not None:
        summary = json.loads((state / "summary.json").read_text())
        assert summary["model_sha256"] == reference["model_sha256"]
    return metrics(tmp / "sim")
