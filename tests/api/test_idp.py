"""`vpnfleet idp set|show|test` and the control plane's use of an IdP's discovery document and
signing keys (controlplane/oidcprovider.py).

The IdP's documents are served over real HTTP on loopback by tests/docserver.py; tokens are
signed with keys the test makes. The settings API runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import create_engine, text

from tests.api.test_cli import run
from tests.api.test_users_groups_rules import problem
from tests.conftest import Server
from tests.docserver import DocServer, running_docserver
from vpnfleet.controlplane.oidcprovider import Connection, Provider, ProviderError
from vpnfleet.core.idtoken import TokenRejected

CLIENT = "vpnfleet"
SECRET = "client-secret-7fKq2LmZ9"
KEY1 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
KEY2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    return {**data, "kid": kid, "use": "sig", "alg": "RS256"}


def publish(docs: DocServer, *keys: dict[str, Any], issuer: str | None = None) -> str:
    """Serve a discovery document and a JWKS; returns the issuer."""
    iss = docs.url + "/realms/corp"
    docs.docs["/realms/corp/.well-known/openid-configuration"] = {
        "issuer": issuer or iss,
        "authorization_endpoint": iss + "/auth",
        "token_endpoint": iss + "/token",
        "jwks_uri": iss + "/certs",
        "id_token_signing_alg_values_supported": ["RS256"],
        "code_challenge_methods_supported": ["plain", "S256"],
    }
    docs.docs["/realms/corp/certs"] = {"keys": list(keys)}
    return iss


@pytest.fixture
def docs() -> Iterator[DocServer]:
    with running_docserver() as srv:
        yield srv


def settings(issuer: str, **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "issuer": issuer,
        "client_id": CLIENT,
        "client_secret": SECRET,
        "public_url": "https://vpn.example.test",
    }
    body.update(over)
    return body


def token(key: rsa.RSAPrivateKey, kid: str, issuer: str, nonce: str, **over: Any) -> str:
    now = int(time.time())
    claims = {"iss": issuer, "aud": CLIENT, "sub": "s-1", "iat": now, "exp": now + 300}
    claims.update(nonce=nonce, preferred_username="alice", **over)
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})


# --- settings over the API ------------------------------------------------------------------


def test_set_show_and_audit_never_reveal_the_secret(
    server: Server, admin: httpx.Client, docs: DocServer
) -> None:
    assert problem(admin.get("/api/v1/idp"), 404)
    iss = publish(docs, jwk(KEY1, "k1"))
    r = admin.put("/api/v1/idp", json=settings(iss))
    assert r.status_code == 200, r.text
    shown = admin.get("/api/v1/idp").json()
    assert shown["issuer"] == iss
    assert shown["redirect_uri"] == "https://vpn.example.test/sso/callback"
    assert shown["client_secret_set"] is True
    assert shown["user_claim"] == "preferred_username"
    assert SECRET not in json.dumps(shown)
    audit = admin.get("/api/v1/audit/admin", params={"action": "idp.set"}).json()
    assert len(audit) == 1
    assert audit[0]["after"]["client_secret_changed"] is True
    assert SECRET not in json.dumps(audit)
    # Sealed in the database, not stored as given.
    engine = create_engine(server.database_url)
    try:
        with engine.connect() as conn:
            stored = conn.execute(text("SELECT client_secret_sealed FROM idp_config")).scalar()
    finally:
        engine.dispose()
    assert stored and SECRET not in stored
    # Leaving the secret out keeps it; the audit entry says it did not change.
    body = settings(iss, user_claim="email", match="email")
    del body["client_secret"]
    assert admin.put("/api/v1/idp", json=body).status_code == 200
    shown = admin.get("/api/v1/idp").json()
    assert (shown["user_claim"], shown["match"], shown["client_secret_set"]) == (
        "email",
        "email",
        True,
    )
    audit = admin.get("/api/v1/audit/admin", params={"action": "idp.set"}).json()
    assert len(audit) == 2
    changed = [a["after"]["client_secret_changed"] for a in audit]
    assert sorted(changed) == [False, True]


def test_only_an_admin_sets_or_tests(server: Server, docs: DocServer) -> None:
    iss = publish(docs, jwk(KEY1, "k1"))
    with server.client(server.make_token("operator")) as op:
        assert problem(op.put("/api/v1/idp", json=settings(iss)), 403)
        with server.client() as admin:
            assert admin.put("/api/v1/idp", json=settings(iss)).status_code == 200
        assert op.get("/api/v1/idp").status_code == 200
        assert problem(op.post("/api/v1/idp/test"), 403)
    with server.client(server.make_token("auditor")) as aud:
        assert problem(aud.get("/api/v1/idp"), 403)


@pytest.mark.parametrize(
    ("over", "words"),
    [
        ({"issuer": "http://idp.example.test/realms/corp"}, "not https"),
        ({"issuer": "idp.example.test"}, "not an absolute"),
        ({"public_url": "ftp://vpn.example.test"}, "not an absolute"),
        ({"public_url": "https://vpn.example.test/?x=1"}, "no query"),
        ({"scopes": ["profile"]}, "must include openid"),
        ({"scopes": ["openid", "a b"]}, "not a scope"),
        ({"match": "sub"}, "match must be"),
        ({"clock_skew_seconds": 3600}, "clock_skew_seconds"),
        ({"client_secret": ""}, "client_secret"),
        ({"unknown": 1}, "unknown"),
        ({"groups_claim": "groups"}, "groups_claim needs group_map"),
        ({"group_map": {"idp-eng": "eng"}}, "group_map needs groups_claim"),
        ({"groups_claim": "sub", "group_map": {"a": "eng"}}, "a claim of the token itself"),
        ({"groups_claim": "_claim_names", "group_map": {"a": "eng"}}, "a claim of the token"),
        ({"groups_claim": "my groups", "group_map": {"a": "eng"}}, "is not a claim name"),
        ({"groups_claim": "", "group_map": {"a": "eng"}}, "groups_claim"),
        ({"groups_claim": "g" * 101, "group_map": {"a": "eng"}}, "groups_claim"),
        (
            {"groups_claim": "preferred_username", "group_map": {"a": "eng"}},
            "another claim than user_claim",
        ),
        ({"groups_claim": "groups", "group_map": {" ": "eng"}}, "needs a name or an id"),
        ({"groups_claim": "groups", "group_map": {"a": "Bad Name"}}, "group name"),
        ({"groups_claim": "groups", "group_map": {"a": ["eng"]}}, "group_map"),
        (
            {"groups_claim": "groups", "group_map": {f"g{i}": "eng" for i in range(501)}},
            "group_map",
        ),
    ],
)
def test_bad_settings_are_refused_and_change_nothing(
    admin: httpx.Client, over: dict[str, Any], words: str
) -> None:
    good = settings("https://idp.example.test/realms/corp")
    assert admin.put("/api/v1/idp", json=good).status_code == 200
    detail = problem(admin.put("/api/v1/idp", json={**good, **over}), 422)
    assert words in detail
    assert admin.get("/api/v1/idp").json()["issuer"] == good["issuer"]


def test_idp_test_shows_what_the_idp_publishes(admin: httpx.Client, docs: DocServer) -> None:
    iss = publish(docs, jwk(KEY1, "k1"), jwk(KEY2, "k2"))
    assert admin.put("/api/v1/idp", json=settings(iss)).status_code == 200
    r = admin.post("/api/v1/idp/test")
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["token_endpoint"] == iss + "/token"
    assert out["key_ids"] == ["k1", "k2"]
    assert out["pkce_methods"] == ["plain", "S256"]
    assert out["signing_algorithms"] == ["RS256"]


def test_idp_test_says_why_an_idp_is_unusable(admin: httpx.Client, docs: DocServer) -> None:
    iss = publish(docs, jwk(KEY1, "k1"), issuer="https://someone-else.example.test")
    assert admin.put("/api/v1/idp", json=settings(iss)).status_code == 200
    assert "names issuer 'https://someone-else.example.test'" in problem(
        admin.post("/api/v1/idp/test"), 502
    )
    publish(docs)  # no keys
    assert "no usable signing key" in problem(admin.post("/api/v1/idp/test"), 502)
    docs.docs.clear()
    assert "answered 404 for its discovery document" in problem(admin.post("/api/v1/idp/test"), 502)
    gone = settings("http://127.0.0.1:9/realms/corp")
    assert admin.put("/api/v1/idp", json=gone).status_code == 200
    assert "cannot reach the IdP" in problem(admin.post("/api/v1/idp/test"), 502)


# --- the provider: discovery, keys, rotation --------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def provider(iss: str, clock: Clock | None = None) -> Provider:
    return Provider(iss, CLIENT, Connection(timeout=5), clock_skew=60, clock=clock or Clock())


def test_a_token_signed_with_a_rotated_key_is_accepted_after_one_refetch(
    docs: DocServer,
) -> None:
    iss = publish(docs, jwk(KEY1, "k1"))
    clock = Clock()
    p = provider(iss, clock)
    assert p.validate_id_token(token(KEY1, "k1", iss, "n1"), "n1")["preferred_username"] == "alice"
    assert docs.hits["/realms/corp/certs"] == 1
    # The IdP rotates: k2 published, k1 withdrawn. A minute later, a k2 token makes the cache
    # refetch once.
    publish(docs, jwk(KEY2, "k2"))
    clock.now += 60
    assert p.validate_id_token(token(KEY2, "k2", iss, "n2"), "n2")["sub"] == "s-1"
    assert docs.hits["/realms/corp/certs"] == 2
    # k1 is gone from the IdP and from the cache now.
    with pytest.raises(TokenRejected, match="key the IdP does not publish"):
        p.validate_id_token(token(KEY1, "k1", iss, "n3"), "n3")


def test_unknown_key_ids_do_not_make_it_hammer_the_idp(docs: DocServer) -> None:
    iss = publish(docs, jwk(KEY1, "k1"))
    p = provider(iss)
    p.validate_id_token(token(KEY1, "k1", iss, "n"), "n")
    for i in range(20):
        with pytest.raises(TokenRejected, match="does not publish"):
            p.validate_id_token(token(KEY2, f"made-up-{i}", iss, "n"), "n")
    assert docs.hits["/realms/corp/certs"] == 1  # within the min refetch interval: no refetch
    assert docs.hits["/realms/corp/.well-known/openid-configuration"] == 1


def test_keys_are_refreshed_when_old(docs: DocServer) -> None:
    iss = publish(docs, jwk(KEY1, "k1"))
    clock = Clock()
    p = provider(iss, clock)
    p.validate_id_token(token(KEY1, "k1", iss, "n"), "n")
    clock.now += 3599
    p.validate_id_token(token(KEY1, "k1", iss, "n"), "n")
    assert docs.hits["/realms/corp/certs"] == 1
    publish(docs, jwk(KEY2, "k2"))  # k1 withdrawn: refused once the cached set is an hour old
    clock.now += 2
    with pytest.raises(TokenRejected, match="does not publish"):
        p.validate_id_token(token(KEY1, "k1", iss, "n"), "n")
    assert docs.hits["/realms/corp/certs"] == 2


def test_a_token_from_the_right_keys_but_another_issuer_is_refused(docs: DocServer) -> None:
    iss = publish(docs, jwk(KEY1, "k1"))
    with pytest.raises(TokenRejected, match="another issuer"):
        provider(iss).validate_id_token(token(KEY1, "k1", "https://evil.example.test", "n"), "n")


def test_an_unreachable_idp_is_a_provider_error() -> None:
    with pytest.raises(ProviderError, match="cannot reach the IdP"):
        provider("http://127.0.0.1:9/x").validate_id_token(
            token(KEY1, "k1", "http://127.0.0.1:9/x", "n"), "n"
        )


# --- the CLI ----------------------------------------------------------------------------------


def test_cli_set_show_test(server: Server, docs: DocServer, tmp_path: Path) -> None:
    iss = publish(docs, jwk(KEY1, "k1"))
    conf = tmp_path / "idp.yaml"
    body = settings(iss)
    del body["client_secret"]
    conf.write_text(yaml.safe_dump(body))
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    out = run(server, "idp", "set", "-f", str(conf), "--client-secret-file", str(secret_file))
    assert "register the redirect URI https://vpn.example.test/sso/callback" in out.stdout
    shown = run(server, "idp", "show").stdout
    assert iss in shown and "openid profile email" in shown and SECRET not in shown
    tested = run(server, "idp", "test").stdout
    assert "the IdP is usable" in tested and "k1" in tested
    # A secret in the settings file is refused before anything is sent.
    conf.write_text(yaml.safe_dump({**body, "client_secret": SECRET}))
    bad = run(server, "idp", "set", "-f", str(conf), ok=False)
    assert bad.returncode == 2 and "--client-secret-file" in bad.stderr
    assert SECRET not in bad.stderr
    # An unusable IdP: exit code non-zero and one sentence.
    docs.docs.clear()
    failed = run(server, "idp", "test", ok=False)
    assert failed.returncode != 0
    assert "answered 404 for its discovery document" in failed.stderr
    assert "Traceback" not in failed.stderr


def test_cli_sets_and_shows_the_group_claim(
    server: Server, admin: httpx.Client, tmp_path: Path
) -> None:
    for name in ("eng", "contractors"):
        assert admin.post("/api/v1/groups", json={"name": name}).status_code == 201
    conf = tmp_path / "idp.yaml"
    body = settings("https://idp.example.test/realms/corp")
    del body["client_secret"]
    conf.write_text(yaml.safe_dump({**body, "group_map": {"from-file": "eng"}}))
    # --group-map replaces the file's mapping; an IdP group may hold '=' (the last one splits).
    out = run(
        server, "idp", "set", "-f", str(conf), "--groups-claim", "groups",
        "--group-map", "0b7e2c61-aaaa-4f00-9c1e-1234567890ab=eng",
        "--group-map", "cn=contractors,ou=groups=contractors",
    )  # fmt: skip
    assert "IdP settings stored" in out.stdout
    stored = admin.get("/api/v1/idp").json()
    assert stored["groups_claim"] == "groups"
    assert stored["group_map"] == {
        "0b7e2c61-aaaa-4f00-9c1e-1234567890ab": "eng",
        "cn=contractors,ou=groups": "contractors",
    }
    shown = run(server, "idp", "show").stdout
    assert "groups claim" in shown and "cn=contractors,ou=groups -> contractors" in shown
    # A group that does not exist: one sentence, exit code != 0, nothing changed.
    bad = run(
        server, "idp", "set", "-f", str(conf), "--groups-claim", "groups",
        "--group-map", "x=nosuch", ok=False,
    )  # fmt: skip
    assert bad.returncode != 0 and "do not exist: 'nosuch'" in bad.stderr
    assert "Traceback" not in bad.stderr
    malformed = run(server, "idp", "set", "-f", str(conf), "--group-map", "eng", ok=False)
    assert malformed.returncode == 2 and "IDP_GROUP=VPNFLEET_GROUP" in malformed.stderr
    assert admin.get("/api/v1/idp").json()["group_map"] == stored["group_map"]
    # --no-groups: memberships no longer follow the IdP.
    run(server, "idp", "set", "-f", str(conf), "--no-groups")
    stored = admin.get("/api/v1/idp").json()
    assert stored["groups_claim"] is None and stored["group_map"] == {}
    assert "memberships do not follow the IdP" in run(server, "idp", "show").stdout
