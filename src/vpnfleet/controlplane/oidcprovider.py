"""The configured OpenID provider: its discovery document and its signing keys.

Discovery (OpenID Connect Discovery 1.0): the document at
``{issuer}/.well-known/openid-configuration`` must name exactly the configured issuer (a
document that names another is refused: it could hand out another IdP's endpoints) and the
endpoints the authorization-code flow needs.

Keys: the JWKS is fetched once and kept; an IdP rotating its keys publishes the new one before
signing with it, so a token with a key id the cached set does not hold triggers one refetch.
Refetches are spaced (`min_refetch_seconds`) so that tokens with made-up key ids cannot make
the control plane hammer the IdP; the set is also refreshed after `max_age_seconds`.

Network calls are synchronous httpx (the API runs them in its thread pool); a lock keeps one
fetch at a time per provider.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import httpx
import jwt

from vpnfleet.core import idtoken
from vpnfleet.core.idtoken import Expected, Header, KeySet, TokenRejected

DISCOVERY_PATH = "/.well-known/openid-configuration"
MAX_DOCUMENT_BYTES = 512 * 1024


class ProviderError(Exception):
    """The IdP could not be used; the message is one sentence for an operator."""


def check_url(url: str, what: str, *, allow_http: bool) -> str:
    """`url` if it is an absolute https URL (http only when allowed, e.g. in a lab)."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"{what} {url!r} is not an absolute http(s) URL")
    if parts.scheme == "http" and not allow_http and not _is_loopback(parts.hostname):
        raise ValueError(f"{what} {url!r} is not https (set allow_http for a lab)")
    if parts.fragment or parts.username or parts.password:
        raise ValueError(f"{what} {url!r} must have no fragment and no credentials")
    return url


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Metadata:
    """The parts of the discovery document the login flow uses."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    signing_algorithms: tuple[str, ...]
    pkce_methods: tuple[str, ...] | None  # None: the IdP does not say


def parse_metadata(doc: object, issuer: str, *, allow_http: bool) -> Metadata:
    """Check a discovery document against the configured `issuer`."""
    if not isinstance(doc, dict):
        raise ProviderError("the IdP's discovery document is not a JSON object")
    if doc.get("issuer") != issuer:
        raise ProviderError(
            f"the IdP's discovery document names issuer {str(doc.get('issuer'))[:200]!r}, "
            f"not the configured {issuer!r}"
        )
    urls: dict[str, str] = {}
    for name in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
        value = doc.get(name)
        if not isinstance(value, str):
            raise ProviderError(f"the IdP's discovery document has no {name}")
        try:
            urls[name] = check_url(value, name, allow_http=allow_http)
        except ValueError as exc:
            raise ProviderError(f"the IdP's discovery document: {exc}") from None
    algs = doc.get("id_token_signing_alg_values_supported") or ["RS256"]
    usable = tuple(a for a in algs if isinstance(a, str) and a in idtoken.SIGNING_ALGORITHMS)
    if not usable:
        raise ProviderError(
            "the IdP signs ID tokens only with algorithms vpnfleet refuses "
            f"({', '.join(str(a) for a in algs)[:200]}): configure an RSA, EC or EdDSA key"
        )
    pkce = doc.get("code_challenge_methods_supported")
    methods = tuple(m for m in pkce if isinstance(m, str)) if isinstance(pkce, list) else None
    if methods is not None and "S256" not in methods:
        raise ProviderError("the IdP does not support PKCE with S256")
    return Metadata(
        issuer=issuer,
        authorization_endpoint=urls["authorization_endpoint"],
        token_endpoint=urls["token_endpoint"],
        jwks_uri=urls["jwks_uri"],
        signing_algorithms=usable,
        pkce_methods=methods,
    )


@dataclass(frozen=True)
class Connection:
    """How to reach the IdP."""

    timeout: float = 10.0
    ca_file: str | None = None  # verify the IdP's TLS with this CA bundle instead of the system's
    allow_http: bool = False

    def client(self) -> httpx.Client:
        verify: Any = self.ca_file if self.ca_file else True
        return httpx.Client(timeout=self.timeout, verify=verify, follow_redirects=False)


def get_json(client: httpx.Client, url: str, what: str) -> object:
    """GET `url` and decode its JSON body; any failure is one ProviderError sentence."""
    try:
        with client.stream("GET", url, headers={"Accept": "application/json"}) as resp:
            if resp.status_code != 200:
                raise ProviderError(f"the IdP answered {resp.status_code} for its {what}")
            body = b""
            for chunk in resp.iter_bytes():
                body += chunk
                if len(body) > MAX_DOCUMENT_BYTES:
                    raise ProviderError(f"the IdP's {what} is larger than it may be")
    except httpx.TimeoutException:
        raise ProviderError(f"the IdP did not answer in time for its {what}") from None
    except httpx.ConnectError as exc:
        raise ProviderError(f"cannot reach the IdP for its {what}: {_reason(exc)}") from None
    except httpx.HTTPError as exc:
        raise ProviderError(f"fetching the IdP's {what} failed: {_reason(exc)}") from None
    try:
        return json.loads(body)
    except ValueError:
        raise ProviderError(f"the IdP's {what} is not JSON") from None


def _reason(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


def discover(issuer: str, conn: Connection) -> Metadata:
    with conn.client() as client:
        doc = get_json(client, issuer.rstrip("/") + DISCOVERY_PATH, "discovery document")
    return parse_metadata(doc, issuer, allow_http=conn.allow_http)


def fetch_keys(jwks_uri: str, conn: Connection) -> KeySet:
    with conn.client() as client:
        doc = get_json(client, jwks_uri, "signing keys (JWKS)")
    try:
        return KeySet(doc if isinstance(doc, dict) else {})
    except ValueError as exc:
        raise ProviderError(f"the IdP's signing keys: {exc}") from None


class KeyCache:
    """The IdP's signing keys, refetched on an unknown key id (spaced) and when old."""

    def __init__(
        self,
        fetch: Callable[[], KeySet],
        *,
        min_refetch_seconds: float = 10.0,
        max_age_seconds: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._min_refetch = min_refetch_seconds
        self._max_age = max_age_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: KeySet | None = None
        self._fetched_at = 0.0
        self.fetches = 0

    def _refresh(self) -> KeySet:
        keys = self._fetch()
        self.fetches += 1
        self._keys, self._fetched_at = keys, self._clock()
        return keys

    def current(self) -> KeySet:
        with self._lock:
            if self._keys is None or self._clock() - self._fetched_at >= self._max_age:
                return self._refresh()
            return self._keys

    def key_for(self, header: Header) -> jwt.PyJWK:
        """The key that signed a token with `header`; refetches once for an unknown key id."""
        with self._lock:
            keys = self._keys
            if keys is None or self._clock() - self._fetched_at >= self._max_age:
                keys = self._refresh()
            key = keys.find(header)
            if key is None and self._clock() - self._fetched_at >= self._min_refetch:
                key = self._refresh().find(header)
            if key is None:
                raise TokenRejected("the ID token is signed with a key the IdP does not publish")
            return key


class Provider:
    """One configured IdP: metadata discovered once, keys cached, tokens validated."""

    def __init__(
        self,
        issuer: str,
        client_id: str,
        conn: Connection,
        clock_skew: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.issuer = issuer
        self.client_id = client_id
        self.conn = conn
        self.clock_skew = clock_skew
        self._metadata: Metadata | None = None
        self._lock = threading.Lock()
        self.keys = KeyCache(lambda: fetch_keys(self.metadata().jwks_uri, conn), clock=clock)

    def metadata(self) -> Metadata:
        with self._lock:
            if self._metadata is None:
                self._metadata = discover(self.issuer, self.conn)
            return self._metadata

    def validate_id_token(self, token: str, nonce: str, now: float | None = None) -> dict[str, Any]:
        """The ID token's claims, or TokenRejected / ProviderError with one sentence."""
        header = idtoken.read_header(token)
        if header.alg not in self.metadata().signing_algorithms:
            raise TokenRejected(f"the IdP does not announce signing ID tokens with {header.alg}")
        key = self.keys.key_for(header)
        expected = Expected(
            issuer=self.issuer,
            client_id=self.client_id,
            nonce=nonce,
            now=time.time() if now is None else now,
            clock_skew=self.clock_skew,
        )
        return idtoken.validate(token, header, key, expected)


# --- the authorization-code flow with PKCE (RFC 7636) ------------------------------------------


@dataclass(frozen=True)
class LoginSecrets:
    """What one login sends and must find again: `state` (binds the callback to the login),
    `nonce` (binds the ID token to it), the PKCE verifier and its S256 challenge."""

    state: str
    nonce: str
    verifier: str

    @property
    def challenge(self) -> str:
        return pkce_challenge(self.verifier)

    @classmethod
    def new(cls) -> LoginSecrets:
        # 32 random bytes each; the verifier's 43 characters are RFC 7636's minimum length.
        return cls(
            state=secrets.token_urlsafe(32),
            nonce=secrets.token_urlsafe(32),
            verifier=secrets.token_urlsafe(32),
        )


def pkce_challenge(verifier: str) -> str:
    """BASE64URL(SHA256(verifier)) without padding (RFC 7636, 4.2)."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def authorization_url(
    meta: Metadata, client_id: str, redirect_uri: str, scopes: list[str], login: LoginSecrets
) -> str:
    """Where the user's browser is sent to log in."""
    query = urlencode(
        {
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": redirect_uri,
            "scope": " ".join(scopes),
            "state": login.state,
            "nonce": login.nonce,
            "code_challenge": login.challenge,
            "code_challenge_method": "S256",
        }
    )
    sep = "&" if urlsplit(meta.authorization_endpoint).query else "?"
    return f"{meta.authorization_endpoint}{sep}{query}"


def exchange_code(
    meta: Metadata,
    conn: Connection,
    *,
    client_id: str,
    client_secret: str | None,
    code: str,
    verifier: str,
    redirect_uri: str,
) -> str:
    """Redeem an authorization code at the token endpoint; returns the raw ID token.

    A confidential client authenticates with HTTP Basic (client_secret_basic, the method every
    IdP supports); a public one sends its client id. Errors are one ProviderError sentence,
    with the IdP's `error` code but never the code, the secret or a token."""
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect_uri,
        "code_verifier": verifier,
    }
    headers = {"Accept": "application/json"}
    if client_secret is None:
        form["client_id"] = client_id
    else:
        # RFC 6749 2.3.1: form-encode id and secret before Basic (httpx.BasicAuth does not).
        pair = f"{quote(client_id, safe='')}:{quote(client_secret, safe='')}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    try:
        with conn.client() as client:
            resp = client.post(meta.token_endpoint, data=form, headers=headers)
    except httpx.TimeoutException:
        raise ProviderError("the IdP's token endpoint did not answer in time") from None
    except httpx.HTTPError as exc:
        raise ProviderError(f"cannot reach the IdP's token endpoint: {_reason(exc)}") from None
    try:
        body = resp.json()
    except ValueError:
        body = None
    if resp.status_code != 200 or not isinstance(body, dict):
        error = body.get("error") if isinstance(body, dict) else None
        code_text = f" ({str(error)[:100]})" if isinstance(error, str) else ""
        raise ProviderError(
            f"the IdP refused the authorization code: HTTP {resp.status_code}{code_text}"
        )
    id_token = body.get("id_token")
    if not isinstance(id_token, str) or not id_token:
        raise ProviderError("the IdP's token response has no ID token (is 'openid' a scope?)")
    return id_token
