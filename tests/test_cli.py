"""The `koinon` command line: one table of subcommands, one way to fail (one line, exit 2)."""

import pytest

from koinon import cli
from koinon.cli import COMMANDS, main

EVERY = {"run", "list", "predict", "robustness", "certs", "server", "client", "launch", "worker", "verify",
         "pretrain"}


def test_the_table_holds_every_command_and_help_lists_them(capsys):
    assert {c.name for c in COMMANDS} == EVERY and len(COMMANDS) == len(EVERY)
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for name in EVERY:
        assert f"\n    {name}" in text, name


@pytest.mark.parametrize("name", sorted(EVERY))
def test_every_command_has_its_own_help(name, capsys):
    with pytest.raises(SystemExit) as done:
        main([name, "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: koinon {name} ")


BAD = [
    (["run", "--no-such-flag"], "koinon run: unrecognized arguments: --no-such-flag"),
    (["list", "extra"], "koinon list: unrecognized arguments: extra"),
    (["robustness", "base.toml", "--fractions", "0,x"], "argument --fractions: expected comma-separated"),
    (["robustness", "base.toml", "--seeds", "1,1"], "argument --seeds: seeds must be distinct"),
    (["certs", "--clients", "1"], "koinon certs: the following arguments are required: --out"),
    (["server", "c.toml", "--certs", "c"], "required: --state"),
    (["client", "--server", "h:1", "--certs", "c", "--id", "a", "--data", "p:0", "--give-up", "x"],
     "argument --give-up: invalid float value: 'x'"),
    (["launch", "c.toml", "--crash", "1@0"], "argument --crash: expected WORKER@STEP"),
    (["worker", "--timeout", "soon"], "koinon worker: argument --timeout"),
    (["nope"], "invalid choice: 'nope'"),
    ([], "required: COMMAND"),
]


@pytest.mark.parametrize("argv, needle", BAD, ids=[" ".join(a) or "nothing" for a, _ in BAD])
def test_a_bad_command_line_is_one_line_and_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("koinon: error: ") and len(err.splitlines()) == 1 and needle in err, err
    assert captured.out == ""


def test_user_errors_of_every_family_are_one_line(tmp_path, capsys):
    missing = str(tmp_path / "missing.toml")
    for argv in (["run", missing], ["robustness", missing],
                 ["server", missing, "--certs", str(tmp_path), "--state", str(tmp_path / "s")],
                 ["client", "--server", "h:1", "--certs", str(tmp_path), "--id", "a", "--data", "nope"],
                 ["launch", missing, "--workers", "2"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("koinon: error: ") and len(err.splitlines()) == 1, (argv, err)


def test_ctrl_c_says_how_to_continue_and_a_bug_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    import koinon.experiment

    config = tmp_path / "c.toml"
    config.write_text("[server]\nrounds = 2\n")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(koinon.experiment, "run_experiment", interrupted)
    assert main(["run", str(config), "--out", str(tmp_path / "r")]) == 130
    err = capsys.readouterr().err.strip()
    assert err == f"koinon: interrupted; continue with: koinon run --resume {tmp_path / 'r'}"

    def bug(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(koinon.experiment, "run_experiment", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["run", str(config), "--out", str(tmp_path / "r")])


def test_only_the_worker_maps_its_own_failures(monkeypatch, capsys):
    from koinon.islands import worker
    from koinon.islands.dist import Dropped

    def dropped(args):
        raise Dropped("worker 1 was left out of sync event 3")

    monkeypatch.setattr(worker, "run_worker", dropped)
    assert main(["worker"]) == 3
    assert capsys.readouterr().err == "koinon worker: worker 1 was left out of sync event 3\n"
    assert [c.name for c in cli.COMMANDS if c.failure is not None] == ["worker"]
