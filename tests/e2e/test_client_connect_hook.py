"""bench/client_connect.sh, the benchmarks' shell-hook baseline, does what it claims.

The hook is not part of vpnfleet; the connect-storm benchmarks compare the agent with it, so
these tests check that the baseline does the real work (ipset entries per group, refusals)
and is not cheap because it does nothing. Real ipset in a namespace each test creates; the last
test runs it under a real OpenVPN server with a stock client.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.netns import Netns, NetnsPool, existing_namespaces, requires_netns
from tests.e2e.ovpn_fixtures import OpenVPNProcess, OvpnLab, wait_until

HOOK = Path(__file__).resolve().parents[2] / "bench" / "client_connect.sh"
NS_PREFIX = "vft-hk-"
USERS = "alice g0 g1\nbob g2\ncarol\nmallory g0 full\ntrudy g0 g9\n"

pytestmark = [pytest.mark.e2e, requires_netns("ipset", "awk")]


@pytest.fixture
def ns(tmp_path: Path) -> Iterator[Netns]:
    with NetnsPool(NS_PREFIX) as pool:
        net = pool.create("h")
        for g in ("g0", "g1", "g2"):
            net.run("ipset", "create", f"hk-{g}", "hash:ip")
        # A set that is full: the kernel refuses the next add after earlier ones went through.
        net.run("ipset", "create", "hk-full", "hash:ip", "maxelem", "1")
        net.run("ipset", "add", "hk-full", "10.9.9.9")
        (tmp_path / "users").write_text(USERS)
        yield net
    assert not [n for n in existing_namespaces(NS_PREFIX) if n.startswith(pool.base)]


def members(ns: Netns, group: str) -> set[str]:
    out = ns.run("ipset", "list", f"hk-{group}").stdout
    return set(out.partition("Members:\n")[2].split())


def hook(ns: Netns, tmp_path: Path, kind: str, cn: str, ip: str = "10.77.0.5") -> int:
    """Run the hook as OpenVPN does: its environment, the config file argument on connect."""
    args = [str(HOOK), str(tmp_path / "users"), "hk"]
    if kind == "client-connect":
        conf = tmp_path / "ccd.tmp"
        conf.write_text("")
        args.append(str(conf))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "script_type": kind,
           "common_name": cn, "ifconfig_pool_remote_ip": ip}  # fmt: skip
    return subprocess.run(ns.argv(*args), env=env, capture_output=True, timeout=10).returncode


def test_connect_adds_the_address_to_each_group_of_the_user_and_disconnect_removes_it(
    ns: Netns, tmp_path: Path
) -> None:
    assert hook(ns, tmp_path, "client-connect", "alice") == 0
    assert hook(ns, tmp_path, "client-connect", "bob", "10.77.0.6") == 0
    assert members(ns, "g0") == {"10.77.0.5"}
    assert members(ns, "g1") == {"10.77.0.5"}
    assert members(ns, "g2") == {"10.77.0.6"}
    # A user in no group is let in and changes no set.
    assert hook(ns, tmp_path, "client-connect", "carol", "10.77.0.7") == 0
    assert hook(ns, tmp_path, "client-disconnect", "alice") == 0
    assert members(ns, "g0") == members(ns, "g1") == set()
    assert members(ns, "g2") == {"10.77.0.6"}


@pytest.mark.parametrize(
    "cn",
    ["dave", "ali", "alicex", "alice g0", "$(touch /tmp/x)", ""],
    ids=["unknown", "prefix", "longer", "space", "shell", "empty"],
)
def test_an_unknown_or_disabled_user_is_refused_and_gets_no_access(
    ns: Netns, tmp_path: Path, cn: str
) -> None:
    assert hook(ns, tmp_path, "client-connect", cn) == 1
    assert members(ns, "g0") == members(ns, "g1") == members(ns, "g2") == set()


@pytest.mark.parametrize("cn", ["mallory", "trudy"], ids=["set-full", "no-set"])
def test_a_failing_ipset_refuses_the_client_and_leaves_no_entry(
    ns: Netns, tmp_path: Path, cn: str
) -> None:
    # The second group's set is full (the first add went through) or missing: the hook fails
    # closed (OpenVPN refuses the client on a non-zero status) and takes back its entries.
    assert hook(ns, tmp_path, "client-connect", cn) == 1
    assert members(ns, "g0") == set()
    assert members(ns, "full") == {"10.9.9.9"}


async def test_under_real_openvpn_a_client_gets_in_and_its_pool_address_lands_in_the_sets(
    tmp_path: Path,
) -> None:
    async with OvpnLab.create() as lab:
        for g in ("g0", "g1", "g2"):
            lab.server_ns.run("ipset", "create", f"hk-{g}", "hash:ip")
        users = lab.workdir / "users"
        users.write_text(USERS)
        drop = {"management", "management-client-auth", "auth-user-pass-optional",
                "management-hold", "script-security"}  # fmt: skip
        conf = [ln for ln in lab.server_config().splitlines() if ln.split(" ")[0] not in drop]
        cmd = f"{HOOK} {users} hk"
        conf += ["ifconfig-pool 10.77.0.2 10.77.0.254 255.255.255.0", "script-security 2",
                 f'client-connect "{cmd}"', f'client-disconnect "{cmd}"']  # fmt: skip
        server = OpenVPNProcess(lab.server_ns, lab.workdir, "server", "\n".join(conf) + "\n")
        lab.processes.append(server)
        server.start()
        await server.wait_log("Initialization Sequence Completed", 15)

        alice = lab.start_client("alice")
        await alice.wait_log("Initialization Sequence Completed", 30)
        addr = await lab.client_tunnel_ipv4()
        assert addr is not None
        ip = addr.split("/")[0]
        assert members(lab.server_ns, "g0") == members(lab.server_ns, "g1") == {ip}
        assert members(lab.server_ns, "g2") == set()

        alice.stop()  # SIGTERM: the client tells the server (explicit-exit-notify)
        await wait_until(
            lambda: not members(lab.server_ns, "g0") and not members(lab.server_ns, "g1"),
            15, "the disconnect hook to empty the sets",
        )  # fmt: skip

        dave = lab.start_client("dave")  # a valid certificate, but not in the users file
        await server.wait_log("dave is not allowed", 30)
        await server.wait_log(r"Failed running command \(--client-connect\).*status: 1", 5)
        assert await lab.client_tunnel_ipv4() is None
        dave.stop()
        assert all(not members(lab.server_ns, g) for g in ("g0", "g1", "g2"))
