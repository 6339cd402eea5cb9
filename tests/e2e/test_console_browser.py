"""The web console in a real browser: headless Chromium driven by Selenium against a real
control plane on loopback.

What a person at the console sees and does: an operator creating a user, a group and a grant
and disabling the user (the admin API then shows the change, made by ``console:NAME``); an
auditor who sees only the auditor's pages; the CSP, cookie and sign-out as the browser applies
them; the overview and users pages at phone width. Screenshots of the main pages are written to
docs/console/ on every run (they are the console's documentation).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.conftest import RunningServer
from tests.e2e.consolebrowser import WAIT, ConsolePage, chromium

# Missing chromium or its driver fails the test (tests/e2e/conftest.py), it never skips it.
pytestmark = pytest.mark.e2e(tools=("chromium", "chromedriver"))

PASSWORDS = {
    "operator": "Tr4il-mix-Quokka-57",
    "auditor": "Ledger-Owl-93-brisk",
    "admin": "Root-Falcon-28-vivid",
}
NAMES = {"operator": "olga", "auditor": "arne", "admin": "ada"}
ACCOUNTS = {role: (NAMES[role], PASSWORDS[role]) for role in NAMES}
LOG_LINE = '10.0.3.2:40000 - - [04/Dec/2026:10:00:00 +0000] "GET / HTTP/1.1" 200 5'
NO_SCROLL = "return document.documentElement.scrollWidth <= window.innerWidth + 1"


@dataclass
class Console(ConsolePage):
    api: httpx.Client

    def no_horizontal_scroll(self) -> bool:
        return bool(self.driver.execute_script(NO_SCROLL))


@pytest.fixture
def console(tmp_path: Path) -> Iterator[Console]:
    """A fresh control plane with an admin, an operator and an auditor console account, and
    a browser with no cookies."""
    running = RunningServer(
        database_url=f"sqlite:///{tmp_path / 'cp.db'}", data_dir=tmp_path / "data"
    )
    try:
        with running.server.client() as api:
            for role, name in NAMES.items():
                r = api.post(
                    "/api/v1/console-accounts",
                    json={"name": name, "role": role, "password": PASSWORDS[role]},
                )
                assert r.status_code == 201, r.text
            driver = chromium()
            try:
                yield Console(driver, running.server.url, ACCOUNTS, api)
            finally:
                driver.quit()
    finally:
        running.stop()


def audit(api: httpx.Client, **params: str) -> list[dict[str, Any]]:
    r = api.get("/api/v1/audit/admin", params=params)
    r.raise_for_status()
    rows: list[dict[str, Any]] = r.json()
    return rows


def create_group(c: Console, name: str, description: str) -> None:
    c.go("/console/groups")
    c.wait_h1("Groups")
    c.fill("g-name", name)
    c.fill("g-desc", description)
    c.press(c.button("Create"))
    c.wait_h1(f"Group {name}")
    assert c.notice() == f"created group {name}"


def test_an_operator_creates_a_user_and_a_group_grants_access_and_disables_the_user(
    console: Console,
) -> None:
    c, api = console, console.api
    c.go("/console/login")
    c.wait_h1("Sign in to the vpnfleet console")
    c.shot("login")
    c.sign_in("operator")
    assert c.nav() == [
        "Fleet",
        "Users",
        "Groups",
        "Sessions",
        "Who was this?",
        "Flows",
        "Denied",
        "Audit log",
        "Pools",
        "Policy",
    ]

    # A new user, from the Users page.
    c.open_nav("Users")
    c.wait_h1("Users")
    c.driver.find_element(By.LINK_TEXT, "New user").click()
    c.wait_h1("New user")
    assert c.path() == "/console/new-user"
    c.fill("name", "carol")
    c.fill("email", "carol@example.test")
    nat = c.driver.find_element(By.CSS_SELECTOR, "input[name=mode][value=nat]")
    assert nat.is_selected()
    c.driver.find_element(By.CSS_SELECTOR, "input[name=mode][value=gateway]").click()
    nat.click()
    assert nat.is_selected()
    c.fill("max_sessions", "3")
    c.press(c.button("Create user"))
    c.wait_h1("carol")
    assert c.path() == "/console/users/carol"
    assert c.notice() == "created user carol"
    facts = c.driver.find_element(By.CSS_SELECTOR, "dl.facts").text
    assert "carol@example.test" in facts
    carol = api.get("/api/v1/users/carol").json()
    assert (carol["email"], carol["mode"], carol["max_sessions"], carol["enabled"]) == (
        "carol@example.test",
        "nat",
        3,
        True,
    )
    assert carol["groups"] == []

    # A group and what it grants.
    c.open_nav("Groups")
    c.wait_h1("Groups")
    create_group(c, "devs", "Developers")
    assert c.path() == "/console/groups/devs"
    assert "Developers" in c.driver.find_element(By.TAG_NAME, "main").text
    assert c.rows() == [["This group grants nothing yet."]]
    c.fill("r-dst", "10.20.0.0/16")
    Select(c.field("r-proto")).select_by_visible_text("tcp")
    c.fill("r-ports", "22,443")
    c.press(c.button("Grant"))
    c.wait_h1("Group devs")
    assert c.notice() == "devs may now reach tcp 10.20.0.0/16 ports 22,443"
    rows = c.rows()
    assert len(rows) == 1
    assert rows[0][1:5] == ["10.20.0.0/16", "tcp", "22,443", ""]
    assert rows[0][5] == "Remove"

    # carol joins devs from her page.
    c.open_nav("Users")
    c.wait_h1("Users")
    users = c.rows()
    assert [r[0] for r in users] == ["carol carol@example.test"]
    assert users[0][2] == "enabled"
    c.shot("users")
    c.driver.find_element(By.LINK_TEXT, "carol").click()
    c.wait_h1("carol")
    Select(c.field("join-group")).select_by_visible_text("devs")
    c.press(c.button("Add"))
    c.wait_h1("carol")
    assert c.notice() == "carol joined devs"
    chips = c.driver.find_elements(By.CSS_SELECTOR, "main ul.chips li a")
    assert [a.text for a in chips] == ["devs"]
    assert c.driver.find_elements(By.ID, "join-group") == []  # no group left to join
    c.shot("user")

    assert api.get("/api/v1/users/carol").json()["groups"] == ["devs"]
    rules = api.get("/api/v1/rules", params={"group": "devs"}).json()
    assert [(r["destination"], r["proto"], r["ports"]) for r in rules] == [
        ("10.20.0.0/16", "tcp", "22,443")
    ]
    mine = audit(api, actor="console:olga")
    done = {(r["action"], r["target"]) for r in mine}
    want = {
        ("user.create", "carol"),
        ("group.create", "devs"),
        ("rule.create", "devs#1"),
        ("group.add_member", "devs/carol"),
    }
    assert want <= done, done
    assert {r["role"] for r in mine} == {"operator"}
    created = [r for r in audit(api, action="user.create") if r["target"] == "carol"]
    assert [r["actor"] for r in created] == ["console:olga"]

    # Disabling asks first: dismissing the question changes nothing, accepting disables.
    c.driver.find_element(By.CSS_SELECTOR, "form[data-confirm] button.danger").click()
    alert = WebDriverWait(c.driver, WAIT).until(ec.alert_is_present())
    assert alert.text == "Disable carol and cut their sessions?"
    alert.dismiss()
    assert c.path() == "/console/users/carol"
    assert c.h1() == "carol"
    assert api.get("/api/v1/users/carol").json()["enabled"] is True
    old = c.driver.find_element(By.TAG_NAME, "html")
    c.button("Disable").click()
    WebDriverWait(c.driver, WAIT).until(ec.alert_is_present())
    c.driver.switch_to.alert.accept()
    WebDriverWait(c.driver, WAIT).until(ec.staleness_of(old))
    c.wait_h1("carol disabled")
    assert c.notice() == "carol is disabled; their sessions are cut"
    assert c.button("Enable").is_displayed()
    assert api.get("/api/v1/users/carol").json()["enabled"] is False
    assert ("user.disable", "carol") in {
        (r["action"], r["target"]) for r in audit(api, actor="console:olga")
    }

    c.go("/console/groups/devs")
    c.wait_h1("Group devs")
    members = c.driver.find_elements(By.CSS_SELECTOR, "main ul.chips li a")
    assert [a.text for a in members] == ["carol"]
    c.shot("group")

    c.go("/console/")
    c.wait_h1("Fleet")
    cards = [e.text for e in c.driver.find_elements(By.CSS_SELECTOR, ".cards .card")]
    assert "1\nusers (1 disabled)" in cards, cards
    c.shot("overview")


def test_an_auditor_sees_the_log_and_who_was_this_but_no_operator_pages(
    console: Console,
) -> None:
    c = console
    c.sign_in("operator")
    create_group(c, "ops", "On call")
    c.sign_out()

    c.sign_in("auditor")
    assert c.nav() == ["Fleet", "Sessions", "Who was this?", "Flows", "Denied", "Audit log"]
    for path in ("/console/users", "/console/accounts", "/console/new-user", "/console/groups"):
        c.go(path)
        c.wait_h1("Forbidden")
        error = c.driver.find_element(By.CSS_SELECTOR, "p.error").text
        assert "your role 'auditor' may not open this page" in error, (path, error)
        assert c.driver.find_elements(By.CSS_SELECTOR, "main table") == []
    # The browser was told 403, not only shown a page saying so.
    cookie = c.driver.get_cookie("vpnfleet_console")
    assert cookie is not None
    with httpx.Client(base_url=c.url, cookies={"vpnfleet_console": cookie["value"]}) as browser:
        assert browser.get("/console/users").status_code == 403
        assert browser.get("/console/accounts").status_code == 403

    c.open_nav("Audit log")
    c.wait_h1("Admin audit log")
    log = c.rows()
    assert ["console:olga", "operator", "group.create", "ops"] in [r[1:5] for r in log], log
    assert ["console:olga", "operator", "console.sign-in", "olga"] in [r[1:5] for r in log]
    c.fill("action", "group.")
    c.press(c.button("Filter"))
    c.wait_h1("Admin audit log")
    assert [r[1:5] for r in c.rows()] == [["console:olga", "operator", "group.create", "ops"]]
    c.go("/console/audit/log")
    c.wait_h1("Admin audit log")
    c.shot("audit-log")

    c.open_nav("Who was this?")
    c.wait_h1("Who was this?")
    assert c.driver.find_elements(By.CSS_SELECTOR, "section.answer") == []
    c.field("line").send_keys(LOG_LINE)
    c.press(c.button("Look up"))
    c.wait_h1("Who was this?")
    answer = c.driver.find_element(By.CSS_SELECTOR, "section.answer")
    assert "10.0.3.2:40000" in answer.text, answer.text
    assert "2026-12-04 10:00:00" in answer.text, answer.text
    assert "Read as nginx" in answer.text, answer.text
    assert answer.find_elements(By.CSS_SELECTOR, ".person") == []  # nobody is named
    assert c.field("line").get_attribute("value") == LOG_LINE
    c.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", answer)
    c.shot("who")


def page_checks(c: Console) -> None:
    """The page loads console.js and no other script, and has no inline handlers."""
    scripts = c.driver.execute_script(
        "return [...document.scripts].map(s => [s.src, s.textContent.trim().length])"
    )
    assert scripts == [[c.url + "/console/static/console.js", 0]], (c.driver.current_url, scripts)
    handlers = c.driver.execute_script(
        "return [...document.querySelectorAll('*')].flatMap(e => [...e.attributes]"
        ".filter(a => a.name.startsWith('on') || a.value.trim().startsWith('javascript:'))"
        ".map(a => e.tagName + ' ' + a.name))"
    )
    assert handlers == [], (c.driver.current_url, handlers)


def csp_messages(c: Console) -> list[str]:
    """CSP violations the browser reported since the last call (get_log empties its buffer)."""
    driver: Any = c.driver  # get_log is untyped in selenium
    logs: list[dict[str, Any]] = driver.get_log("browser")
    return [str(e["message"]) for e in logs if "Content Security Policy" in str(e["message"])]


def test_pages_keep_to_the_csp_the_cookie_is_locked_down_and_sign_out_ends_the_session(
    console: Console,
) -> None:
    c, api = console, console.api
    assert api.post("/api/v1/groups", json={"name": "ops"}).status_code == 201
    r = api.post(
        "/api/v1/rules", json={"group": "ops", "destination": "10.9.0.0/16", "proto": "any"}
    )
    assert r.status_code == 201, r.text
    r = api.post("/api/v1/users", json={"name": "erin", "groups": ["ops"]})
    assert r.status_code == 201, r.text

    c.go("/console/login")
    c.wait_h1("Sign in to the vpnfleet console")
    page_checks(c)
    c.sign_in("admin")
    pages = {
        "/console/": "Fleet",
        "/console/users": "Users",
        "/console/new-user": "New user",
        "/console/users/erin": "erin",
        "/console/groups": "Groups",
        "/console/groups/ops": "Group ops",
        "/console/sessions": "Live sessions",
        "/console/sessions?ended=true": "Ended sessions",
        "/console/audit/who": "Who was this?",
        "/console/audit/log": "Admin audit log",
        "/console/audit/flows": "Connections (NAT flows)",
        "/console/audit/denied": "Denied traffic",
        "/console/accounts": "Console accounts",
        "/console/tokens": "API tokens",
        "/console/pools": "Address pools",
        "/console/users/nobody": "Not found",
    }
    for path, heading in pages.items():
        c.go(path)
        c.wait_h1(heading)
        page_checks(c)
    c.go("/console/audit/who")
    c.field("line").send_keys(LOG_LINE)
    c.press(c.button("Look up"))
    c.driver.find_element(By.CSS_SELECTOR, "section.answer")
    page_checks(c)
    # console.js ran on these pages: the confirmation on a destructive form comes up.
    c.go("/console/users/erin")
    c.wait_h1("erin")
    c.button("Disable").click()
    WebDriverWait(c.driver, WAIT).until(ec.alert_is_present()).dismiss()
    assert csp_messages(c) == []
    # And the check above would see a violation: an injected inline script is refused.
    c.driver.execute_script(
        "const s = document.createElement('script'); s.textContent = 'window.x = 1';"
        "document.body.appendChild(s);"
    )
    assert c.driver.execute_script("return window.x") is None
    assert csp_messages(c) != []

    # A form without its CSRF token is refused and changes nothing.
    c.go("/console/groups")
    c.wait_h1("Groups")
    c.driver.execute_script("document.querySelector('main form input[name=csrf]').remove()")
    c.fill("g-name", "forged")
    c.press(c.button("Create"))
    c.wait_h1("Forbidden")
    assert "CSRF" in c.driver.find_element(By.CSS_SELECTOR, "p.error").text
    assert api.get("/api/v1/groups/forged").status_code == 404

    cookie = c.driver.get_cookie("vpnfleet_console")
    assert cookie is not None
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    assert cookie["path"] == "/"
    assert "vpnfleet_console" not in c.driver.execute_script("return document.cookie")

    c.go("/console/")
    c.wait_h1("Fleet")
    c.sign_out()
    assert c.path() == "/console/login"
    assert c.driver.get_cookie("vpnfleet_console") is None
    c.go("/console/")
    c.wait_h1("Sign in to the vpnfleet console")
    assert c.path() == "/console/login"
    # The old cookie, put back, no longer signs anyone in: the session ended on the server.
    c.driver.add_cookie({"name": "vpnfleet_console", "value": cookie["value"], "path": "/"})
    c.go("/console/users")
    c.wait_h1("Sign in to the vpnfleet console")
    assert c.path() == "/console/login"
    assert c.driver.find_elements(By.CSS_SELECTOR, "header .who") == []


def test_the_overview_and_users_pages_fit_a_phone(console: Console) -> None:
    c, api = console, console.api
    for i in range(3):
        r = api.post(
            "/api/v1/users",
            json={
                "name": f"user-with-a-rather-long-name-{i}",
                "email": f"someone.with.a.long.address.{i}@department.example.test",
            },
        )
        assert r.status_code == 201, r.text
    c.sign_in("operator")
    c.driver.set_window_size(390, 844)
    assert c.driver.execute_script("return window.innerWidth") == 390
    for path, heading in (("/console/", "Fleet"), ("/console/users", "Users")):
        c.go(path)
        c.wait_h1(heading)
        width = c.driver.execute_script(
            "return [document.documentElement.scrollWidth, window.innerWidth]"
        )
        assert c.no_horizontal_scroll(), (path, width)
        if path == "/console/":
            c.shot("overview-phone")
    assert len(c.rows()) == 3


def test_a_user_page_fits_a_phone(console: Console) -> None:
    c, api = console, console.api
    assert api.post("/api/v1/users", json={"name": "erin"}).status_code == 201
    c.sign_in("operator")
    c.driver.set_window_size(390, 844)
    c.go("/console/users/erin")
    c.wait_h1("erin")
    width = c.driver.execute_script(
        "return [document.documentElement.scrollWidth, window.innerWidth]"
    )
    assert c.no_horizontal_scroll(), width
