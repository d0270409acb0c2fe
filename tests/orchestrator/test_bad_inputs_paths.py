"""Inputs are never dropped silently: an image entry that is not a regular file is named, or recorded as a rejection
under --skip-bad; empty and system paths are refused. Before, `Path.is_file()` filtered such entries out unseen."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from sqlalchemy import select

from orchestrator.cli import main
from shared.db import session_scope
from shared.models import Rejection
from tests.conftest import embedded_settings
from tests.orchestrator.test_bad_input import n_rows, refused


@pytest.fixture
def data(tmp_path, m3fd_small) -> Path:
    d = tmp_path / "m3fd"
    shutil.copytree(m3fd_small, d)
    return d


def _damage(data: Path, how: str, side: str = "Vis") -> Path:
    victim = data / side / "00007.png"
    victim.unlink()
    if how == "dangling-symlink":
        victim.symlink_to(data / "nowhere.png")
    elif how == "symlink-loop":
        victim.symlink_to(victim)
    elif how == "fifo":
        os.mkfifo(victim)
    elif how == "folder":
        victim.mkdir()
    elif how == "link-into-proc":
        victim.symlink_to("/proc/self/environ")  # a regular file in /proc: it would leak the environment
    elif how == "link-to-device":
        victim.symlink_to("/dev/zero")
    return victim


HOW = ["dangling-symlink", "symlink-loop", "fifo", "folder", "link-into-proc", "link-to-device"]


@pytest.mark.parametrize("side", ["Vis", "Ir"])
@pytest.mark.parametrize("how", HOW)
def test_non_regular_image_is_named_or_recorded(home, capsys, data, tiny_sd, how, side):
    victim = _damage(data, how, side)
    base = ["submit", "invert", "--model", str(tiny_sd), "--size", "64", "--data", str(data), "--shards", "2"]
    line = refused(capsys, base, str(victim))
    assert n_rows(home) == 0 and "--skip-bad" in line
    assert main(base + ["--skip-bad", "--json"]) == 0
    with session_scope(embedded_settings(home)) as ss:
        rej = ss.execute(select(Rejection.kind, Rejection.ref, Rejection.reason)).all()
    assert len(rej) == 1 and rej[0][0] == "skipped_input" and rej[0][1] == str(victim), rej


def test_worker_side_read_of_a_fifo_fails_at_once_naming_it(data):
    """A FIFO that appears after submission: reading it would block forever; it is refused before opening."""
    from shared.errors import UserError
    from workers.ml.m3fd import check_image

    victim = _damage(data, "fifo")
    with pytest.raises(UserError, match="FIFO"):
        check_image(victim)


@pytest.mark.parametrize("value, needle", [
    ("", "--data is empty"), ("   ", "--data is empty"), ("/proc/self/cwd", "/proc"), ("/dev", "/dev"),
    ("/sys/kernel", "/sys"),
])
def test_empty_and_system_data_paths_are_refused(home, capsys, tiny_sd, value, needle):
    refused(capsys, ["submit", "invert", "--model", str(tiny_sd), "--data", value], needle)
    refused(capsys, ["submit", "train-ncsn", "--data", value], needle)
    assert n_rows(home) == 0


def test_a_data_symlink_into_proc_is_refused(home, capsys, tmp_path, tiny_sd):
    link = tmp_path / "innocent"
    link.symlink_to("/proc/self")
    refused(capsys, ["submit", "invert", "--model", str(tiny_sd), "--data", str(link)], "/proc")
