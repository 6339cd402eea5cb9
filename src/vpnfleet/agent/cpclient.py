"""The agent's client of the control plane API (async httpx), over one or several replicas.

Given several control-plane URLs (``--server`` with a comma-separated list), it talks to one at a
time, in the order given, and moves on to the next (wrapping around) when the current one
cannot be reached or ends the watch stream (a replica stopping). A request that could not even
connect is tried on the next replica at once: it never reached a server, so sending it again
cannot do it twice. Given one URL (a Kubernetes Service, which balances by itself), every
request goes there.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from vpnfleet import tlspin
from vpnfleet.wire import (
    Bootstrap,
    DeniedBatch,
    Enrollment,
    EnrollRequest,
    Heartbeat,
    RegisterRequest,
    SessionBatchResult,
    SessionClose,
    SessionOpen,
    SessionReport,
    SessionVerdict,
    Snapshot,
    WatchMessage,
    parse_watch_message,
)

log = logging.getLogger("vpnfleet.agent.cp")

M = TypeVar("M", bound=BaseModel)

# Seconds an idle connection to the control plane is kept for the next request: longer than
# the heartbeat interval (5 s), so a pod keeps one TLS connection instead of a handshake per
# heartbeat; shorter than the server's (controlplane/serving.py, 75 s), so this side closes
# it first and never sends on a connection the server is closing.
KEEP_ALIVE_SECONDS = 30.0


class ControlPlaneError(Exception):
    """The control plane could not be reached or refused the request."""

    def __init__(
        self, message: str, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        # Seconds the control plane asked us to wait (Retry-After), e.g. when a replica
        # serves its most watch streams.
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        """Network trouble and 5xx are worth retrying; 4xx are not."""
        return self.status is None or self.status >= 500 or self.status == 429


class WatchProtocolError(ControlPlaneError):
    """The watch stream sent a line this agent cannot read (malformed, or a kind or op it does
    not know). Reconnecting from the same revision would meet the same line: resync from a
    snapshot instead, which holds whatever the line described."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=None)

    @property
    def retryable(self) -> bool:
        return False


class ControlPlane:
    """Typed calls to the agent endpoints; every failure is a ControlPlaneError."""

    def __init__(
        self,
        url: str | Sequence[str],
        token: str,
        timeout: float = 10.0,
        ca_file: str | Path | None = None,
    ) -> None:
        """`url` is one control-plane URL or several (replicas, tried in this order);
        `ca_file` pins the CA the control plane's certificate must chain to (https)."""
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ValueError("no control plane URL")
        self.urls = [u.rstrip("/") for u in urls]
        self._current = 0
        self._ca_file = ca_file
        # Did the control plane answer the last request? Written here only: this client is
        # the agent's one way to the control plane (probes and metrics read it).
        self.reachable = False
        self._http = httpx.AsyncClient(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(timeout, connect=3.0),
            verify=tlspin.verify_for(ca_file),
            # httpx's default limits, with a longer keep-alive.
            limits=httpx.Limits(
                max_connections=100,
                max_keepalive_connections=20,
                keepalive_expiry=KEEP_ALIVE_SECONDS,
            ),
        )

    @property
    def url(self) -> str:
        """The control-plane URL requests go to now."""
        return self.urls[self._current]

    def failover(self, away_from: str) -> None:
        """Move on to the next URL if `away_from` is still the current one (two requests that
        fail at once move on once, not twice)."""
        if len(self.urls) < 2 or self.url != away_from:
            return
        self._current = (self._current + 1) % len(self.urls)
        self._http.base_url = httpx.URL(self.url)
        log.info("control plane %s is away; using %s", away_from, self.url)

    def use_token(self, token: str) -> None:
        """Send ``token`` from now on (the pod's own credential, after enrollment)."""
        self._http.headers["Authorization"] = f"Bearer {token}"

    async def enroll(self, req: EnrollRequest) -> Enrollment:
        """Exchange the enrollment token (the one this client was made with) for the pod's own
        credential. The caller switches to it with :meth:`use_token`."""
        return await self._typed(Enrollment, "POST", "/api/v1/agent/enroll", req)

    def _failure(self, what: str, exc: httpx.HTTPError, url: str) -> ControlPlaneError:
        """A network failure at `url` as one sentence (a TLS failure says which check failed);
        the next request goes to the next replica."""
        self.reachable = False
        self.failover(url)
        tls_problem = tlspin.describe_failure(url, exc, self._ca_file)
        where = f" ({url})" if len(self.urls) > 1 else ""
        return ControlPlaneError(f"{what}{where}: {tls_problem or type(exc).__name__}")

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request, tried on each replica in turn while none accepts the connection."""
        for attempt in range(len(self.urls)):
            url = self.url
            try:
                return await self._http.request(method, path, **kwargs)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                # Never reached a server: the next replica may take it.
                if attempt + 1 == len(self.urls):
                    raise self._failure(f"{method} {path}", exc, url) from None
                self.failover(url)
            except httpx.HTTPError as exc:
                raise self._failure(f"{method} {path}", exc, url) from None
        raise AssertionError("unreachable")

    async def close(self) -> None:
        await self._http.aclose()

    async def _call(
        self,
        method: str,
        path: str,
        body: BaseModel | None = None,
        raw: bytes | None = None,
        **extra: Any,
    ) -> Any:
        """`extra`: more httpx request arguments (params, a longer timeout)."""
        if raw is not None:
            resp = await self._send(
                method, path, content=raw, headers={"Content-Type": "application/json"}, **extra
            )
        else:
            resp = await self._send(
                method, path, json=None if body is None else body.model_dump(mode="json"), **extra
            )
        self.reachable = resp.status_code < 500
        if resp.status_code >= 400:
            try:
                detail = resp.json().get("detail", resp.text[:200])
            except ValueError:
                detail = resp.text[:200]
            raise ControlPlaneError(
                f"{method} {path}: {resp.status_code} {detail}", resp.status_code
            )
        return resp.json()

    async def _typed(
        self, model: type[M], method: str, path: str, body: BaseModel | None = None
    ) -> M:
        return model.model_validate(await self._call(method, path, body))

    async def register(self, req: RegisterRequest) -> Bootstrap:
        return await self._typed(Bootstrap, "POST", "/api/v1/agent/register", req)

    async def snapshot(self) -> Snapshot:
        return await self._typed(Snapshot, "GET", "/api/v1/agent/snapshot")

    async def crl(self) -> str:
        resp = await self._send("GET", "/api/v1/pki/crl")
        if resp.status_code >= 400:
            raise ControlPlaneError(f"GET crl: {resp.status_code}", resp.status_code)
        return resp.text

    async def session_open(self, body: SessionOpen) -> SessionVerdict:
        return await self._typed(SessionVerdict, "POST", "/api/v1/agent/sessions/open", body)

    async def session_close(self, body: SessionClose) -> None:
        await self._call("POST", "/api/v1/agent/sessions/close", body)

    async def session_batch(self, pod: str, records: list[dict[str, Any]]) -> SessionBatchResult:
        """Send open/close records (``{"kind": ..., "body": ...}``, the spool's form) in one
        request; the control plane applies them in order and answers each one."""
        body = json.dumps({"pod": pod, "records": records}, separators=(",", ":"))
        out = await self._call("POST", "/api/v1/agent/sessions/batch", raw=body.encode())
        return SessionBatchResult.model_validate(out)

    async def session_report(self, body: SessionReport) -> tuple[int, list[str]]:
        """(sessions the control plane closed, live uids it has ended: to disconnect)."""
        out = await self._call("POST", "/api/v1/agent/sessions/report", body)
        ended = out.get("ended", [])
        return int(out.get("closed", 0)), [str(u) for u in ended] if isinstance(ended, list) else []

    async def denied(self, body: DeniedBatch) -> None:
        await self._call("POST", "/api/v1/agent/denied", body)

    async def flows(self, pod: str, records: list[str]) -> dict[str, Any]:
        """Send flow records already serialized as JSON objects (the spool's lines) in one
        ``FlowBatch``, without parsing them again."""
        body = f'{{"pod":{json.dumps(pod)},"records":[{",".join(records)}]}}'
        out = await self._call("POST", "/api/v1/agent/flows", raw=body.encode())
        return out if isinstance(out, dict) else {}

    async def heartbeat(self, body: Heartbeat) -> int:
        out = await self._call("POST", "/api/v1/agent/heartbeat", body)
        return int(out.get("revision", 0))

    async def sso_login(self, body: dict[str, Any]) -> dict[str, Any]:
        """Register a connection waiting for its user's single sign-on login (agent/ssologin.py)."""
        out = await self._call("POST", "/api/v1/agent/sso-logins", raw=json.dumps(body).encode())
        if not isinstance(out, dict):
            raise ControlPlaneError("POST /api/v1/agent/sso-logins: not an object", 502)
        return out

    async def sso_decisions(self, wait: float = 0) -> list[dict[str, Any]]:
        """This pod's single sign-on logins decided since it last asked; with `wait`, the
        control plane answers as soon as one is decided, or empty after `wait` seconds."""
        extra: dict[str, Any] = {}
        if wait > 0:
            extra = {
                "params": {"wait": f"{wait:g}"},
                "timeout": httpx.Timeout(wait + 10, connect=3.0),
            }
        out = await self._call("GET", "/api/v1/agent/sso-decisions", **extra)
        got = out.get("decisions") if isinstance(out, dict) else None
        return [d for d in got if isinstance(d, dict)] if isinstance(got, list) else []

    async def watch(self, since: int) -> AsyncIterator[WatchMessage]:
        """Messages after `since` until the stream breaks (raises ControlPlaneError then), or
        until a line does not parse (raises WatchProtocolError: resync from a snapshot), or
        until the control plane ends it (returns: the replica is stopping; the next stream
        goes to the next replica)."""
        url = self.url
        try:
            async with self._http.stream(
                "GET",
                "/api/v1/watch",
                params={"since": since},
                timeout=httpx.Timeout(10.0, read=60.0),
            ) as resp:
                retry_after = _retry_after(resp)
                # A replica at its stream limit answered: it is reachable, just full.
                self.reachable = resp.status_code < 500 or retry_after is not None
                if resp.status_code >= 400:
                    await resp.aread()
                    if resp.status_code >= 500:
                        self.failover(url)  # full or failing: another replica may serve
                    raise ControlPlaneError(
                        f"watch: HTTP {resp.status_code} {_detail(resp)}",
                        resp.status_code,
                        retry_after,
                    )
                async for line in resp.aiter_lines():
                    if not line:
                        continue
                    try:
                        message = parse_watch_message(line)
                    except ValueError as exc:
                        raise WatchProtocolError(f"watch: {exc}") from None
                    yield message
        except httpx.HTTPError as exc:
            raise self._failure("watch", exc, url) from None
        self.failover(url)


def _retry_after(resp: httpx.Response) -> float | None:
    """Retry-After in seconds (the delta form; the control plane never sends a date)."""
    raw = resp.headers.get("retry-after", "").strip()
    return float(min(int(raw), 3600)) if raw.isdigit() else None


def _detail(resp: httpx.Response) -> str:
    try:
        return str(resp.json().get("detail", ""))[:300]
    except ValueError:
        return resp.text[:200]
