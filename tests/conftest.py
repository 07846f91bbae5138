import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    # Generated datasets are cached per test session, never in the user's home.
    monkeypatch.setenv("KOINON_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    yield

