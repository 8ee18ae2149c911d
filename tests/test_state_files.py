"""The state directory cannot be used against kdsr (kdsr/kernel/statefiles.py)."""

from __future__ import annotations

import os
import stat

import pytest

from kdsr.kernel.state import NodeState, StateStore
from kdsr.kernel.statefiles import StateFileError


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def record(node: str = "lb1") -> NodeState:
    return NodeState(node=node, tables={"netdev kdsr"})


def test_directory_0700_files_0600_and_no_temp_left(tmp_path):
    store = StateStore(tmp_path / "state")
    store.save(record())
    assert mode(tmp_path / "state") == 0o700 and mode(tmp_path / "state" / "lb1.json") == 0o600
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["lb1.json"]
    assert store.load("lb1").tables == {"netdev kdsr"}


def test_a_loose_directory_is_tightened(tmp_path):
    (tmp_path / "state").mkdir(mode=0o777)
    os.chmod(tmp_path / "state", 0o777)
    StateStore(tmp_path / "state").save(record())
    assert mode(tmp_path / "state") == 0o700


def test_a_symlinked_state_directory_is_refused(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "state").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StateFileError, match="symlink"):
        StateStore(tmp_path / "state").save(record())
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_a_planted_symlink_is_neither_read_nor_written_through(tmp_path):
    store = StateStore(tmp_path / "state")
    store.save(record())
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    path = tmp_path / "state" / "lb1.json"
    path.unlink()
    path.symlink_to(victim)
    with pytest.raises(StateFileError, match="symlink"):
        store.load("lb1")
    store.save(record())  # the rename replaces the link itself
    assert victim.read_text() == "precious\n" and not path.is_symlink()


def test_a_symlinked_lock_file_is_refused(tmp_path):
    store = StateStore(tmp_path / "state")
    store.save(record())
    target = tmp_path / "target"
    target.write_text("")
    (tmp_path / "state" / "lock").symlink_to(target)
    with pytest.raises(StateFileError, match="symlink"), store.lock():
        pass
    assert target.read_text() == ""


def test_a_directory_someone_else_owns_is_refused(tmp_path, monkeypatch):
    (tmp_path / "state").mkdir(mode=0o700)
    monkeypatch.setattr(os, "geteuid", lambda: os.lstat(tmp_path / "state").st_uid + 1)
    with pytest.raises(StateFileError, match="belongs to uid"):
        StateStore(tmp_path / "state").save(record())
