"""Directory sync against a real OpenLDAP server (slapd from Debian, on loopback).

Every test starts its own slapd with a temporary directory (tests/ldapserver.py), seeds it with
ldapadd, runs a real control plane on SQLite and on PostgreSQL, and stops slapd even when it
fails. What is asserted is what an administrator sees: users, groups, sessions, the audit log
and the sync's answers.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import ldapserver as ldap
from tests.api.test_users_groups_rules import problem
from tests.conftest import Server

PEOPLE = ["alice", "bob", "carol", "dave", "erin", "frank"]


@pytest.fixture
def slapd(tmp_path: Path) -> Iterator[ldap.Slapd]:
    """slapd with six people; groups: eng = {alice, bob, ops}, ops = {carol, dave} (nested in
    eng), sales = {erin, frank} (not mapped in most tests)."""
    with ldap.running_slapd(tmp_path / "slapd") as srv:
        srv.ldapadd("\n".join(ldap.person(u, mail=f"{u}@example.test") for u in PEOPLE))
        srv.ldapadd(ldap.group("ops", [ldap.user_dn("carol"), ldap.user_dn("dave")]))
        srv.ldapadd(
            "\n".join(
                [
                    ldap.group(
                        "eng", [ldap.user_dn("alice"), ldap.user_dn("bob"), ldap.group_dn("ops")]
                    ),
                    ldap.group("sales", [ldap.user_dn("erin"), ldap.user_dn("frank")]),
                ]
            )
        )
        yield srv


def settings(srv: ldap.Slapd, **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "url": srv.url,
        "bind_dn": ldap.ROOT_DN,
        "bind_password": ldap.ROOT_PW,
        "user_bases": [ldap.PEOPLE],
        "group_bases": [ldap.GROUPS],
        "group_map": {"eng": "engineering", ldap.group_dn("ops"): "operations"},
        "disabled_attribute": "employeeType",
        "disabled_value": "disabled",
        "enabled": False,  # no periodic sync unless a test asks for it
    }
    body.update(over)
    return body


def configure(admin: httpx.Client, srv: ldap.Slapd, **over: Any) -> None:
    r = admin.put("/api/v1/directory", json=settings(srv, **over))
    assert r.status_code == 200, r.text


def sync(client: httpx.Client, **params: str) -> httpx.Response:
    return client.post("/api/v1/directory/sync", params=params, timeout=120)


def users(admin: httpx.Client) -> dict[str, dict[str, Any]]:
    return {u["name"]: u for u in admin.get("/api/v1/users", params={"limit": 1000}).json()}


def members(admin: httpx.Client, group: str) -> list[str]:
    r = admin.get(f"/api/v1/groups/{group}")
    assert r.status_code == 200, r.text
    return list(r.json()["members"])


def named_token(server: Server, name: str, role: str) -> str:
    with server.client() as c:
        r = c.post("/api/v1/tokens", json={"name": name, "role": role})
        r.raise_for_status()
        return str(r.json()["token"])


def test_sync_creates_users_and_nested_memberships_and_leaves_the_rest_alone(
    server: Server, admin: httpx.Client, slapd: ldap.Slapd, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # Local state the directory does not own: a local user in an unmanaged group, and the same
    # local user in a group the directory manages (the directory's view replaces it there).
    admin.post("/api/v1/groups", json={"name": "contractors"}).raise_for_status()
    admin.post("/api/v1/groups", json={"name": "engineering"}).raise_for_status()
    admin.post(
        "/api/v1/users", json={"name": "zed", "groups": ["contractors", "engineering"]}
    ).raise_for_status()
    # erin exists locally already: adopted when she appears in a mapped group (not here).
    admin.post("/api/v1/users", json={"name": "erin"}).raise_for_status()
    configure(admin, slapd)
    with server.client(named_token(server, "ops-anna", "operator")) as operator:
        out = sync(operator)
    assert out.status_code == 200, out.text
    body = out.json()
    assert body["applied"] is True and body["dry_run"] is False
    assert body["diff"]["users_created"] == ["alice", "bob", "carol", "dave"]
    assert body["diff"]["groups_created"] == ["operations"]
    assert body["diff"]["members_removed"] == ["engineering/zed"]
    assert body["queries"] == 3  # bind, one page of users, one page of groups

    have = users(admin)
    assert sorted(have) == ["alice", "bob", "carol", "dave", "erin", "zed"]
    for name in ("alice", "bob", "carol", "dave"):
        assert have[name]["enabled"] and have[name]["mode"] == "nat"
        assert have[name]["email"] == f"{name}@example.test"
        assert have[name]["certificate"] is not None  # a profile can be downloaded
    assert members(admin, "engineering") == ["alice", "bob", "carol", "dave"]  # ops nested
    assert members(admin, "operations") == ["carol", "dave"]
    assert members(admin, "contractors") == ["zed"]  # unmanaged group untouched
    assert have["zed"]["enabled"] and have["erin"]["enabled"]  # never managed: untouched

    audit = admin.get("/api/v1/audit/admin", params={"action": "directory.sync"}).json()
    assert len(audit) == 1 and audit[0]["actor"] == "ops-anna"
    assert audit[0]["after"]["diff"]["users_created"] == ["alice", "bob", "carol", "dave"]
    assert admin.get("/api/v1/audit/admin", params={"action": "directory.set"}).json()

    # A second sync finds nothing to do and writes no audit row.
    again = sync(admin).json()
    assert sum(again["counts"].values()) == 0
    assert len(admin.get("/api/v1/audit/admin", params={"action": "directory.sync"}).json()) == 1

    # Roles: an operator may sync but not configure; an auditor may only read the status.
    with server.client(server.make_token("operator")) as operator:
        refused = operator.put("/api/v1/directory", json=settings(slapd))
        assert "needs admin" in problem(refused, 403)
    with server.client(server.make_token("auditor")) as auditor:
        problem(sync(auditor), 403)
        assert auditor.get("/api/v1/directory/status").json()["last_status"] == "ok"

    # The bind password is in no answer, no audit entry and no log line.
    seen = [
        admin.get("/api/v1/directory").text,
        admin.get("/api/v1/directory/status").text,
        admin.get("/api/v1/audit/admin", params={"limit": 1000}).text,
        out.text,
        caplog.text,
    ]
    assert not [s for s in seen if ldap.ROOT_PW in s]
    shown = admin.get("/api/v1/directory").json()
    assert "bind_password" not in shown and shown["status"]["last_actor"] == "bootstrap-admin"


def test_dry_run_shows_the_diff_and_changes_nothing(
    server: Server, admin: httpx.Client, slapd: ldap.Slapd
) -> None:
    configure(admin, slapd)
    head = admin.get("/api/v1/revision").json()["revision"]
    audit_before = admin.get("/api/v1/audit/admin").json()
    r = sync(admin, dry_run="true")
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["dry_run"] is True and out["applied"] is False and out["revision"] is None
    assert out["diff"]["users_created"] == ["alice", "bob", "carol", "dave"]
    assert out["diff"]["members_added"] == [
        "engineering/alice",
        "engineering/bob",
        "engineering/carol",
        "engineering/dave",
        "operations/carol",
        "operations/dave",
    ]
    assert out["counts"]["users_created"] == 4
    assert users(admin) == {}
    assert admin.get("/api/v1/groups").json() == []
    assert admin.get("/api/v1/revision").json()["revision"] == head
    assert admin.get("/api/v1/audit/admin").json() == audit_before
    assert admin.get("/api/v1/directory/status").json()["last_attempt_at"] is None
    # Read from memberOf (slapd's memberof overlay keeps it on users and nested groups), the
    # directory says the same.
    configure(admin, slapd, member_attribute="memberOf")
    assert sync(admin, dry_run="true").json()["diff"] == out["diff"]
    configure(admin, slapd)
    # The same diff is what a real sync then applies.
    applied = sync(admin).json()
    assert applied["diff"] == out["diff"]


def opened(agent: httpx.Client, uid: str, user: str, real_ip: str) -> None:
    body = {
        "uid": uid,
        "user": user,
        "pod": "pod1",
        "mode": "nat",
        "tunnel_ip": "10.200.0.2",
        "real_ip": real_ip,
        "real_port": 5000,
        "started_at": dt.datetime.now(dt.UTC).isoformat(),
    }
    r = agent.post("/api/v1/agent/sessions/open", json=body)
    assert r.status_code == 200 and r.json()["allowed"], r.text


def test_disabled_or_removed_in_the_directory_is_disabled_here_and_cut(
    server: Server, admin: httpx.Client, slapd: ldap.Slapd
) -> None:
    # Two of four at once is more than the default limit (25 %): this directory allows half.
    configure(admin, slapd, max_disable_fraction=0.5)
    assert sync(admin).status_code == 200
    with server.client(server.pod_token("pod1")) as agent:
        agent.post("/api/v1/agent/register", json={"name": "pod1"}).raise_for_status()
        opened(agent, "pod1-alice001", "alice", "198.51.100.1")
        opened(agent, "pod1-carol001", "carol", "198.51.100.2")
        opened(agent, "pod1-bob00001", "bob", "198.51.100.3")

        # alice is disabled in the directory; carol leaves ops (and so eng, through ops).
        slapd.ldapmodify(
            f"dn: {ldap.user_dn('alice')}\nchangetype: modify\nadd: employeeType\n"
            "employeeType: disabled\n"
        )
        slapd.ldapmodify(
            f"dn: {ldap.group_dn('ops')}\nchangetype: modify\ndelete: member\n"
            f"member: {ldap.user_dn('carol')}\n"
        )
        out = sync(admin)
        assert out.status_code == 200, out.text
        assert out.json()["diff"]["users_disabled"] == [
            "alice: disabled in the directory",
            "carol: no longer in a mapped directory group",
        ]
        assert out.json()["sessions_killed"] == 2

        have = users(admin)
        assert not have["alice"]["enabled"] and not have["carol"]["enabled"]
        assert have["bob"]["enabled"]
        assert members(admin, "operations") == ["dave"]
        # The pod learns the kill from its snapshot (and its watch stream).
        snap = agent.get("/api/v1/agent/snapshot").json()
        assert {s["uid"]: s["kill"] for s in snap["sessions"]} == {
            "pod1-alice001": "disabled in the directory",
            "pod1-carol001": "disabled in the directory",
            "pod1-bob00001": None,
        }
        # And a disabled user cannot open a new session.
        body = {
            "uid": "pod1-alice002",
            "user": "alice",
            "pod": "pod1",
            "mode": "nat",
            "tunnel_ip": "10.200.0.3",
            "real_ip": "198.51.100.9",
            "started_at": dt.datetime.now(dt.UTC).isoformat(),
        }
        verdict = agent.post("/api/v1/agent/sessions/open", json=body).json()
        assert verdict["allowed"] is False and verdict["reason"] == "user is disabled"

    # Back in the directory: the sync enables alice again; a user an administrator disabled
    # by hand (bob) stays disabled whatever the directory says.
    admin.post("/api/v1/users/bob/disable").raise_for_status()
    slapd.ldapmodify(f"dn: {ldap.user_dn('alice')}\nchangetype: modify\ndelete: employeeType\n")
    out = sync(admin).json()
    assert out["diff"]["users_enabled"] == ["alice"]
    have = users(admin)
    assert have["alice"]["enabled"] and not have["bob"]["enabled"]


def test_directory_outage_and_wrong_password_change_nothing(
    server: Server, admin: httpx.Client, slapd: ldap.Slapd
) -> None:
    configure(admin, slapd)
    assert sync(admin).status_code == 200
    before = users(admin)
    head = admin.get("/api/v1/revision").json()["revision"]

    # Wrong credentials: the password is replaced (admin), the sync refuses to guess.
    configure(admin, slapd, bind_password="not-the-password")
    detail = problem(sync(admin), 502)
    assert "refused the bind DN" in detail and "invalidCredentials" in detail
    assert "nothing was changed" in detail and "not-the-password" not in detail
    status = admin.get("/api/v1/directory/status").json()
    assert status["last_status"] == "error" and "invalidCredentials" in status["last_error"]

    # Settings without a password keep the stored one.
    configure(admin, slapd, bind_password=None)
    assert problem(sync(admin), 502)  # still the wrong one
    configure(admin, slapd)  # the right one again

    # The directory is down: the same, and nobody is disabled.
    slapd.stop()
    detail = problem(sync(admin), 502)
    assert f"cannot reach the directory at {slapd.url}" in detail
    assert users(admin) == before
    assert admin.get("/api/v1/revision").json()["revision"] == head
    status = admin.get("/api/v1/directory/status").json()
    assert status["last_status"] == "error" and status["last_success_at"] is not None


def test_a_search_that_finds_nobody_is_refused_as_a_mass_disable(
    server: Server, admin: httpx.Client, slapd: ldap.Slapd
) -> None:
    configure(admin, slapd)
    assert sync(admin).status_code == 200
    # A typo in the filter: no user matches any more.
    configure(admin, slapd, user_filter="(objectClass=inetOrgPersn)")
    r = sync(admin)
    detail = problem(r, 409)
    assert "refusing to disable 4 of 4" in detail and "--force" in detail
    assert r.json()["counts"]["users_disabled"] == 4
    assert all(u["enabled"] for u in users(admin).values())
    status = admin.get("/api/v1/directory/status").json()
    assert status["last_status"] == "refused"
    # A dry run shows the same refusal and records nothing.
    problem(sync(admin, dry_run="true"), 409)
    # One user out of four (25 %, the default limit) is not a mass disable.
    configure(admin, slapd)
    slapd.ldapmodify(
        f"dn: {ldap.user_dn('bob')}\nchangetype: modify\nadd: employeeType\n"
        "employeeType: disabled\n"
    )
    assert sync(admin).json()["counts"]["users_disabled"] == 1
    # --force applies even a mass disable when that is what the directory says.
    configure(admin, slapd, user_filter="(objectClass=inetOrgPersn)")
    forced = sync(admin, force="true")
    assert forced.status_code == 200, forced.text
    assert not any(u["enabled"] for u in users(admin).values())


def test_periodic_sync_disables_within_the_interval(
    server: Server, admin: httpx.Client, slapd: ldap.Slapd
) -> None:
    configure(admin, slapd, enabled=True, interval_seconds=10)

    def wait_for(check: Any, what: str, limit: float = 30) -> None:
        deadline = time.monotonic() + limit
        while not check():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.5)

    wait_for(lambda: "alice" in users(admin), "the first periodic sync")
    status = admin.get("/api/v1/directory/status").json()
    assert status["last_actor"] == "directory-sync" and status["last_status"] == "ok"
    slapd.ldapmodify(
        f"dn: {ldap.group_dn('eng')}\nchangetype: modify\ndelete: member\n"
        f"member: {ldap.user_dn('bob')}\n"
    )
    changed = time.monotonic()
    wait_for(lambda: not users(admin)["bob"]["enabled"], "bob disabled", limit=25)
    # Within the interval plus the loop's tick (10 s + 5 s) and some slack for a busy machine.
    assert time.monotonic() - changed < 25
    audit = admin.get("/api/v1/audit/admin", params={"action": "directory.sync"}).json()
    assert audit[0]["actor"] == "directory-sync"
    assert audit[0]["after"]["diff"]["users_disabled"] == [
        "bob: no longer in a mapped directory group"
    ]


def test_one_replica_at_a_time_through_the_lease(
    server: Server, admin: httpx.Client, slapd: ldap.Slapd
) -> None:
    """While another replica holds the sync lease (written into the shared database as that
    replica would), a sync here is refused with who holds it; a dry run, which writes nothing,
    still runs; once the lease has run out the sync goes ahead."""
    from sqlalchemy import create_engine, text

    configure(admin, slapd)
    engine = create_engine(server.database_url)
    try:
        until = dt.datetime.now(dt.UTC).replace(tzinfo=None) + dt.timedelta(minutes=5)
        with engine.begin() as conn:
            conn.execute(
                text("UPDATE directory_config SET lease_holder = 'replica-b:42', lease_until = :u"),
                {"u": until},
            )
        detail = problem(sync(admin), 409)
        assert "already running (replica-b:42)" in detail
        assert admin.get("/api/v1/directory/status").json()["syncing"] == "replica-b:42"
        assert sync(admin, dry_run="true").status_code == 200
        assert users(admin) == {}
        with engine.begin() as conn:
            conn.execute(
                text("UPDATE directory_config SET lease_until = :u"),
                {"u": until - dt.timedelta(minutes=10)},
            )
        assert sync(admin).status_code == 200
        assert sorted(users(admin)) == ["alice", "bob", "carol", "dave"]
        status = admin.get("/api/v1/directory/status").json()
        assert status["syncing"] is None
    finally:
        engine.dispose()


def test_starttls_and_ldaps_check_the_server_against_the_ca_file(
    server: Server, admin: httpx.Client, tmp_path: Path
) -> None:
    """A directory over TLS (slapd with a certificate from a CA made here): StartTLS and
    ldaps:// work with that CA file; with another CA the sync fails and changes nothing."""
    from vpnfleet.controlplane import pki

    ca = pki.create_ca("directory test CA")
    leaf = pki.issue_https_server_cert(ca, ["127.0.0.1"])
    other = pki.create_ca("some other CA")
    files = {}
    for name, pem in (("ca.pem", ca.cert_pem), ("cert.pem", leaf.cert_pem),
                      ("key.pem", leaf.key_pem), ("other.pem", other.cert_pem)):  # fmt: skip
        files[name] = tmp_path / name
        files[name].write_text(pem)
    tls = (files["ca.pem"], files["cert.pem"], files["key.pem"])
    with ldap.running_slapd(tmp_path / "slapd", tls=tls) as srv:
        srv.ldapadd(ldap.person("alice") + "\n" + ldap.group("eng", [ldap.user_dn("alice")]))
        over = {"group_map": {"eng": "engineering"}}
        configure(admin, srv, start_tls=True, ca_file=str(files["other.pem"]), **over)
        detail = problem(sync(admin), 502)
        assert "certificate" in detail.lower() and "nothing was changed" in detail
        assert users(admin) == {}

        configure(admin, srv, start_tls=True, ca_file=str(files["ca.pem"]), **over)
        assert sync(admin).json()["diff"]["users_created"] == ["alice"]

        srv.ldapadd(ldap.person("bob") + "\n")
        srv.ldapmodify(
            f"dn: {ldap.group_dn('eng')}\nchangetype: modify\nadd: member\n"
            f"member: {ldap.user_dn('bob')}\n"
        )
        configure(admin, srv, url=srv.ldaps_url, ca_file=str(files["ca.pem"]), **over)
        assert sync(admin).json()["diff"]["users_created"] == ["bob"]


def test_cli_set_show_dry_run_sync_status(
    server: Server, slapd: ldap.Slapd, tmp_path: Path
) -> None:
    """The commands an administrator types: the password from a file, never on the command
    line or in the settings file; the dry run prints the diff; sync and status tell what
    happened; errors are one sentence and exit 1."""
    import yaml

    from tests.api.test_cli import run

    body = settings(slapd)
    password = body.pop("bind_password")
    conf = tmp_path / "directory.yaml"
    conf.write_text(yaml.safe_dump(body))
    pw_file = tmp_path / "bind-password"
    pw_file.write_text(password + "\n")

    leaked = tmp_path / "leaky.yaml"
    leaked.write_text(yaml.safe_dump({**body, "bind_password": password}))
    out = run(server, "directory", "set", "-f", str(leaked), ok=False)
    assert out.returncode == 2 and "--bind-password-file" in out.stderr

    out = run(server, "directory", "status")
    assert "no directory configured" in out.stdout
    out = run(server, "directory", "set", "-f", str(conf), "--bind-password-file", str(pw_file))
    assert "directory settings stored" in out.stdout

    out = run(server, "directory", "sync", "--dry-run")
    assert "+ user alice" in out.stdout and "+ member engineering/carol" in out.stdout
    assert "dry run: 12 change(s), nothing was written" in out.stdout
    out = run(server, "directory", "sync")
    assert "synced at revision" in out.stdout and "3 LDAP queries" in out.stdout
    out = run(server, "directory", "status")
    assert "last sync: ok at" in out.stdout and "users_created 4" in out.stdout
    out = run(server, "directory", "show")
    assert "eng -> engineering" in out.stdout and password not in out.stdout

    slapd.stop()
    out = run(server, "directory", "sync", ok=False)
    assert out.returncode == 1 and "cannot reach the directory" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_large_import_commits_new_users_in_batches(
    server: Server, admin: httpx.Client, slapd: ldap.Slapd, monkeypatch: pytest.MonkeyPatch
) -> None:
    """New users are created a batch per transaction (here 3 per batch: 3 users, 1 user, then
    the changes to existing users), each with its own audit entry naming the part; together
    they are the whole diff."""
    from vpnfleet.controlplane import directorysync

    monkeypatch.setattr(directorysync, "CREATE_BATCH", 3)
    # Gateway users each take a lease from the gateway pool (the one-by-one path).
    configure(admin, slapd, new_user_mode="gateway")
    out = sync(admin)
    assert out.status_code == 200, out.text
    assert out.json()["diff"]["users_created"] == ["alice", "bob", "carol", "dave"]
    audit = admin.get("/api/v1/audit/admin", params={"action": "directory.sync"}).json()
    parts = {a["after"]["part"]: a["after"]["diff"]["users_created"] for a in audit}
    # The third part (changes to existing users) is empty here: no entry of its own.
    assert parts == {"1/3": ["alice", "bob", "carol"], "2/3": ["dave"]}
    assert members(admin, "engineering") == ["alice", "bob", "carol", "dave"]
    assert members(admin, "operations") == ["carol", "dave"]
    assert admin.get("/api/v1/directory/status").json()["last_counts"]["users_created"] == 4
    have = users(admin)
    assert {u["mode"] for u in have.values()} == {"gateway"}
    addresses = {u["gateway_address"] for u in have.values()}
    assert len(addresses) == 4 and all(a.startswith("10.201.") for a in addresses)
