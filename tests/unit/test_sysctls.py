"""The agent's kernel settings: read first, written only where they differ, named when missing.

A temporary directory stands in for /proc/sys. A read-only /proc/sys cannot be made for root in
a plain directory, so the write failure is injected here (``write=``); the real one, an
unprivileged container, is tests/e2e/test_container.py.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from vpnfleet.agent import sysctls
from vpnfleet.agent.sysctls import Shortfall, SysctlsMissing

ACCT = "net.netfilter.nf_conntrack_acct"
STAMP = "net.netfilter.nf_conntrack_timestamp"
FWD = "net.ipv4.ip_forward"


def proc_sys(tmp_path: Path, values: dict[str, str]) -> Path:
    root = tmp_path / "sys"
    for key, value in values.items():
        path = sysctls.path_of(key, root)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{value}\n")
    return root


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p.relative_to(root)): (p.read_text(), p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


def read_only(path: Path, value: str) -> None:
    raise OSError(errno.EROFS, "Read-only file system", str(path))


def test_settings_already_right_are_not_written(tmp_path: Path) -> None:
    root = proc_sys(tmp_path, {FWD: "1", ACCT: "1", STAMP: "1"})
    before = snapshot(root)
    # A read-only /proc/sys does not matter when nothing needs writing.
    assert sysctls.ensure(root, write=read_only) == []
    assert snapshot(root) == before


def test_only_the_settings_that_differ_are_written(tmp_path: Path) -> None:
    root = proc_sys(tmp_path, {FWD: "1", ACCT: "0", STAMP: "0"})
    fwd_before = snapshot(root)["net/ipv4/ip_forward"]
    assert sysctls.ensure(root) == [ACCT, STAMP]
    assert {k: sysctls.read(k, root) for k in (FWD, ACCT, STAMP)} == {
        FWD: "1",
        ACCT: "1",
        STAMP: "1",
    }
    assert snapshot(root)["net/ipv4/ip_forward"] == fwd_before
    assert sysctls.ensure(root) == []  # the second start finds them set


def test_a_read_only_proc_sys_names_every_missing_setting_in_one_error(tmp_path: Path) -> None:
    root = proc_sys(tmp_path, {FWD: "0", ACCT: "0", STAMP: "1"})
    before = snapshot(root)
    with pytest.raises(SysctlsMissing) as err:
        sysctls.ensure(root, write=read_only)
    assert err.value.shortfalls == (Shortfall(FWD, "1", "0"), Shortfall(ACCT, "1", "0"))
    text = str(err.value)
    assert "\n" not in text
    assert "net.ipv4.ip_forward=1 (is 0), net.netfilter.nf_conntrack_acct=1 (is 0)" in text
    assert STAMP not in text  # already right: not asked for
    assert "Read-only file system" in text
    assert "securityContext.sysctls" in text and "--allowed-unsafe-sysctls" in text
    assert "--sysctl net.ipv4.ip_forward=1 --sysctl net.netfilter.nf_conntrack_acct=1" in text
    assert "init container" in text
    assert snapshot(root) == before


def test_some_writable_some_not_names_only_what_is_still_wrong(tmp_path: Path) -> None:
    root = proc_sys(tmp_path, {FWD: "0", ACCT: "0", STAMP: "0"})

    def forwarding_is_locked(path: Path, value: str) -> None:
        if path.name == "ip_forward":
            raise OSError(errno.EPERM, "Operation not permitted", str(path))
        path.write_text(value)

    with pytest.raises(SysctlsMissing) as err:
        sysctls.ensure(root, write=forwarding_is_locked)
    assert [s.key for s in err.value.shortfalls] == [FWD]
    assert sysctls.read(ACCT, root) == "1" and sysctls.read(STAMP, root) == "1"
    assert "Operation not permitted" in str(err.value)


def test_a_write_the_kernel_ignores_is_still_reported(tmp_path: Path) -> None:
    root = proc_sys(tmp_path, {FWD: "1", ACCT: "0", STAMP: "1"})
    with pytest.raises(SysctlsMissing) as err:
        sysctls.ensure(root, write=lambda path, value: None)
    assert err.value.shortfalls == (Shortfall(ACCT, "1", "0"),)


def test_keys_that_do_not_exist_are_named_with_the_module_they_need(tmp_path: Path) -> None:
    root = proc_sys(tmp_path, {FWD: "1"})  # nf_conntrack not loaded: no net/netfilter keys
    with pytest.raises(SysctlsMissing) as err:
        sysctls.ensure(root)
    text = str(err.value)
    assert f"{ACCT}=1 (absent)" in text and f"{STAMP}=1 (absent)" in text
    assert "nf_conntrack module" in text
    assert not (root / "net" / "netfilter").exists()  # nothing created


def test_keys_are_paths_under_the_root_and_nothing_else() -> None:
    assert sysctls.path_of(FWD) == Path("/proc/sys/net/ipv4/ip_forward")
    for bad in ("", "net/ipv4", "net...x", "net.ipv4..ip_forward"):
        with pytest.raises(ValueError):
            sysctls.path_of(bad)
    # This host's real value reads back as the kernel prints it.
    assert sysctls.read(FWD) in {"0", "1"}
