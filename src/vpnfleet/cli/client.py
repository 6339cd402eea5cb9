"""The CLI's HTTP client: where the control plane is, who we are, and error translation."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

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


def resolve(url: str | None, token: str | None) -> tuple[str, str | None]:
    """URL and token from flags, then VPNFLEET_URL/VPNFLEET_TOKEN(_FILE), then the config file,
    then the local server's first admin token in its data directory."""
    cfg = _config_file()
    url = url or os.environ.get("VPNFLEET_URL") or cfg.get("url") or DEFAULT_URL
    token = token or os.environ.get("VPNFLEET_TOKEN") or cfg.get("token")
    token_file = os.environ.get("VPNFLEET_TOKEN_FILE") or cfg.get("token_file")
    if not token and token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise CLIError(f"cannot read token file {token_file}: {exc.strerror}") from None
    if not token:
        data_dir = Path(os.environ.get("VPNFLEET_DATA_DIR", DEFAULT_DATA_DIR))
        local = data_dir / "admin-token"
        if local.exists():
            try:
                token = local.read_text().strip()
            except OSError:
                token = None
    return str(url).rstrip("/"), token


@dataclass
class APIClient:
    """Calls the control plane's REST API and turns problem+json into CLIError."""

    url: str
    token: str | None
    timeout: float = 30.0

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
            with httpx.Client(base_url=self.url, timeout=self.timeout) as http:
                resp = http.request(
                    # no params at all, not {}: that would drop the query of a next-page link
                    method,
                    path,
                    json=json,
                    params=clean or None,
                    headers=self._headers(),
                )
        except httpx.ConnectError:
            raise CLIError(
                f"cannot reach the control plane at {self.url} (is 'vpnfleet server' running? "
                "set VPNFLEET_URL or --url)"
            ) from None
        except httpx.HTTPError as exc:
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
