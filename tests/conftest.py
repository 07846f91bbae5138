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


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    """One CA, a server certificate for 127.0.0.1 and six clients, shared by the deployment tests
    of every folder (a test needing other certificates makes its own)."""
    from koinon.deploy.certs import create_certs

    out = tmp_path_factory.mktemp("certs")
    create_certs(out, 6, ["127.0.0.1", "localhost"])
    return out
