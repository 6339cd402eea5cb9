"""The web console over HTTP: sign-in, sessions, CSRF, roles, throttling, audit, headers.

Real control plane on SQLite and PostgreSQL; the browser itself is in
tests/e2e/test_console_browser.py."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server, running_server

PASSWORD = "correct horse battery staple"
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def make_account(server: Server, name: str, role: str, password: str = PASSWORD) -> None:
    with server.client() as api:
        r = api.post(
            "/api/v1/console-accounts", json={"name": name, "role": role, "password": password}
        )
        assert r.status_code == 201, r.text


def browser(server: Server) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=30, follow_redirects=False)


def sign_in(client: httpx.Client, name: str, password: str = PASSWORD) -> httpx.Response:
    form = client.get("/console/login")
    assert form.status_code == 200
    token = CSRF.search(form.text)
    assert token
    return client.post(
        "/console/login",
        data={"csrf": token.group(1), "name": name, "password": password, "next": "/console/"},
    )


def csrf_of(client: httpx.Client, path: str = "/console/") -> str:
    r = client.get(path)
    assert r.status_code == 200, r.text
    found = CSRF.search(r.text)
    assert found
    return found.group(1)


@pytest.fixture
def operator(server: Server) -> Iterator[httpx.Client]:
    make_account(server, "olga", "operator")
    with browser(server) as c:
        assert sign_in(c, "olga").status_code == 303
        yield c


def test_pages_need_a_sign_in_and_come_back_after_it(server: Server) -> None:
    make_account(server, "olga", "operator")
    with browser(server) as c:
        r = c.get("/console/users")
        assert r.status_code == 303
        assert r.headers["location"] == "/console/login?next=%2Fconsole%2Fusers"
        form = c.get("/console/login?next=/console/users")
        token = CSRF.search(form.text)
        assert token
        done = c.post(
            "/console/login",
            data={"csrf": token.group(1), "name": "olga", "password": PASSWORD,
                  "next": "/console/users"},
        )  # fmt: skip
        assert done.status_code == 303
        assert done.headers["location"] == "/console/users"
        cookie = next(h for h in done.headers.get_list("set-cookie") if "vpnfleet_console=" in h)
        assert "HttpOnly" in cookie
        assert "SameSite=strict" in cookie or "SameSite=Strict" in cookie
        page = c.get("/console/users")
        assert page.status_code == 200
        assert "<h1>Users</h1>" in page.text
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert "frame-ancestors 'none'" in csp
        assert page.headers["cache-control"] == "no-store"
        assert "<script>" not in page.text  # no inline script anywhere


def test_next_never_leaves_the_console(server: Server) -> None:
    make_account(server, "olga", "operator")
    with browser(server) as c:
        form = c.get("/console/login")
        token = CSRF.search(form.text)
        assert token
        for target in ("https://evil.example/", "//evil.example/", "/console//evil.example"):
            c.cookies.clear()
            form = c.get("/console/login")
            token = CSRF.search(form.text)
            assert token
            r = c.post(
                "/console/login",
                data={"csrf": token.group(1), "name": "olga", "password": PASSWORD,
                      "next": target},
            )  # fmt: skip
            assert r.headers["location"] == "/console/", target


def test_wrong_passwords_are_refused_then_throttled(server: Server) -> None:
    make_account(server, "olga", "operator")
    with browser(server) as c:
        for _ in range(5):
            r = sign_in(c, "olga", "wrong password here")
            assert r.status_code == 401
            assert "wrong name or password" in r.text
            assert "wrong password here" not in r.text  # never echoed
        r = sign_in(c, "olga")  # right password, but the budget is spent
        assert r.status_code == 429
        assert "try again in" in r.text
        assert "vpnfleet_console=" not in r.headers.get("set-cookie", "")
        # An unknown name is refused like a wrong password.
        c.cookies.clear()
        assert sign_in(c, "nobody").status_code == 401


def test_the_login_form_needs_its_own_csrf_value(server: Server) -> None:
    make_account(server, "olga", "operator")
    with browser(server) as c:
        r = c.post("/console/login", data={"csrf": "x", "name": "olga", "password": PASSWORD})
        assert r.status_code == 403
        assert "vpnfleet_console=" not in r.headers.get("set-cookie", "")


def test_operator_creates_a_user_and_it_is_audited_under_their_name(
    server: Server, operator: httpx.Client
) -> None:
    token = csrf_of(operator, "/console/new-user")
    r = operator.post(
        "/console/new-user",
        data={"csrf": token, "name": "carol", "email": "carol@example.com", "mode": "gateway",
              "max_sessions": "2", "groups": ""},
    )  # fmt: skip
    assert r.status_code == 303
    assert r.headers["location"].startswith("/console/users/carol")
    page = operator.get(r.headers["location"])
    assert "created user carol" in page.text
    with server.client() as api:
        user = api.get("/api/v1/users/carol").json()
        assert (user["mode"], user["max_sessions"], user["email"]) == (
            "gateway", 2, "carol@example.com")  # fmt: skip
        log = api.get("/api/v1/audit/admin", params={"action": "user.create"}).json()
        assert [(e["actor"], e["role"], e["target"]) for e in log] == [
            ("console:olga", "operator", "carol")
        ]


def test_posts_without_the_csrf_token_or_from_another_site_are_refused(
    server: Server, operator: httpx.Client
) -> None:
    token = csrf_of(operator)
    r = operator.post("/console/new-user", data={"name": "mallory"})
    assert r.status_code == 403
    assert "CSRF" in r.text
    r = operator.post("/console/new-user", data={"name": "mallory", "csrf": "guess"})
    assert r.status_code == 403
    r = operator.post(
        "/console/new-user",
        data={"name": "mallory", "csrf": token},
        headers={"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
    )
    assert r.status_code == 403
    assert "cross-site" in r.text
    with server.client() as api:
        assert api.get("/api/v1/users/mallory").status_code == 404


def test_bad_input_is_one_sentence_and_writes_nothing(
    server: Server, operator: httpx.Client
) -> None:
    token = csrf_of(operator)
    r = operator.post("/console/new-user", data={"csrf": token, "name": "Not Valid"})
    assert r.status_code == 422
    assert "name" in r.text and "lowercase" in r.text
    r = operator.post("/console/groups/new", data={"csrf": token, "name": "devs"})
    assert r.status_code == 303
    r = operator.post(
        "/console/groups/devs/rules",
        data={"csrf": token, "destination": "10.20.0.0/33", "proto": "tcp", "ports": "22"},
    )
    assert r.status_code == 422
    assert "<h1>Invalid input</h1>" in r.text
    r = operator.post(
        "/console/groups/devs/rules",
        data={"csrf": token, "destination": "10.20.0.0/16", "proto": "tcp", "ports": "22,443"},
    )
    assert r.status_code == 303
    with server.client() as api:
        rules = api.get("/api/v1/rules", params={"group": "devs"}).json()
        assert [(x["destination"], x["proto"], x["ports"]) for x in rules] == [
            ("10.20.0.0/16", "tcp", "22,443")
        ]


def test_an_auditor_cannot_reach_operator_pages_or_act(server: Server) -> None:
    make_account(server, "audrey", "auditor")
    with server.client() as api:
        api.post("/api/v1/users", json={"name": "carol"}).raise_for_status()
    with browser(server) as c:
        assert sign_in(c, "audrey").status_code == 303
        overview = c.get("/console/")
        assert overview.status_code == 200
        assert 'href="/console/users"' not in overview.text
        assert 'href="/console/accounts"' not in overview.text
        for path in ("/console/users", "/console/users/carol", "/console/groups",
                     "/console/accounts"):  # fmt: skip
            r = c.get(path)
            assert r.status_code == 403, path
            assert "<h1>Forbidden</h1>" in r.text
        token = csrf_of(c)
        r = c.post("/console/users/carol/disable", data={"csrf": token})
        assert r.status_code == 403
        assert c.get("/console/audit/log").status_code == 200
        assert c.get("/console/sessions").status_code == 200
    with server.client() as api:
        assert api.get("/api/v1/users/carol").json()["enabled"] is True


def test_disabling_an_account_or_changing_its_password_ends_its_sessions(
    server: Server, operator: httpx.Client
) -> None:
    assert operator.get("/console/").status_code == 200
    with server.client() as api:
        r = api.patch("/api/v1/console-accounts/olga", json={"password": "another long secret"})
        assert r.status_code == 200
    assert operator.get("/console/").status_code == 303  # signed out
    assert sign_in(operator, "olga", "another long secret").status_code == 303
    assert operator.get("/console/").status_code == 200
    with server.client() as api:
        r = api.patch("/api/v1/console-accounts/olga", json={"disabled": True})
        assert r.status_code == 200
    assert operator.get("/console/").status_code == 303
    assert sign_in(operator, "olga", "another long secret").status_code == 401


def test_sign_out_ends_the_session_on_the_server(server: Server, operator: httpx.Client) -> None:
    cookie = operator.cookies.get("vpnfleet_console")
    assert cookie
    r = operator.post("/console/logout", data={"csrf": csrf_of(operator)})
    assert r.status_code == 303
    with browser(server) as replay:
        replay.cookies.set("vpnfleet_console", cookie)
        assert replay.get("/console/").status_code == 303


def test_who_was_this_reads_a_pasted_line(server: Server, operator: httpx.Client) -> None:
    token = csrf_of(operator, "/console/audit/who")
    line = '10.0.3.2:40000 - - [04/Dec/2026:10:00:00 +0000] "GET / HTTP/1.1" 200 5'
    r = operator.post("/console/audit/who", data={"csrf": token, "line": line})
    assert r.status_code == 200
    assert "Read as nginx: 10.0.3.2:40000" in r.text
    custom = '$remote_addr $remote_port [$time_local] "$request"'
    line2 = '10.0.3.2 40001 [04/Dec/2026:10:00:00 +0000] "GET / HTTP/1.1"'
    r = operator.post(
        "/console/audit/who", data={"csrf": token, "line": line2, "log_format": custom}
    )
    assert r.status_code == 200, r.text
    assert "10.0.3.2:40001" in r.text
    r = operator.post("/console/audit/who", data={"csrf": token, "line": "garbage"})
    assert r.status_code == 422
    assert "could not be read" in r.text


def test_account_api_is_admin_only_and_never_shows_a_hash(server: Server) -> None:
    make_account(server, "olga", "operator")
    operator_token = server.make_token("operator")
    with server.client(operator_token) as c:
        assert c.get("/api/v1/console-accounts").status_code == 403
        r = c.post("/api/v1/console-accounts", json={"name": "x", "role": "admin",
                                                     "password": PASSWORD})  # fmt: skip
        assert r.status_code == 403
    with server.client() as api:
        listed = api.get("/api/v1/console-accounts").json()
        assert [a["name"] for a in listed] == ["olga"]
        assert "scrypt" not in str(listed) and "password" not in listed[0]
        weak = api.post("/api/v1/console-accounts",
                        json={"name": "bob", "role": "operator", "password": "short1"})  # fmt: skip
        assert weak.status_code == 422
        assert "short1" not in weak.text
        dup = api.post("/api/v1/console-accounts",
                       json={"name": "olga", "role": "operator", "password": PASSWORD})  # fmt: skip
        assert dup.status_code == 409
        bad_role = api.post("/api/v1/console-accounts",
                            json={"name": "bob", "role": "pod", "password": PASSWORD})  # fmt: skip
        assert bad_role.status_code == 422
        log = api.get("/api/v1/audit/admin", params={"action": "console-account"}).json()
        assert [e["action"] for e in log] == ["console-account.create"]


def test_an_admin_manages_accounts_and_every_page_renders(server: Server) -> None:
    make_account(server, "ada", "admin")
    with server.client() as api:
        api.post("/api/v1/groups", json={"name": "devs"}).raise_for_status()
        api.post("/api/v1/users", json={"name": "carol", "groups": ["devs"]}).raise_for_status()
        api.post(
            "/api/v1/rules", json={"group": "devs", "destination": "10.20.0.0/16"}
        ).raise_for_status()
    with browser(server) as c:
        assert sign_in(c, "ada").status_code == 303
        for path in ("/console/", "/console/users", "/console/users?q=ca", "/console/users/carol",
                     "/console/new-user", "/console/groups", "/console/groups/devs",
                     "/console/sessions", "/console/sessions?ended=true&user=carol",
                     "/console/audit/who", "/console/audit/log?action=user.",
                     "/console/accounts"):  # fmt: skip
            r = c.get(path)
            assert r.status_code == 200, (path, r.text[:500])
        assert "carol" in c.get("/console/users?q=ca").text
        listed = c.get("/console/groups").text
        assert '<a href="/console/groups/devs">devs</a></td><td>1</td><td>1</td>' in listed
        assert "carol" not in c.get("/console/users?q=zz").text
        token = csrf_of(c, "/console/accounts")
        r = c.post(
            "/console/accounts/new",
            data={"csrf": token, "name": "otto", "role": "operator", "password": PASSWORD},
        )
        assert r.status_code == 303
        assert c.post("/console/accounts/otto/disable", data={"csrf": token}).status_code == 303
        assert c.get("/console/users/nobody").status_code == 404
    with server.client() as api:
        accounts = {a["name"]: a for a in api.get("/api/v1/console-accounts").json()}
        assert accounts["otto"]["disabled"] is True
        assert accounts["otto"]["created_by"] == "console:ada"
    with browser(server) as c:
        assert sign_in(c, "otto").status_code == 401


def test_an_operator_downloads_a_profile_and_it_is_audited(
    server: Server, operator: httpx.Client
) -> None:
    with server.client() as api:
        api.post("/api/v1/users", json={"name": "carol"}).raise_for_status()
    token = csrf_of(operator, "/console/users/carol")
    assert operator.get("/console/users/carol/profile").status_code == 405  # never by GET
    r = operator.post("/console/users/carol/profile", data={"csrf": token})
    assert r.status_code == 200
    assert r.headers["content-disposition"] == 'attachment; filename="carol.ovpn"'
    assert "<key>" in r.text and "remote vpn.example.test 1194 udp" in r.text
    assert operator.post("/console/users/carol/profile", data={}).status_code == 403
    with server.client() as api:
        log = api.get("/api/v1/audit/admin", params={"actor": "console:olga"}).json()
        assert "user.profile" in [e["action"] for e in log]


def _flow(pod: str, n: int, user: str) -> dict[str, object]:
    return {
        "kind": "start",
        "flow_id": f"{pod}-f{n}",
        "user": user,
        "proto": "tcp",
        "start_ms": 1_796_378_400_000 + n * 1000,  # 2026-12-04T10:00:00Z + n s
        "tunnel_ip": "10.200.0.2",
        "tunnel_port": 40000 + n,
        "nat_ip": "10.0.3.2",
        "nat_port": 50000 + n,
        "dst_ip": "10.20.0.5",
        "dst_port": 443,
    }


def test_flows_and_denied_traffic_filter_page_and_export_as_csv(
    server: Server, operator: httpx.Client
) -> None:
    with server.client(server.pod_token("pod1")) as agent:
        flows = [_flow("pod1", n, "carol" if n % 2 else "dave") for n in range(60)]
        r = agent.post("/api/v1/agent/flows", json={"pod": "pod1", "records": flows})
        assert r.status_code < 300, r.text
    page = operator.get("/console/audit/flows", params={"user": "carol"})
    assert page.status_code == 200
    assert page.text.count("<tr><td>") == 30 and "dave" not in page.text
    first = operator.get("/console/audit/flows")
    assert first.text.count("<tr><td>") == 50  # a page
    nxt = re.search(r'href="(/console/audit/flows\?cursor=[^"]+)" rel="next"', first.text)
    assert nxt
    second = operator.get(nxt.group(1).replace("&amp;", "&"))
    assert second.text.count("<tr><td>") == 10
    csv_out = operator.get("/console/audit/flows", params={"user": "carol", "export": "true"})
    assert csv_out.status_code == 200
    assert csv_out.headers["content-type"].startswith("text/csv")
    lines = csv_out.text.strip().split("\n")
    assert lines[0].startswith("start_at,end_at,user,pod,")
    assert len(lines) == 31 and all(",carol,pod1," in line for line in lines[1:])
    assert operator.get("/console/audit/flows", params={"since": "yesterday"}).status_code == 422
    denied = operator.get("/console/audit/denied", params={"user": "carol", "export": "true"})
    assert denied.status_code == 200 and denied.text.startswith("first_at,last_at,user,")


def test_an_admin_makes_and_revokes_tokens_and_revokes_a_pod(server: Server) -> None:
    make_account(server, "ada", "admin")
    server.pod_token("pod1")
    with browser(server) as c:
        assert sign_in(c, "ada").status_code == 303
        token = csrf_of(c, "/console/tokens")
        assert "pod1" in c.get("/console/tokens").text
        r = c.post("/console/tokens/new", data={"csrf": token, "name": "ci", "role": "auditor"})
        assert r.status_code == 200
        secret = re.search(r'value="(vpf_[^"]+)"', r.text)
        assert secret
        with server.client(secret.group(1)) as ci:
            assert ci.get("/api/v1/sessions").status_code == 200
            r = c.post("/console/tokens/ci/revoke", data={"csrf": token})
            assert r.status_code == 303
            assert ci.get("/api/v1/sessions").status_code == 401
        r = c.post("/console/pods/pod1/revoke", data={"csrf": token})
        assert r.status_code == 303, r.text
        with server.client() as api:
            pools = api.get("/api/v1/pools").json()
        gw = next(p["name"] for p in pools if p["kind"] == "gateway")
        r = c.post("/console/pools", data={"csrf": token, "name": gw, "cidr": "10.250.0.0/24"})
        assert r.status_code == 303, r.text
        assert "10.250.0.0/24" in c.get("/console/pools").text
        bad = c.post("/console/pools", data={"csrf": token, "name": gw, "cidr": "10.250.0.0/33"})
        assert bad.status_code == 422
    with server.client() as api:
        actions = [(e["actor"], e["action"]) for e in api.get("/api/v1/audit/admin").json()]
        for action in ("token.create", "token.revoke", "pod.revoke", "pool.set"):
            assert ("console:ada", action) in actions, action
    make_account(server, "olga", "operator")
    with browser(server) as op:
        assert sign_in(op, "olga").status_code == 303
        assert op.get("/console/tokens").status_code == 403
        token = csrf_of(op)
        made = op.post("/console/tokens/new", data={"csrf": token, "name": "x", "role": "admin"})
        assert made.status_code == 403
        assert op.post("/console/pods/pod1/forget", data={"csrf": token}).status_code == 403


POLICY = """\
version: 1
groups:
  devs:
    description: developers
    grants:
      - destination: 10.20.0.0/16
        proto: tcp
        ports: "22,443"
users:
  carol:
    groups: [devs]
"""


def test_a_policy_is_previewed_then_applied_from_the_console(
    server: Server, operator: httpx.Client
) -> None:
    token = csrf_of(operator, "/console/policy")
    r = operator.post("/console/policy", data={"csrf": token, "yaml": POLICY,
                                               "action": "preview"})  # fmt: skip
    assert r.status_code == 200, r.text
    assert "Applying would change" in r.text and "carol" in r.text
    with server.client() as api:
        assert api.get("/api/v1/users/carol").status_code == 404  # a preview writes nothing
    r = operator.post("/console/policy", data={"csrf": token, "yaml": POLICY, "action": "apply"})
    assert r.status_code == 200 and "Applied (revision" in r.text
    with server.client() as api:
        assert api.get("/api/v1/users/carol").json()["groups"] == ["devs"]
        log = api.get("/api/v1/audit/admin", params={"action": "policy"}).json()
        assert [e["actor"] for e in log] == ["console:olga"]
    again = operator.post("/console/policy", data={"csrf": token, "yaml": POLICY,
                                                   "action": "preview"})  # fmt: skip
    assert "No changes" in again.text
    bad = operator.post("/console/policy", data={"csrf": token, "yaml": "version: 9\n",
                                                 "action": "apply"})  # fmt: skip
    assert bad.status_code == 422 and 'class="error"' in bad.text
    current = operator.get("/console/policy", params={"current": "true"})
    assert "10.20.0.0/16" in current.text


def test_a_large_policy_is_read_only_from_a_signed_in_operator(
    server: Server, operator: httpx.Client
) -> None:
    big = POLICY + "# " + "x" * (100 << 10) + "\n"
    token = csrf_of(operator, "/console/policy")
    r = operator.post("/console/policy", data={"csrf": token, "yaml": big, "action": "preview"})
    assert r.status_code == 200, r.text[:300]
    with browser(server) as stranger:
        r = stranger.post("/console/policy", data={"csrf": "x", "yaml": big})
        assert r.status_code == 413
        r = stranger.post("/console/new-user", data={"csrf": "x", "name": "y" * (70 << 10)})
        assert r.status_code == 413


def test_page_views_do_not_wait_for_a_writer_on_sqlite(tmp_path: Path) -> None:
    """A page view only reads: it must not queue behind a write (on SQLite every other
    transaction takes the database's write lock at BEGIN; PostgreSQL readers never wait)."""
    import sqlite3

    path = tmp_path / "cp.db"
    with running_server(f"sqlite:///{path}", tmp_path / "data") as server:
        make_account(server, "olga", "operator")
        with browser(server) as operator:
            assert sign_in(operator, "olga").status_code == 303
            writer = sqlite3.connect(path, isolation_level=None)
            try:
                writer.execute("BEGIN IMMEDIATE")  # a long write transaction holds the lock
                for page in ("/console/", "/console/users", "/console/sessions"):
                    r = operator.get(page, timeout=5)  # a write lock at BEGIN: waits 30 s
                    assert r.status_code == 200, page
            finally:
                writer.execute("ROLLBACK")
                writer.close()
