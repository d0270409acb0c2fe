"""Configuration errors and out-of-range numbers: one line on stderr, exit status 2, no row, nothing published.

A property-based test draws, for every `submit` kind, one numeric argument with a bad value (negative, zero where
that means nothing, NaN, infinite, too large for the database, the RNG or memory, or not a number at all) while the
others stay valid, and checks that nothing at all was created.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from orchestrator.cli import build_parser
from orchestrator.limits import LIMITS, Range, check_arguments
from tests.orchestrator.test_bad_input import n_rows, refused

#: Valid required arguments of each kind (ids need not exist: the numbers are checked before any lookup).
REQUIRED = {
    "invert": ["--data", "DATA", "--model", "MODEL"],
    "train-translator": ["--latents", "invert-000000000000"],
    "eval-translator": ["--checkpoint", "1"],
    "train-ncsn": [],
    "train-classifier": [],
    "sample": ["--checkpoint", "1"],
    "eval-fid": ["--samples", "sample-000000000000", "--classifier", "1"],
}
SUBMIT_KINDS = sorted(REQUIRED)


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _bad_values(rng: Range, is_int: bool) -> st.SearchStrategy[str]:
    below = st.integers(max_value=math.ceil(rng.lo) - (0 if rng.lo_open else 1))
    above = st.integers(min_value=math.floor(rng.hi) + 1, max_value=2**80)
    words = st.sampled_from(["nan", "inf", "-inf", "1e20", "x", "", "0x10", "1.5e400"])
    if is_int:  # argparse's int(): floats, NaN and words are refused there, also in one line
        return st.one_of(below.map(str), above.map(str), words)
    floats = st.floats(allow_nan=True, allow_infinity=True).filter(
        lambda v: not (math.isfinite(v) and (v > rng.lo if rng.lo_open else v >= rng.lo) and v <= rng.hi))
    return st.one_of(below.map(str), above.map(str), floats.map(repr), words)


def _int_dests(kind: str) -> set[str]:
    sub = build_parser()._subparsers._group_actions[0].choices["submit"]  # type: ignore[union-attr]
    parser = sub._subparsers._group_actions[0].choices[kind]
    return {a.dest for a in parser._actions if a.type is int}


@st.composite
def bad_submission(draw):
    kind = draw(st.sampled_from(SUBMIT_KINDS))
    dest = draw(st.sampled_from(sorted(LIMITS[f"submit {kind}"])))
    value = draw(_bad_values(LIMITS[f"submit {kind}"][dest], dest in _int_dests(kind)))
    return kind, dest, value


@pytest.fixture
def placeholders(tmp_path, m3fd_small, tiny_sd):
    return {"DATA": str(m3fd_small), "MODEL": str(tiny_sd)}


@hsettings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=bad_submission())
def test_property_bad_numbers_of_every_submit_kind_leave_nothing(home, capsys, placeholders, case):
    kind, dest, value = case
    argv = ["submit", kind] + [placeholders.get(a, a) for a in REQUIRED[kind]] + [f"{_flag(dest)}={value}"]
    line = refused(capsys, argv)
    assert _flag(dest) in line, line
    assert n_rows(home) == 0
    inbox = home / "broker" / "in"
    assert not inbox.exists() or not any(inbox.iterdir())  # nothing published


@hsettings(max_examples=60, deadline=None)
@given(data=st.data())
def test_property_values_inside_the_ranges_pass(data):
    """The ranges refuse only what they should: any value inside passes the check."""
    kind = data.draw(st.sampled_from(SUBMIT_KINDS))
    limits = LIMITS[f"submit {kind}"]
    ints = _int_dests(kind)
    args = {"command": "submit", "kind": kind}
    for dest, rng in limits.items():
        if dest in ints:
            lo = math.floor(rng.lo) + (1 if rng.lo_open else 0)
            args[dest] = data.draw(st.integers(min_value=lo, max_value=int(rng.hi)))
        else:
            args[dest] = data.draw(st.floats(min_value=rng.lo, max_value=rng.hi, exclude_min=rng.lo_open))
    import argparse

    check_arguments(argparse.Namespace(**args))


@pytest.mark.parametrize("argv, needle", [
    (["submit", "invert", "--data", "DATA", "--model", "MODEL", "--size", "100000"], "--size"),
    (["submit", "invert", "--data", "DATA", "--model", "MODEL", "--seed", str(2**64)], "--seed"),
    (["submit", "train-ncsn", "--epochs", "1e20"], "--epochs"),
    (["submit", "train-ncsn", "--checkpoint-every", "-5"], "--checkpoint-every"),
    (["submit", "train-classifier", "--log-every", "0"], "--log-every"),
    (["submit", "train-ncsn", "--steps-each", "-1"], "--steps-each"),
    (["submit", "train-translator", "--latents", "x", "--lr", "nan"], "--lr"),
    (["submit", "train-translator", "--latents", "x", "--weight-decay", "inf"], "--weight-decay"),
    (["submit", "sample", "--checkpoint", str(2**40)], "--checkpoint"),
    (["jobs", "--limit", "-1"], "--limit"),
    (["results", "j", "--limit", str(10**20)], "--limit"),
    (["worker", "--processes", "0"], "--processes"),
    (["worker", "--concurrency", "-2"], "--concurrency"),
    (["reap", "--stale-after", "nan"], "--stale-after"),
])
def test_named_bad_numbers(home, capsys, placeholders, argv, needle):
    refused(capsys, [placeholders.get(a, a) for a in argv], needle)
    assert n_rows(home) == 0


@pytest.mark.parametrize("env, needle", [
    ({"ORCH_LEASE_SECONDS": "sixty"}, "ORCH_LEASE_SECONDS"),
    ({"ORCH_LEASE_SECONDS": "nan"}, "ORCH_LEASE_SECONDS"),
    ({"ORCH_LEASE_SECONDS": "-1"}, "ORCH_LEASE_SECONDS"),
    ({"ORCH_STORAGE": "gopher://host/artifacts"}, "gopher"),
    ({"ORCH_DATABASE_URL": "not a url"}, "ORCH_DATABASE_URL"),
    ({"ORCH_DATABASE_URL": "nosuchdb://u@h/x"}, "ORCH_DATABASE_URL"),
    ({"ORCH_DATABASE_URL": "postgresql+psycopg2://orch:hunter2@127.0.0.1:1/orch"}, "127.0.0.1:1"),
    ({"ORCH_DATABASE_URL": "sqlite:////proc/orch/x.sqlite"}, "SQLite"),
])
def test_configuration_errors_are_one_line(home, capsys, monkeypatch, env, needle):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    line = refused(capsys, ["jobs"], needle)
    assert "hunter2" not in line


@pytest.mark.server
def test_a_missing_postgres_database_is_one_line(home, capsys, monkeypatch):
    from tests.conftest import PG_ADMIN_URL, require_servers

    require_servers()
    monkeypatch.setenv("ORCH_DATABASE_URL", PG_ADMIN_URL.rsplit("/", 1)[0] + "/no_such_db_h15c")
    refused(capsys, ["jobs"], "no_such_db_h15c")


def test_unwritable_home_is_one_line(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")  # a folder cannot be made under a file, even by root
    for var in ("ORCH_BROKER_URL", "ORCH_DATABASE_URL", "ORCH_STORAGE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ORCH_HOME", str(blocker / "orch"))
    refused(capsys, ["jobs"], "ORCH_HOME")
    monkeypatch.setenv("ORCH_HOME", "/proc/orch-home")
    refused(capsys, ["submit", "train-ncsn"], "ORCH_HOME")
    assert not Path("/proc/orch-home").exists()
