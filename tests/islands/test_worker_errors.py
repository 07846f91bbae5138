"""A worker that loses its store or coordinator says so in one line and exits with code 4."""

from __future__ import annotations

import pytest
import torch

from koinon.cli import main
from koinon.islands import worker
from koinon.islands.membership import MembershipTimeout


@pytest.mark.parametrize(
    "error",
    [
        torch.distributed.DistError("Connection reset by peer\nException raised from recvBytes"),
        MembershipTimeout("no quorum for sync event 3 within 60 s"),
    ],
)
def test_lost_store_is_one_line(
    error: Exception, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fail(args: object) -> int:
        raise error

    monkeypatch.setattr(worker, "run_worker", fail)
    assert main(["worker"]) == 4
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("koinon worker: lost the run's store or coordinator: ")
