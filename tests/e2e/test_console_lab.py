"""The web console in a real browser against the lab: the real fleet, with OpenVPN pods and
stock clients in network namespaces, seen and driven from the console.

An operator sees a connected client's live session and kills it (the stock client is told to
halt and exits; the console lists the session as ended); an auditor pastes a line of the lab
nginx's access log into "Who was this?" and is told whose request it was; an operator downloads
a user's profile with the browser and a stock client connects with that very file; a user
signs in with the one-time link an operator made, adds a device, downloads its profile (its own
certificate) and connects with it, then removes the device and the client is cut and refused.

How the browser reaches the lab: the lab's control plane runs in the lab's ``cp`` namespace,
and the lab always links that namespace to the root namespace with its admin veth
(``info.url``, https://10.99.254.x:8000, the URL the lab tests' API clients and the CLI use).
So Chromium and chromedriver run in the root namespace like in test_console_browser.py, and
open ``info.url + "/console"``. The server's certificate comes from the control plane's own CA
(made at its first start, not known to the browser): the browser accepts it
(``acceptInsecureCerts``); the test's own API calls still pin that CA (``LabInfo.client``).
One lab for the module (building it takes seconds); each test uses its own lab user.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import pytest_asyncio
from cryptography import x509
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement

from tests.e2e.consolebrowser import WAIT, ConsolePage, chromium
from tests.e2e.labs import lab_up
from tests.e2e.test_lab_agent import api, client_log, client_running, fetch, sessions
from tests.polling import until
from vpnfleet import tlspin
from vpnfleet.lab import nginx, runner, topology
from vpnfleet.lab.runner import LAB_GROUP, LabInfo, LabUser

# Missing chromium, its driver or nginx (the lab's web backend) fails the test, never skips it.
pytestmark = [pytest.mark.e2e(tools=("chromium", "chromedriver", "nginx"))]

USERS = (
    LabUser("kim", "nat"),  # killed from the Sessions page
    LabUser("ann", "nat"),  # her request to nginx is looked up in "Who was this?"
    # Made by the test, without a profile from the lab: the only one is the browser's download.
    LabUser("dan", "nat", create=False),
    # Made by the test too: connects only with the device profile sam downloads himself.
    LabUser("sam", "nat", create=False),
)
ACCOUNTS = {
    "operator": ("olga", "Tr4il-mix-Quokka-57"),
    "auditor": ("arne", "Ledger-Owl-93-brisk"),
}
HALT = "Halt command was pushed by server"
# A line of the lab nginx's access log (lab/nginx.py's log_format), as test_lab_nat_audit.py
# reads it (its helpers are not imported: that module does not pass mypy --strict).
LINE = re.compile(r"^(?P<ip>[\d.]+):(?P<port>\d+) - \S+ \[(?P<time>[^\]]+)\] \"GET (?P<path>\S+) ")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lab(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LabInfo]:
    async with lab_up(tmp_path_factory.mktemp("lab"), USERS, letters="vw") as info:
        assert info.web is not None, "nginx is installed (the e2e marker checks), so the lab has it"
        for role, (name, password) in ACCOUNTS.items():
            api(
                info,
                "POST",
                "/api/v1/console-accounts",
                {"name": name, "role": role, "password": password},
            )
        yield info


@pytest.fixture
def downloads(tmp_path: Path) -> Path:
    path = tmp_path / "downloads"
    path.mkdir()
    return path


@pytest.fixture
def console(lab: LabInfo, downloads: Path) -> Iterator[ConsolePage]:
    """A browser with no cookies at the lab's control plane; quit however the test ends."""
    driver = chromium(download_dir=downloads, insecure_certs=True)
    try:
        yield ConsolePage(driver, lab.url, ACCOUNTS)
    finally:
        driver.quit()


def access_lines(info: LabInfo) -> list[str]:
    return info.web_access_log.read_text().splitlines()


async def get_page(info: LabInfo, user: str, path: str) -> None:
    """GET ``path`` of the lab's nginx from inside the user's namespace (through the tunnel)."""
    assert info.web is not None
    url = info.web + path
    code = f"import urllib.request; urllib.request.urlopen({url!r}, timeout=10).read()"
    await topology.run_in(info.plan.client_ns(user), sys.executable, "-c", code, timeout=20)


def web_flows(info: LabInfo) -> list[dict[str, Any]]:
    """Every TCP flow to the nginx backend the control plane has."""
    host = str(info.plan.svc_ip)
    with info.client() as http:
        r = http.get("/api/v1/audit/flows", params={"dst": host, "limit": 10000})
        r.raise_for_status()
        flows: list[dict[str, Any]] = r.json()
    return [f for f in flows if f["dst_port"] == nginx.NGINX_PORT and f["proto"] == "tcp"]


def session_row(c: ConsolePage, user: str) -> WebElement | None:
    """The row of ``user`` in the sessions table on the page (None: no such row)."""
    for tr in c.driver.find_elements(By.CSS_SELECTOR, "main table.sessions tbody tr"):
        cells = tr.find_elements(By.TAG_NAME, "td")
        if len(cells) > 1 and cells[0].text == user:
            return tr
    return None


def cells(row: WebElement) -> list[str]:
    return [td.text for td in row.find_elements(By.TAG_NAME, "td")]


def wait_download(directory: Path, name: str, seconds: float = WAIT) -> Path:
    """The file the browser saved as ``name`` once complete (Chromium writes *.crdownload
    first and renames it at the end)."""
    path = directory / name
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists() and not list(directory.glob("*.crdownload")):
            return path
        time.sleep(0.1)
    pytest.fail(f"no {name} downloaded within {seconds}s; {sorted(directory.iterdir())}")


@pytest.mark.asyncio(loop_scope="module")
async def test_an_operator_sees_a_live_session_and_kills_it(
    lab: LabInfo, console: ConsolePage
) -> None:
    c = console
    await runner.start_client(lab, "kim")
    try:
        tunnel_ip = await runner.client_address(lab, "kim")
        (live,) = await until(lambda: sessions(lab, user="kim"), 10, "kim's session")
        assert live["tunnel_ip"] == tunnel_ip

        c.sign_in("operator")
        c.open_nav("Sessions")
        c.wait_h1("Live sessions")
        assert c.path() == "/console/sessions"
        row = session_row(c, "kim")
        assert row is not None, c.rows()
        user, pod, mode, shown_ip, real = cells(row)[:5]
        assert (user, pod, mode, shown_ip) == ("kim", live["pod"], "nat", tunnel_ip)
        assert real.split(":")[0] == str(lab.plan.client_ip("kim")), real
        c.shot("sessions-live")

        kill = row.find_element(By.CSS_SELECTOR, "form[data-confirm] button.danger")
        assert kill.text == "Kill"
        started = time.monotonic()
        assert c.press_and_confirm(kill) == "End every live session of kim?"
        c.wait_h1("Live sessions")
        assert c.path() == "/console/sessions"
        assert c.notice() == "asked the pods to end 1 session(s) of kim"

        # What kim notices: the server tells the client to halt, and it gives up.
        await until(lambda: HALT in client_log(lab, "kim"), 5, "kim's client to be halted")
        assert time.monotonic() - started < 5
        await until(lambda: _gone(lab, "kim"), 10, "kim's client to exit")
        assert await runner.client_address(lab, "kim") is None
        await until(lambda: sessions(lab, user="kim") == [], 10, "kim's session to close")

        # The console: kim is no longer live, and the ended sessions list the one just cut.
        c.go("/console/sessions")
        c.wait_h1("Live sessions")
        assert session_row(c, "kim") is None, c.rows()
        c.fill("f-user", "kim")
        c.driver.find_element(By.CSS_SELECTOR, "input[name=ended]").click()
        c.press(c.button("Filter"))
        c.wait_h1("Ended sessions")
        ended = session_row(c, "kim")
        assert ended is not None, c.rows()
        row_text = cells(ended)
        assert row_text[1:4] == [live["pod"], "nat", tunnel_ip], row_text
        assert row_text[6].strip() != "", row_text  # when it ended
        # kim's page: the recent session has an end time now, and nothing is live.
        c.go("/console/users/kim")
        c.wait_h1("kim")
        recent = [r for r in c.rows() if r and r[1] == tunnel_ip]
        assert len(recent) == 1, c.rows()
        assert recent[0][4] not in ("", "live"), recent
        assert c.button("Kill sessions (0)").is_displayed()
    finally:
        await runner.stop_client(lab, "kim")


async def _gone(info: LabInfo, user: str) -> bool:
    return not await client_running(info, user)


@pytest.mark.asyncio(loop_scope="module")
async def test_an_auditor_names_the_person_behind_a_line_of_the_lab_nginx_log(
    lab: LabInfo, console: ConsolePage
) -> None:
    c = console
    await runner.start_client(lab, "ann")
    try:
        (live,) = await until(lambda: sessions(lab, user="ann"), 10, "ann's session")
        before = len(access_lines(lab))
        await get_page(lab, "ann", "/console/ann")
        lines = access_lines(lab)
        assert len(lines) == before + 1
        line = lines[-1]
        m = LINE.match(line)
        assert m and m["path"] == "/console/ann", line
        # nginx saw ann's pod, not ann.
        assert m["ip"] == str(lab.plan.pod_ip(int(live["pod"].removeprefix("pod"))))
        # The agent's record of that connection has reached the control plane.
        await until(
            lambda: any(f["nat_port"] == int(m["port"]) for f in web_flows(lab)),
            15,
            "the flow of ann's request at the control plane",
        )

        c.sign_in("auditor")
        c.open_nav("Who was this?")
        c.wait_h1("Who was this?")
        c.field("line").send_keys(line)
        c.press(c.button("Look up"))
        c.wait_h1("Who was this?")
        answer = c.driver.find_element(By.CSS_SELECTOR, "section.answer")
        person = answer.find_elements(By.CSS_SELECTOR, "span.person")
        assert [p.text for p in person] == ["ann"], answer.text
        assert f"{m['ip']}:{m['port']}" in answer.text, answer.text
        facts = answer.find_element(By.CSS_SELECTOR, "dl.facts").text
        assert live["tunnel_ip"] in facts, facts
        assert live["pod"] in facts, facts
        assert str(lab.plan.client_ip("ann")) in facts, facts
        assert "still connected" in facts, facts
        c.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", answer)
        c.shot("who-lab")
    finally:
        await runner.stop_client(lab, "ann")


@pytest.mark.asyncio(loop_scope="module")
async def test_a_profile_downloaded_from_the_console_connects_a_stock_client(
    lab: LabInfo, console: ConsolePage, downloads: Path
) -> None:
    c = console
    api(lab, "POST", "/api/v1/users", {"name": "dan", "mode": "nat", "groups": [LAB_GROUP]})
    profile = lab.dir / "clients" / "dan.ovpn"
    assert not profile.exists()  # the lab made none for dan: only the browser's can connect

    c.sign_in("operator")
    c.open_nav("Users")
    c.wait_h1("Users")
    c.driver.find_element(By.LINK_TEXT, "dan").click()
    c.wait_h1("dan")
    # The download leaves the page where it is: no new page to wait for, a file instead.
    c.button("Download profile (.ovpn)").click()
    saved = await asyncio.to_thread(wait_download, downloads, "dan.ovpn")
    text = saved.read_text()
    assert "<key>" in text and "BEGIN CERTIFICATE" in text
    assert c.path() == "/console/users/dan"
    # Handing out the private key is in the audit log, in the operator's name.
    with lab.client() as http:
        done = http.get("/api/v1/audit/admin", params={"actor": "console:olga"}).json()
    assert ("user.profile", "dan") in {(r["action"], r["target"]) for r in done}

    # As the lab does with the profiles it gets from the API: the file, as it is, is the
    # client's --config.
    shutil.copyfile(saved, profile)
    profile.chmod(0o600)
    try:
        await runner.start_client(lab, "dan")  # waits for the tunnel address
        tunnel_ip = await runner.client_address(lab, "dan")
        (live,) = await until(lambda: sessions(lab, user="dan"), 10, "dan's session")
        assert live["tunnel_ip"] == tunnel_ip
        seen = await fetch(lab, "dan")  # through the tunnel to the backend
        assert seen["remote_addr"] == str(lab.plan.pod_ip(int(live["pod"].removeprefix("pod"))))
        # The operator sees it on dan's page.
        c.go("/console/users/dan")
        c.wait_h1("dan")
        assert c.button("Kill sessions (1)").is_displayed()
        live_rows = c.driver.find_elements(By.CSS_SELECTOR, "main table tbody tr.live")
        assert [cells(r)[:2] for r in live_rows] == [[live["pod"], tunnel_ip]]
    finally:
        await runner.stop_client(lab, "dan")


PROFILE_ACTION = re.compile(r"/console/me/devices/(?P<serial>\d+)/profile$")
CUT_WITHIN = 15  # seconds from "Remove" until the device's tunnel is down
REFUSED = "AUTH_FAILED,certificate revoked or replaced"


def device_row(c: ConsolePage, label: str) -> WebElement:
    """The row of the device ``label`` in the self-service page's table of devices."""
    table = c.driver.find_elements(By.CSS_SELECTOR, "main table")[0]
    found = [
        tr
        for tr in table.find_elements(By.CSS_SELECTOR, "tbody tr")
        if tr.find_elements(By.TAG_NAME, "td")[0].text.split(" ")[0] == label
    ]
    assert len(found) == 1, [r.text for r in table.find_elements(By.CSS_SELECTOR, "tbody tr")]
    return found[0]


def row_button(row: WebElement, text: str) -> WebElement:
    (button,) = [b for b in row.find_elements(By.TAG_NAME, "button") if b.text == text]
    return button


def device_serial(row: WebElement) -> str:
    """The device's certificate serial, as its "Download profile" form posts it."""
    action = row.find_element(By.CSS_SELECTOR, "form[action$='/profile']").get_attribute("action")
    m = PROFILE_ACTION.search(action or "")
    assert m, action
    return m["serial"]


def profile_serial(profile: str) -> str:
    """The serial (decimal, as the control plane writes it) of the profile's client cert."""
    m = re.search(r"<cert>\s*(.*?)\s*</cert>", profile, re.DOTALL)
    assert m, profile[:200]
    return str(x509.load_pem_x509_certificate(m[1].encode()).serial_number)


@pytest.mark.asyncio(loop_scope="module")
async def test_a_user_gets_a_device_profile_on_their_own_and_removing_the_device_cuts_it(
    lab: LabInfo, console: ConsolePage, tmp_path: Path
) -> None:
    op = console
    api(lab, "POST", "/api/v1/users", {"name": "sam", "mode": "nat", "groups": [LAB_GROUP]})
    profile = lab.dir / "clients" / "sam.ovpn"
    assert not profile.exists()  # the lab made none for sam: only his device's can connect

    # The operator hands out a sign-in link.
    op.sign_in("operator")
    op.go("/console/users/sam")
    op.wait_h1("sam")
    op.press(op.button("Sign-in link for self-service"))
    op.wait_h1("Sign-in link for sam")
    link = op.field("link").get_attribute("value") or ""
    assert link.startswith(lab.url + "/console/me/enter/"), link
    op.shot("link")

    # sam, in a browser of his own (no operator cookie), uses it.
    mine = tmp_path / "sam-downloads"
    mine.mkdir()
    driver = chromium(download_dir=mine, insecure_certs=True)
    try:
        me = ConsolePage(driver, lab.url, {})
        driver.get(link)
        me.wait_h1("Your VPN devices")
        me.press(me.button("Continue"))
        me.wait_h1("Hello, sam")
        assert me.path() == "/console/me/"
        driver.get(link)  # once only
        me.wait_h1("This link cannot be used")
        me.go("/console/me/")  # still signed in
        me.wait_h1("Hello, sam")
        me.fill("device", "laptop")
        me.press(me.button("Add device"))
        me.wait_h1("Hello, sam")
        laptop = device_serial(device_row(me, "laptop"))
        main = api(lab, "GET", "/api/v1/users/sam")["certificate"]["serial"]
        assert laptop != main
        me.shot("me")
        # Like the operator's download: no new page, a file.
        row_button(device_row(me, "laptop"), "Download profile").click()
        saved = await asyncio.to_thread(wait_download, mine, "sam-laptop.ovpn")
        text = saved.read_text()
        assert "<key>" in text and profile_serial(text) == laptop

        # A stock client with exactly that file: the laptop's certificate, not sam's main one.
        shutil.copyfile(saved, profile)
        profile.chmod(0o600)
        try:
            await runner.start_client(lab, "sam")  # waits for the tunnel address
            tunnel_ip = await runner.client_address(lab, "sam")
            (live,) = await until(lambda: sessions(lab, user="sam"), 10, "sam's session")
            assert live["tunnel_ip"] == tunnel_ip
            seen = await fetch(lab, "sam")  # through the tunnel to the backend
            pod_ip = lab.plan.pod_ip(int(live["pod"].removeprefix("pod")))
            assert seen["remote_addr"] == str(pod_ip)

            # sam removes the laptop: its tunnel goes down and stays down.
            me.go("/console/me/")
            me.wait_h1("Hello, sam")
            remove = row_button(device_row(me, "laptop"), "Remove")
            started = time.monotonic()
            asked = me.press_and_confirm(remove)
            assert asked == "Remove laptop? It can no longer connect."
            me.wait_h1("Hello, sam")
            assert me.notice() == "removed laptop: it can no longer connect"
            row = device_row(me, "laptop")
            assert row.find_element(By.CSS_SELECTOR, "td .bad").text == "removed"
            assert row.find_elements(By.TAG_NAME, "button") == []

            async def cut() -> bool:
                gone = await runner.client_address(lab, "sam") is None
                return gone and sessions(lab, user="sam") == []

            await until(cut, CUT_WITHIN, "the laptop's tunnel and session to end")
            assert time.monotonic() - started < CUT_WITHIN
            # What sam notices: the server told the client to halt, and it gave up.
            assert HALT in client_log(lab, "sam")
            await until(lambda: _gone(lab, "sam"), 10, "sam's client to exit")
            # sam opens the VPN again with the same file: refused, and no tunnel comes up.
            before = len(client_log(lab, "sam"))
            await runner.start_client(lab, "sam", wait=False)
            await until(
                lambda: REFUSED in client_log(lab, "sam")[before:], 20, "the refusal in sam's log"
            )
            await until(lambda: _gone(lab, "sam"), 10, "sam's refused client to exit")
            assert await runner.client_address(lab, "sam") is None
            assert sessions(lab, user="sam") == []
        finally:
            await runner.stop_client(lab, "sam")

        # The import link of a second device: one fetch gets its profile, the next is refused.
        me.fill("device", "phone")
        me.press(me.button("Add device"))
        me.wait_h1("Hello, sam")
        phone = device_serial(device_row(me, "phone"))
        assert phone not in (laptop, main)
        me.press(row_button(device_row(me, "phone"), "Open in OpenVPN Connect"))
        me.wait_h1("Import phone into OpenVPN Connect")
        url = me.driver.find_element(By.CSS_SELECTOR, "input[aria-label='Profile URL']")
        plain = url.get_attribute("value") or ""
        assert plain.startswith(lab.url + "/console/me/import/"), plain
        connect = driver.find_element(By.LINK_TEXT, "Open in OpenVPN Connect")
        assert connect.get_attribute("href") == "openvpn://import-profile/" + quote(
            plain, safe=":/"
        )
    finally:
        driver.quit()
    # Fetched as OpenVPN Connect does: no cookie, no token, only the link.
    async with httpx.AsyncClient(verify=tlspin.pinned_context(lab.ca_file), timeout=30) as http:
        first = await http.get(plain)
        assert first.status_code == 200, first.text
        assert profile_serial(first.text) == phone
        assert (await http.get(plain)).status_code == 410
