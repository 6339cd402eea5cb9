"""The control plane against a real OpenID provider (django-oauth-toolkit in OIDC mode, run
by tests/oidcidp on loopback; see there why this one): `idp test` reads its discovery document
and keys, and an authorization-code login with PKCE, driven by a plain HTTP client following
the IdP's login form as a browser would, yields an ID token the control plane validates.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from cryptography.hazmat.primitives import hashes

from tests.conftest import Server
from tests.oidcidp import Idp, browser_login, running_idp
from vpnfleet.controlplane.oidcprovider import (
    Connection,
    LoginSecrets,
    Provider,
    ProviderError,
    authorization_url,
    exchange_code,
    pkce_challenge,
)
from vpnfleet.core.idtoken import TokenRejected

REDIRECT = "https://vpn.example.test/sso/callback"
USERS = {"alice": ("alice-pw-9Kq", "alice@example.test"), "bob": ("bob-pw-3Lm", "bob@corp.test")}


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Idp]:
    with running_idp(tmp_path_factory.mktemp("idp"), REDIRECT, USERS) as running:
        yield running


def login(idp: Idp, user: str, password: str, secrets: LoginSecrets) -> tuple[str, str]:
    """Log in at the IdP; the (code, state) its redirect to our callback carries."""
    provider = Provider(idp.issuer, idp.client_id, Connection(timeout=10), clock_skew=60)
    url = authorization_url(
        provider.metadata(), idp.client_id, REDIRECT, ["openid", "profile", "email"], secrets
    )
    back = browser_login(url, user, password, stop_at=REDIRECT)
    query = parse_qs(urlsplit(back).query)
    return query["code"][0], query["state"][0]


def redeem(idp: Idp, code: str, verifier: str, secret: str | None = None) -> str:
    provider = Provider(idp.issuer, idp.client_id, Connection(timeout=10), clock_skew=60)
    return exchange_code(
        provider.metadata(),
        provider.conn,
        client_id=idp.client_id,
        client_secret=idp.client_secret if secret is None else secret,
        code=code,
        verifier=verifier,
        redirect_uri=REDIRECT,
    )


def test_pkce_challenge_is_the_s256_transform() -> None:
    """RFC 7636 4.2 against an independent SHA-256 (cryptography's); that the IdP accepts it
    is checked below by a real login (and a wrong verifier refused)."""
    verifier = "0123456789abcdefghijklmnopqrstuvwxyz-._~ABCDEFG"
    h = hashes.Hash(hashes.SHA256())
    h.update(verifier.encode())
    expected = base64.b64encode(h.finalize()).decode().rstrip("=")
    expected = expected.replace("+", "-").replace("/", "_")
    assert pkce_challenge(verifier) == expected and len(expected) == 43
    one, two = LoginSecrets.new(), LoginSecrets.new()
    assert len({one.state, one.nonce, one.verifier, two.state, two.nonce, two.verifier}) == 6
    assert len(one.verifier) >= 43


def test_idp_test_reads_the_real_provider(server: Server, admin: httpx.Client, idp: Idp) -> None:
    body = {
        "issuer": idp.issuer,
        "client_id": idp.client_id,
        "client_secret": idp.client_secret,
        "public_url": "https://vpn.example.test",
    }
    assert admin.put("/api/v1/idp", json=body).status_code == 200
    r = admin.post("/api/v1/idp/test")
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["issuer"] == idp.issuer
    assert out["token_endpoint"].startswith(idp.url)
    assert "RS256" in out["signing_algorithms"]
    assert out["keys"] >= 1 and out["key_ids"]
    assert out["redirect_uri"] == REDIRECT


def test_a_real_login_gives_an_id_token_that_validates(idp: Idp) -> None:
    secrets = LoginSecrets.new()
    code, state = login(idp, "alice", USERS["alice"][0], secrets)
    assert state == secrets.state
    token = redeem(idp, code, secrets.verifier)
    provider = Provider(idp.issuer, idp.client_id, Connection(timeout=10), clock_skew=60)
    claims = provider.validate_id_token(token, secrets.nonce)
    assert claims["preferred_username"] == "alice"
    assert claims["email"] == "alice@example.test"
    # The same token for another login (another nonce) is refused.
    with pytest.raises(TokenRejected, match="nonce"):
        provider.validate_id_token(token, LoginSecrets.new().nonce)
    # A client with another id does not accept it (audience).
    other = Provider(idp.issuer, "someone-else", Connection(timeout=10), clock_skew=60)
    with pytest.raises(TokenRejected, match="another client"):
        other.validate_id_token(token, secrets.nonce)
    # Long after its expiry it is refused.
    with pytest.raises(TokenRejected, match="expired"):
        provider.validate_id_token(token, secrets.nonce, now=time.time() + 86400 * 30)


def test_a_code_is_redeemed_once_and_only_with_its_verifier(idp: Idp) -> None:
    secrets = LoginSecrets.new()
    code, _ = login(idp, "bob", USERS["bob"][0], secrets)
    with pytest.raises(ProviderError, match="refused the authorization code"):
        redeem(idp, code, LoginSecrets.new().verifier)  # PKCE: wrong verifier
    secrets = LoginSecrets.new()
    code, _ = login(idp, "bob", USERS["bob"][0], secrets)
    assert redeem(idp, code, secrets.verifier)
    with pytest.raises(ProviderError, match="refused the authorization code"):
        redeem(idp, code, secrets.verifier)  # a replayed code
    secrets = LoginSecrets.new()
    code, _ = login(idp, "bob", USERS["bob"][0], secrets)
    with pytest.raises(ProviderError, match="refused the authorization code") as err:
        redeem(idp, code, secrets.verifier, secret="wrong-secret")
    assert "wrong-secret" not in str(err.value) and code not in str(err.value)


def test_a_wrong_password_gets_no_code(idp: Idp) -> None:
    with pytest.raises(RuntimeError, match="refused the login"):
        login(idp, "alice", "not-her-password", LoginSecrets.new())


def test_the_idp_log_stays_clean(idp: Idp) -> None:
    """No server error at the IdP during these tests (a 500 there would hide a bad request)."""
    assert "Traceback" not in idp.log.read_text(errors="replace")
