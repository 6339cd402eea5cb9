"""The CLI's HTTP client: where the control plane is, who we are, and error translation."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from vpnfleet import tlspin, tokenbinding
from vpnfleet.controlplane.settings import DEFAULT_DATA_DIR

DEFAULT_URL = "http://127.0.0.1:8000"


class CLIError(Exception):
    """A failure the CLI reports as one sentence with a non-zero exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _config_file() -> dict[str, Any]:
    path = Path(
        os.environ.get("VPNFLEET_CONFIG", Path.home() / ".config" / "vpnfleet" / "config.toml")
    )
    if not path.exists():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CLIError(f"cannot read config file {path}: {exc}") from None


def resolve(
    url: str | None, token: str | None, ca_file: str | None = None
) -> tuple[str, str | None, str | None]:
    """URL, token and pinned CA file from flags, then VPNFLEET_URL/VPNFLEET_TOKEN(_FILE)/
    VPNFLEET_CA_FILE, then the config file, then the local server's first admin token in its
    data directory. A token read from a file is only sent where its binding record allows
    (vpnfleet/tokenbinding.py); an explicit token goes wherever the URL says."""
    cfg = _config_file()
    url = str(url or os.environ.get("VPNFLEET_URL") or cfg.get("url") or DEFAULT_URL).rstrip("/")
    try:
        tokenbinding.origin(url)
    except ValueError:
        raise CLIError(f"control plane URL {url!r} is not an http:// or https:// URL", 2) from None
    ca_file = ca_file or os.environ.get("VPNFLEET_CA_FILE") or cfg.get("ca_file") or None
    token = token or os.environ.get("VPNFLEET_TOKEN") or cfg.get("token")
    if token:
        return url, token, ca_file
    named = os.environ.get("VPNFLEET_TOKEN_FILE") or cfg.get("token_file")
    if named:
        path = Path(named)
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise CLIError(f"cannot read token file {path}: {exc.strerror}") from None
    else:
        data_dir = Path(os.environ.get("VPNFLEET_DATA_DIR", DEFAULT_DATA_DIR))
        path = data_dir / tokenbinding.ADMIN_TOKEN_FILE
        try:
            token = path.read_text().strip()
        except OSError:
            return url, None, ca_file
    if not token:
        return url, None, ca_file
    try:
        binding = tokenbinding.read(path)
    except ValueError as exc:
        raise CLIError(f"{exc}; not sending the token in {path}") from None
    override = "to send a token there on purpose, pass --token or set VPNFLEET_TOKEN"
    if binding is None:
        if not named and not tokenbinding.is_loopback_url(url):
            raise CLIError(
                f"the token in {path} has no record of the URL it is for, so it is only sent "
                f"to this host (loopback), not to {url}; {override}"
            )
    elif not tokenbinding.allows(binding, url):
        shown = ", ".join(binding.urls[:3]) + (" ..." if len(binding.urls) > 3 else "")
        raise CLIError(
            f"the token in {path} was created for {shown or 'no URL'}, not {url}; "
            f"refusing to send it there ({override})"
        )
    if binding is not None and binding.ca_file and not ca_file and url.startswith("https:"):
        ca_file = binding.ca_file
    return url, token, ca_file


@dataclass
class APIClient:
    """Calls the control plane's REST API and turns problem+json into CLIError."""

    url: str
    token: str | None
    timeout: float = 30.0
    # The CA the control plane's certificate must chain to (None: httpx's default CAs).
    ca_file: str | None = None

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def request(
        self,
        method: str,
        path: str,
        json: Any = None,
        params: dict[str, Any] | None = None,
    ) -> httpx.Response:
        clean = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            verify = tlspin.verify_for(self.ca_file)
        except tlspin.TrustError as exc:
            raise CLIError(str(exc), 2) from None
        try:
            with httpx.Client(base_url=self.url, timeout=self.timeout, verify=verify) as http:
                resp = http.request(
                    # no params at all, not {}: that would drop the query of a next-page link
                    method,
                    path,
                    json=json,
                    params=clean or None,
                    headers=self._headers(),
                )
        except httpx.HTTPError as exc:
            tls_problem = tlspin.describe_failure(self.url, exc, self.ca_file)
            if tls_problem:
                raise CLIError(tls_problem) from None
            if isinstance(exc, httpx.ConnectError):
                raise CLIError(
                    f"cannot reach the control plane at {self.url} (is 'vpnfleet server' "
                    "running? set VPNFLEET_URL or --url)"
                ) from None
            raise CLIError(f"request to {self.url} failed: {type(exc).__name__}") from None
        if resp.status_code >= 400:
            raise CLIError(_problem_text(resp))
        return resp

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params).json()

    def post(self, path: str, body: Any = None) -> Any:
        resp = self.request("POST", path, json=body)
        return resp.json() if resp.content else None

    def patch(self, path: str, body: Any) -> Any:
        return self.request("PATCH", path, json=body).json()

    def put(self, path: str, body: Any) -> Any:
        return self.request("PUT", path, json=body).json()

    def delete(self, path: str) -> Any:
        resp = self.request("DELETE", path)
        return resp.json() if resp.content else None

    def text(self, path: str) -> str:
        return self.request("GET", path).text

    def get_all(self, path: str, *, total: int | None = None, **params: Any) -> list[Any]:
        """Every row of a paginated list (or its first `total`), following each page's
        `Link: <...>; rel="next"`. Pages hold `VPNFLEET_PAGE_SIZE` rows (default: the server's)."""
        size = _page_size()
        if total is not None:
            size = min(size or MAX_PAGE, total, MAX_PAGE)
        rows: list[Any] = []
        resp = self.request("GET", path, params={**params, "limit": size})
        while True:
            page = resp.json()
            if not isinstance(page, list):
                raise CLIError(f"the control plane answered {path} with something not a list")
            rows += page
            following = resp.links.get("next", {}).get("url")
            if not following or (total is not None and len(rows) >= total):
                return rows[:total]
            # Only ever a path on the same server: the token goes nowhere else.
            if not following.startswith("/") or following.startswith("//"):
                raise CLIError(f"the control plane's next page is not on it: {following!r}")
            resp = self.request("GET", following)


MAX_PAGE = 10_000  # the control plane's largest page


def _page_size() -> int | None:
    text = os.environ.get("VPNFLEET_PAGE_SIZE")
    if not text:
        return None
    try:
        size = int(text)
    except ValueError:
        size = 0
    if not 1 <= size <= MAX_PAGE:
        raise CLIError(f"VPNFLEET_PAGE_SIZE must be a number from 1 to {MAX_PAGE}, not {text!r}")
    return size


def _problem_text(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return f"the control plane answered HTTP {resp.status_code}"
    if isinstance(body, dict) and body.get("detail"):
        return str(body["detail"])
    return f"the control plane answered HTTP {resp.status_code}"
