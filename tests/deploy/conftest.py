from pathlib import Path

import pytest

from koinon.deploy.certs import create_certs


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Path:
    """One CA, a server certificate for 127.0.0.1 and six clients, shared by the deploy tests."""
    out = tmp_path_factory.mktemp("certs")
    create_certs(out, 6, ["127.0.0.1", "localhost"])
    return out
