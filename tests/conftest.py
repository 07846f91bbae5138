import pytest
import torch
from hypothesis import HealthCheck, settings

torch.set_num_threads(1)

# Property tests draw the same examples on every run (a failure reproduces; CI is not a lottery)
# and are not failed for being slow on a loaded 2-core machine.
settings.register_profile(
    "koinon", derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("koinon")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    # Generated datasets are cached per test session, never in the user's home.
    monkeypatch.setenv("KOINON_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    yield

