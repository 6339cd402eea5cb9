"""A real OpenID provider for tests (django-oauth-toolkit, see site.py) and a plain HTTP
client that logs in at it the way a browser following the forms would."""

from __future__ import annotations

import os
import re
import secrets
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Idp:
    url: str
    issuer: str
    client_id: str
    client_secret: str
    log: Path
    env: dict[str, str] = field(default_factory=dict)  # what its processes run with

    def set_groups(self, user: str, groups: list[str]) -> None:
        """Make `groups` the user's groups at the IdP (its next ID token lists them)."""
        subprocess.run(
            [sys.executable, "-m", "tests.oidcidp.site", "groups", user, *groups],
            env=self.env,
            cwd=ROOT,
            check=True,
            timeout=60,
            capture_output=True,
        )


@contextmanager
def running_idp(
    state: Path,
    redirect_uri: str,
    users: Mapping[str, tuple[str, str] | tuple[str, str, bool]],
    *,
    host: str = "127.0.0.1",
    netns: str | None = None,
    groups_overage: int | None = None,
) -> Iterator[Idp]:
    """The provider on a free port of `host` (loopback by default) with `users` (name ->
    (password, email[, email verified: True by default])) and one confidential client whose
    redirect URI is `redirect_uri`; stopped on exit. `netns`: run it in that network
    namespace (a lab's control-plane namespace, `host` one of its addresses the test can
    reach). `groups_overage`: past this many groups a user's ID token has Entra ID's overage
    indicator instead of the `groups` claim."""
    state.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://{host}:{port}"
    idp = Idp(
        url=url,
        issuer=f"{url}/o",
        client_id="vpnfleet-" + secrets.token_hex(4),
        client_secret=secrets.token_urlsafe(24),
        log=state / "idp.log",
    )
    env = {
        **os.environ,
        "IDP_DIR": str(state),
        "IDP_ISSUER": idp.issuer,
        "IDP_REDIRECT_URI": redirect_uri,
        "IDP_CLIENT_ID": idp.client_id,
        "IDP_CLIENT_SECRET": idp.client_secret,
        "IDP_USERS": ",".join(
            f"{n}:{v[0]}:{v[1]}" + ("" if len(v) < 3 or v[2] else ":unverified")
            for n, v in users.items()
        ),
        "IDP_HOST": host,
        "PYTHONPATH": str(ROOT),
    }
    if groups_overage is not None:
        env["IDP_GROUPS_OVERAGE"] = str(groups_overage)
    idp.env = env
    subprocess.run(
        [sys.executable, "-m", "tests.oidcidp.site", "setup"],
        env=env,
        cwd=ROOT,
        check=True,
        timeout=120,
        capture_output=True,
    )
    with idp.log.open("wb") as log:
        proc = subprocess.Popen(
            [*(["ip", "netns", "exec", netns] if netns else []),
             sys.executable, "-m", "uvicorn", "tests.oidcidp.site:app", "--host", host,
             "--port", str(port), "--log-level", "warning"],
            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{idp.issuer}/.well-known/openid-configuration").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"the test IdP did not start: {idp.log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield idp
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


_CSRF = re.compile(r'name="csrfmiddlewaretoken" value="([^"]+)"')


def browser_login(
    authorize_url: str,
    user: str,
    password: str,
    stop_at: str,
    verify: ssl.SSLContext | bool = True,
) -> str:
    """Open `authorize_url`, log in with the IdP's form, follow redirects until one leads to
    a URL starting with `stop_at` (the relying party's callback), and return that URL. Raises
    if the IdP refuses the login. `verify`: the CA file of an https relying party."""
    with httpx.Client(timeout=20, follow_redirects=False, verify=verify) as browser:
        url = authorize_url
        for _ in range(10):
            if url.startswith(stop_at):
                return url
            resp = browser.get(url)
            if resp.is_redirect:
                url = urljoin(url, resp.headers["location"])
                continue
            match = _CSRF.search(resp.text)
            if resp.status_code != 200 or match is None:
                raise RuntimeError(f"unexpected IdP page {resp.status_code} at {url}")
            nxt = parse_qs(urlsplit(url).query).get("next", [""])[0]
            posted = browser.post(
                url,
                data={
                    "csrfmiddlewaretoken": match.group(1),
                    "username": user,
                    "password": password,
                    "next": nxt,
                },
                headers={"Referer": url},
            )
            if not posted.is_redirect:
                raise RuntimeError("the IdP refused the login")
            url = urljoin(url, posted.headers["location"])
        raise RuntimeError("too many redirects at the IdP")
