"""Users from the company directory end to end (docs/sso.md, "Directory sync"): the lab with
real OpenVPN servers and stock 2.6 clients, the control plane, and a real OpenLDAP server
(Debian's slapd, tests/ldapserver.py) running in the control plane's namespace.

The operator configures the sync with `vpnfleet directory set` and runs `vpnfleet directory
sync` as documented; the users the clients connect as exist only because the sync created
them, and reach the backend only through the rule of the group the directory fills. A user
disabled in the directory is cut by the next sync (on demand, or the periodic one), is refused
while disabled and comes back when enabled again; a directory outage changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml

from tests import ldapserver as ldap
from tests.e2e.labs import lab_up
from tests.e2e.test_lab_agent import api, client_log, client_running, fetch, ipset_members
from tests.e2e.test_lab_agent import sessions as lab_sessions
from tests.polling import until
from vpnfleet.lab import runner, topology
from vpnfleet.lab.runner import LabInfo, LabUser

pytestmark = [pytest.mark.e2e]

# Client namespaces only: the control plane learns these users from the directory.
CLIENTS = ("dana", "eli", "fay")
STAFF = (*CLIENTS, "hal", "ida", "joe")  # the directory group vpn-staff
OUTSIDER = "zed"  # in the directory, in no mapped group: never created
USERS = tuple(LabUser(name, "nat", lab_access=False, create=False) for name in CLIENTS)
GROUP = "staff"  # the vpnfleet group the directory manages
INTERVAL = 10  # the shortest periodic sync interval the control plane allows
TICK = 5  # how often the control plane checks whether a periodic sync is due
HALTED = "Halt command was pushed by server"


@dataclass
class Lab:
    info: LabInfo
    slapd: ldap.Slapd
    settings: Path  # the directory settings file `vpnfleet directory set` was given


def vpnfleet(info: LabInfo, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as an operator runs it on the host against the lab's control plane."""
    return subprocess.run(
        [sys.executable, "-m", "vpnfleet.cli.main", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **info.cli_env()},
        timeout=120,
        check=False,
    )


async def cli(info: LabInfo, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    res = await asyncio.to_thread(vpnfleet, info, *args)
    if ok:
        assert res.returncode == 0, (args, res.stdout, res.stderr)
    return res


def directory_settings(slapd: ldap.Slapd, **over: Any) -> dict[str, Any]:
    return {
        "url": slapd.url,
        "bind_dn": ldap.ROOT_DN,
        "user_bases": [ldap.PEOPLE],
        "group_bases": [ldap.GROUPS],
        "group_map": {"vpn-staff": GROUP},
        "disabled_attribute": "employeeType",
        "disabled_value": "disabled",
        "new_user_mode": "nat",
        "enabled": False,  # the periodic sync: only the test that is about it turns it on
        **over,
    }


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lab(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Lab]:
    async with lab_up(tmp_path_factory.mktemp("lab"), USERS, letters="vd") as info:
        with ldap.running_slapd(
            tmp_path_factory.mktemp("slapd"),
            host=str(info.plan.admin.ns_address.ip),
            netns=info.plan.ns("cp"),
        ) as slapd:
            people = [ldap.person(u, mail=f"{u}@corp.test") for u in (*STAFF, OUTSIDER)]
            slapd.ldapadd("\n".join(people))
            slapd.ldapadd(ldap.group("vpn-staff", [ldap.user_dn(u) for u in STAFF]))
            conf = info.dir / "directory"
            conf.mkdir(mode=0o700)
            settings, password = conf / "directory.yaml", conf / "bind-password"
            settings.write_text(yaml.safe_dump(directory_settings(slapd)))
            password.write_text(ldap.ROOT_PW + "\n")
            password.chmod(0o600)
            res = await cli(
                info, "directory", "set", "-f", str(settings), "--bind-password-file", str(password)
            )
            assert "directory settings stored" in res.stdout
            yield Lab(info, slapd, settings)


def backend_rule(info: LabInfo) -> dict[str, str]:
    """What the directory's group may reach: the backend's web port."""
    return {"group": GROUP, "destination": str(info.plan.svc_ip), "proto": "tcp", "ports": "8080"}


async def synced(lab: Lab) -> None:
    """What the first test sets up (and checks), for a test run on its own (``-k``)."""
    with lab.info.client() as c:
        if c.get("/api/v1/users/dana").status_code == 404:
            await cli(lab.info, "directory", "sync")
    if not api(lab.info, "GET", f"/api/v1/rules?group={GROUP}"):
        api(lab.info, "POST", "/api/v1/rules", backend_rule(lab.info))


def sessions(lab: Lab, user: str) -> list[dict[str, Any]]:
    return lab_sessions(lab.info, user=user)


def set_disabled(lab: Lab, user: str, disabled: bool) -> None:
    """What HR's tooling does to the directory entry."""
    change = "replace: employeeType\nemployeeType: disabled" if disabled else "delete: employeeType"
    lab.slapd.ldapmodify(f"dn: {ldap.user_dn(user)}\nchangetype: modify\n{change}\n")


async def connect(lab: Lab, user: str) -> dict[str, Any]:
    """The user's stock client connects with the profile the operator downloaded; returns
    the session the control plane lists."""
    profile = lab.info.dir / "clients" / f"{user}.ovpn"
    if not profile.exists():
        await cli(lab.info, "user", "profile", user, "-o", str(profile))
    # A client stopped just before is gone from the list first (its exit notice reaches the
    # server, whose agent reports the end): the session found below is the new one.
    await until(lambda: not sessions(lab, user), 10, f"{user}'s earlier session to end")
    await runner.start_client(lab.info, user)
    address = await runner.client_address(lab.info, user)
    (session,) = await until(
        lambda: [s for s in sessions(lab, user) if s["tunnel_ip"] == address],
        10,
        f"{user}'s session",
    )
    return dict(session)


async def reaches_backend(lab: Lab, user: str) -> bool:
    """A TCP connection from the user's laptop to the backend's web port (2 s at most)."""
    code = (
        "import socket,sys\n"
        "try:\n"
        f"    socket.create_connection(({str(lab.info.plan.svc_ip)!r}, 8080), timeout=2).close()\n"
        "except OSError:\n"
        "    sys.exit(1)\n"
    )
    res = await topology.run_in(
        lab.info.plan.client_ns(user), sys.executable, "-c", code, check=False, timeout=10
    )
    return res.returncode == 0


async def refused_at_connect(lab: Lab, user: str, reason: str) -> None:
    start = len(client_log(lab.info, user))
    await runner.start_client(lab.info, user, wait=False)
    try:
        await until(
            lambda: f"AUTH_FAILED,{reason}" in client_log(lab.info, user)[start:],
            20,
            f"the refusal of {user}'s client",
        )
        assert await runner.client_address(lab.info, user) is None
        assert sessions(lab, user) == []
    finally:
        await runner.stop_client(lab.info, user)


async def watch_cut(
    lab: Lab, user: str, session: dict[str, Any], log_from: int
) -> dict[str, float]:
    """Poll until the user's session is cut; returns when (monotonic) each sign of it was
    first seen: the server's halt in the client's log, the tunnel address gone from the
    pod's firewall set, the session gone from the control plane's list, the client exited.
    Each sign has its own poll (every 0.1 s), so a slow one does not delay the others."""
    pod, tunnel_ip = session["pod"], session["tunnel_ip"]

    async def halted() -> bool:
        return HALTED in client_log(lab.info, user)[log_from:]

    async def off_firewall() -> bool:
        return tunnel_ip not in await ipset_members(lab.info, pod)

    async def unlisted() -> bool:
        return not await asyncio.to_thread(sessions, lab, user)

    async def exited() -> bool:
        return not await client_running(lab.info, user)

    async def first_seen(check: Callable[[], Awaitable[bool]], what: str) -> float:
        await until(check, 30, f"{user}'s session to be cut: {what}", every=0.1)
        return time.monotonic()

    signs = {"halt": halted, "firewall": off_firewall, "listed": unlisted, "client": exited}
    times = await asyncio.gather(*(first_seen(c, name) for name, c in signs.items()))
    return dict(zip(signs, times, strict=True))


def report(what: str, times: dict[str, float]) -> None:
    """Measurements on the test's output (pytest -s shows them)."""
    print(f"\n{what}: " + ", ".join(f"{k} {v:.2f} s" for k, v in times.items()))


@pytest.mark.asyncio(loop_scope="module")
async def test_the_sync_creates_the_users_and_the_group_that_grants_access(lab: Lab) -> None:
    info = lab.info
    dry = await cli(info, "directory", "sync", "--dry-run")
    assert f"+ group {GROUP}" in dry.stdout and "nothing was written" in dry.stdout
    with info.client() as c:
        assert c.get("/api/v1/users/dana").status_code == 404  # the dry run wrote nothing
    res = await cli(info, "directory", "sync")
    for user in STAFF:
        assert f"+ user {user}" in res.stdout
        assert f"+ member {GROUP}/{user}" in res.stdout
    assert OUTSIDER not in res.stdout
    assert f"{len(STAFF) + 1} directory user(s)" in res.stdout
    assert sorted(api(info, "GET", f"/api/v1/groups/{GROUP}")["members"]) == sorted(STAFF)
    dana = api(info, "GET", "/api/v1/users/dana")
    assert dana["enabled"] and dana["email"] == "dana@corp.test"
    with info.client() as c:
        assert c.get(f"/api/v1/users/{OUTSIDER}").status_code == 404
    try:
        session = await connect(lab, "dana")
        # The group grants nothing yet: the tunnel is up but leads nowhere.
        assert not await reaches_backend(lab, "dana")
        # The group's rule: it applies to the live tunnel, no reconnect.
        api(info, "POST", "/api/v1/rules", backend_rule(info))
        await until(lambda: reaches_backend(lab, "dana"), 10, "dana to reach the backend")
        seen = await fetch(info, "dana")  # NAT: the backend sees the pod's address
        assert seen["remote_addr"] == str(info.plan.pod_ip(int(session["pod"].removeprefix("pod"))))
    finally:
        await runner.stop_client(info, "dana")


@pytest.mark.asyncio(loop_scope="module")
async def test_disabled_in_the_directory_is_cut_by_an_on_demand_sync(lab: Lab) -> None:
    info = lab.info
    await synced(lab)
    session = await connect(lab, "dana")
    assert (await fetch(info, "dana"))["remote_addr"]
    log_from = len(client_log(info, "dana"))
    set_disabled(lab, "dana", True)
    # The directory alone cuts nobody: vpnfleet learns it at the next sync (periodic is off).
    await asyncio.sleep(1)
    assert sessions(lab, "dana") and HALTED not in client_log(info, "dana")[log_from:]

    started = time.monotonic()
    watcher = asyncio.create_task(watch_cut(lab, "dana", session, log_from))
    try:
        res = await cli(info, "directory", "sync")
    except BaseException:
        watcher.cancel()
        raise
    returned = time.monotonic()
    seen = await watcher
    assert "- disable user dana: disabled in the directory" in res.stdout
    assert "1 session(s) ended" in res.stdout
    # The sync ends the sessions in its own transaction: the cut may be under way before
    # the command has returned (0 then), so the times from its start are shown too.
    after_return = {k: max(0.0, v - returned) for k, v in seen.items()}
    print(f"\non-demand sync said: {res.stdout.strip().splitlines()[-1]}")
    report(f"on-demand sync: the command took {returned - started:.2f} s; cut after it started",
           {k: v - started for k, v in seen.items()})  # fmt: skip
    report("on-demand sync: cut after the command returned", after_return)
    # "Immediately": the server tells the client to stop and the pod's firewall forgets the
    # tunnel within 2 s of the command's return, like `vpnfleet user disable`.
    assert after_return["halt"] < 2.0 and after_return["firewall"] < 2.0, after_return
    assert after_return["listed"] < 5.0 and after_return["client"] < 5.0, after_return
    with pytest.raises(topology.LabCommandError):  # no traffic, no tunnel
        await fetch(info, "dana")
    assert api(info, "GET", "/api/v1/users/dana")["enabled"] is False

    # While the directory says disabled, the profile no longer gets in.
    await refused_at_connect(lab, "dana", "account disabled")

    # Enabled again in the directory: the next sync lets dana back in, with her group.
    set_disabled(lab, "dana", False)
    res = await cli(info, "directory", "sync")
    assert "+ enable user dana" in res.stdout
    try:
        await connect(lab, "dana")
        assert (await fetch(info, "dana"))["remote_addr"]
    finally:
        await runner.stop_client(info, "dana")


@pytest.mark.asyncio(loop_scope="module")
async def test_a_directory_outage_changes_nothing(lab: Lab) -> None:
    info = lab.info
    await synced(lab)
    session = await connect(lab, "eli")
    log_from = len(client_log(info, "eli"))
    lab.slapd.stop()
    try:
        res = await cli(info, "directory", "sync", ok=False)
        assert res.returncode != 0
        assert "nothing was changed" in res.stderr, res.stderr
        assert "disable" not in res.stdout
        status = json.loads((await cli(info, "directory", "status", "--json")).stdout)
        assert status["last_status"] == "error" and status["last_error"]
        # A cut takes under 2 s (above): 3 s without one is the user left alone.
        await asyncio.sleep(3)
        (still,) = sessions(lab, "eli")
        assert still["id"] == session["id"]
        assert HALTED not in client_log(info, "eli")[log_from:]
        assert session["tunnel_ip"] in await ipset_members(info, session["pod"])
        assert (await fetch(info, "eli"))["remote_addr"]
        assert api(info, "GET", "/api/v1/users/eli")["enabled"] is True
        assert sorted(api(info, "GET", f"/api/v1/groups/{GROUP}")["members"]) == sorted(STAFF)
    finally:
        lab.slapd.start()
        await runner.stop_client(info, "eli")
    # The directory back: the sync finds vpnfleet already matching it.
    res = await cli(info, "directory", "sync")
    assert "no changes" in res.stdout


@pytest.mark.asyncio(loop_scope="module")
async def test_deleted_from_the_directory_is_cut_by_the_next_sync(lab: Lab) -> None:
    """The leaver whose entry HR deletes (the group keeps a dangling member value: OpenLDAP
    without the referential-integrity overlay, as is common). The sync is asked for through
    the API here (as automation would), which times the cut from the request itself, without
    the CLI's start-up."""
    info = lab.info
    await synced(lab)
    session = await connect(lab, "eli")
    log_from = len(client_log(info, "eli"))
    lab.slapd.ldapmodify(f"dn: {ldap.user_dn('eli')}\nchangetype: delete\n")
    watcher = asyncio.create_task(watch_cut(lab, "eli", session, log_from))
    started = time.monotonic()
    try:
        out = await asyncio.to_thread(api, info, "POST", "/api/v1/directory/sync")
    except BaseException:
        watcher.cancel()
        raise
    answered = time.monotonic()
    seen = await watcher
    assert out["diff"]["users_disabled"] == ["eli: no longer in a mapped directory group"]
    assert out["diff"]["members_removed"] == [f"{GROUP}/eli"] and out["sessions_killed"] == 1
    report(f"deleted entry, API sync (answered in {answered - started:.2f} s, "
           f"{out['seconds']} s in the sync): cut after the request",
           {k: v - started for k, v in seen.items()})  # fmt: skip
    assert seen["halt"] - answered < 2.0 and seen["firewall"] - answered < 2.0, seen
    assert "eli" not in api(info, "GET", f"/api/v1/groups/{GROUP}")["members"]
    await refused_at_connect(lab, "eli", "account disabled")


@pytest.mark.asyncio(loop_scope="module")
async def test_the_periodic_sync_cuts_without_a_command(lab: Lab) -> None:
    info = lab.info
    await synced(lab)
    session = await connect(lab, "fay")
    log_from = len(client_log(info, "fay"))
    periodic = lab.info.dir / "directory" / "periodic.yaml"
    periodic.write_text(
        yaml.safe_dump(directory_settings(lab.slapd, enabled=True, interval_seconds=INTERVAL))
    )
    try:
        # No password file: the stored bind password is kept.
        res = await cli(info, "directory", "set", "-f", str(periodic))
        assert "bind password unchanged" in res.stdout
        set_disabled(lab, "fay", True)
        changed = time.monotonic()
        seen = await watch_cut(lab, "fay", session, log_from)
        since_change = {k: v - changed for k, v in seen.items()}
        report(f"periodic sync (every {INTERVAL} s): cut after the directory change", since_change)
        # Within the interval, plus the loop's check and the cut itself.
        assert since_change["halt"] < INTERVAL + TICK + 3, since_change
        status = json.loads((await cli(info, "directory", "status", "--json")).stdout)
        assert status["last_actor"] == "directory-sync" and status["last_status"] == "ok"
        assert status["last_counts"]["users_disabled"] == 1
        assert status["last_counts"]["sessions_killed"] == 1
        assert api(info, "GET", "/api/v1/users/fay")["enabled"] is False
    finally:
        await cli(info, "directory", "set", "-f", str(lab.settings))  # periodic off again
        await runner.stop_client(info, "fay")
