"""Private directories and files: made private at creation and tightened when they exist."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from vpnfleet.agent.spool import Spool
from vpnfleet.agent.statedir import StateDir
from vpnfleet.privatefiles import make_private_dir, write_private


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_an_existing_world_open_state_dir_is_made_private_with_everything_in_it(
    tmp_path: Path,
) -> None:
    root = tmp_path / "state"
    (root / "spool").mkdir(parents=True)
    root.chmod(0o777)  # a fresh Kubernetes emptyDir
    (root / "spool").chmod(0o755)
    for name in ("server.key", "tls-crypt.key", "clients.journal", "spool/flows.jsonl"):
        (root / name).write_text("secret\n")
        (root / name).chmod(0o644)
    outside = tmp_path / "elsewhere"
    outside.write_text("not ours\n")
    outside.chmod(0o644)
    (root / "link").symlink_to(outside)

    StateDir(root).create()

    assert mode(root) == 0o700
    assert mode(root / "spool") == 0o700
    for name in ("server.key", "tls-crypt.key", "clients.journal", "spool/flows.jsonl"):
        assert mode(root / name) == 0o600, name
    assert mode(outside) == 0o644  # a link is never followed out of the directory


def test_a_state_dir_owned_by_another_user_is_taken_over_by_root(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to hand the directory to another user first")
    root = tmp_path / "state"
    root.mkdir(mode=0o755)
    os.chown(root, 65534, 65534)
    make_private_dir(root)
    st = root.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700)


def test_a_path_that_is_a_file_is_refused_in_one_sentence(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.write_text("")
    with pytest.raises(OSError, match="state"):
        make_private_dir(path)


def test_write_private_ignores_a_loose_leftover_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "server.key"
    leftover = tmp_path / "server.key.tmp"
    leftover.write_text("half")
    leftover.chmod(0o666)
    write_private(target, "key\n")
    assert target.read_text() == "key\n" and mode(target) == 0o600
    assert not leftover.exists()


def test_spool_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        spool = Spool(tmp_path, "sessions")
        spool.put({"user": "alice"})
        spool.flush()
        spool.close()
    finally:
        os.umask(old)
    assert mode(tmp_path / "sessions.jsonl") == 0o600


def test_loose_spool_files_of_an_older_agent_are_tightened(tmp_path: Path) -> None:
    path = tmp_path / "flows.jsonl"
    path.write_text('{"user":"alice"}\n')
    path.chmod(0o644)
    Spool(tmp_path, "flows").close()
    assert mode(path) == 0o600
