"""Every shipped example config runs (two rounds) on every runtime from the CLI."""

import importlib.util
import json
from pathlib import Path

import pytest

from koinon.cli import main

EXAMPLES = sorted(Path(__file__).resolve().parents[1].joinpath("examples").glob("*.toml"))
RUNTIMES = ["inprocess", "vectorized"] + (["ray"] if importlib.util.find_spec("ray") else [])


def test_there_are_examples():
    assert any(p.name == "demo.toml" for p in EXAMPLES)


@pytest.fixture(scope="module")
def shared_ray():
    """One local Ray instance for all examples (the runtime reuses a running one)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs_on_runtime(example, runtime, tmp_path, request):
    if runtime == "ray":
        request.getfixturevalue("shared_ray")
    out = tmp_path / "run"
    extra = ["--set", "runtime.num_workers=2"] if runtime == "ray" else []
    code = main(["run", str(example), "--out", str(out), "--quiet", "--set", "server.rounds=2",
                 "--set", f"runtime.name={runtime}", *extra])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["uplink_bytes_total"] > 0
