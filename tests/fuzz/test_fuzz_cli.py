"""``tairstore fuzz stateful | decoders | all``: each runs, prints the table, exits 0 when clean
and 1 when not; every failure prints its seed and replay command."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tairstore.cli import main
from tairstore.fuzz import decoders
from tairstore.fuzz.model import Tally


def test_fuzz_stateful_replays_a_seed(capsys, tmp_path):
    assert main(["fuzz", "stateful", "--seed", "11", "--runs", "2", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| runs: stateful (seeded)" in out and "blocks lost (must be 0)" in out


def _check_exit_and_failures(rc: int, out: str) -> None:
    """The mechanics, whatever the engine's state: exit 1 exactly when something failed, and
    every failure line names its replay command (an engine bug is its regression test's job)."""
    failures = [line for line in out.splitlines()
                if " input #" in line or line.startswith("FAILURE")]
    assert rc == (1 if failures else 0), out[-3000:]
    assert all("replay: tairstore fuzz" in line for line in failures), failures[:3]


def test_fuzz_decoders_every_target(capsys):
    rc = main(["fuzz", "decoders", "--count", "300", "--seed", "4"])
    out = capsys.readouterr().out
    for name in ("wal", "segment", "protocol", "http", "config"):
        assert f"decoder inputs: {name}" in out
    _check_exit_and_failures(rc, out)


def test_fuzz_all_ends_with_the_table(tmp_path):
    out = subprocess.run([sys.executable, "-m", "tairstore", "fuzz", "all", "--minutes", "0.2",
                          "--seed", "3", "--dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    _check_exit_and_failures(out.returncode, out.stdout)
    table = out.stdout[out.stdout.index("| measure"):]
    for row in ("crash points", "faults injected: sigkill", "faults injected: bitflip",
                "decoder inputs: wal", "acknowledged blocks checked",
                "blocks lost (must be 0)", "corrupt payloads served (must be 0)",
                "reopen failures (must be 0)"):
        assert row in table, row


def test_a_decoder_failure_names_its_replay(monkeypatch):
    from contextlib import contextmanager

    @contextmanager
    def broken():
        def check(data: bytes) -> None:
            if data[:1] == b"\x01":
                raise KeyError("a stray exception")
        yield check

    monkeypatch.setitem(decoders.TARGETS, "broken", broken)
    n, failures = decoders.run_target("broken", [b"\x00", b"\x01x"],
                                      replay="tairstore fuzz decoders --target broken --seed 9")
    assert n == 2 and len(failures) == 1
    assert "KeyError" in failures[0] and "input hex: 0178" in failures[0]
    assert "replay: tairstore fuzz decoders --target broken --seed 9" in failures[0]
    assert Tally().ok


def test_a_missing_scratch_dir_is_created(capsys, tmp_path):
    target = tmp_path / "new" / "scratch"
    assert main(["fuzz", "stateful", "--seed", "11", "--steps", "3", "--dir", str(target)]) == 0
    assert target.is_dir()
    assert "| runs: stateful (seeded)" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["all", "--minutes", "nan"], "finite number >= 0"),
    (["all", "--minutes", "inf"], "finite number >= 0"),
    (["all", "--minutes", "-1"], "finite number >= 0"),
    (["all", "--minutes", "ten"], "not a number"),
    (["stateful", "--runs", "-2"], "must be >= 0"),
    (["decoders", "--count", "1.5"], "not an integer"),
    (["crash", "--iterations", "-1"], "must be >= 0"),
])
def test_bad_option_values_are_refused_before_anything_runs(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(["fuzz", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_a_scratch_dir_that_is_a_file_is_refused(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"x")
    with pytest.raises(SystemExit) as exc:
        main(["fuzz", "stateful", "--dir", str(blocker / "sub")])
    assert exc.value.code == 2
    assert "cannot create" in capsys.readouterr().err
