"""ID token validation (core/idtoken.py): one good token, then every way a token must be refused.

Tokens are signed here with keys made for the test (RSA, EC, Ed25519) by PyJWT; the bad ones
are built by hand where no library would build them (alg none, HMAC with the public key,
garbage). Each refusal is checked for its sentence, which is what an operator reads.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from vpnfleet.core import idtoken
from vpnfleet.core.idtoken import Expected, KeySet, TokenRejected

ISSUER = "https://idp.example.test/realms/corp"
CLIENT = "vpnfleet"
NONCE = "n-0S6_WzA2Mj"
NOW = 1_790_000_000.0

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_KEY2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()


def jwk(private: Any, kid: str | None, alg: str | None = None, **extra: Any) -> dict[str, Any]:
    if isinstance(private, rsa.RSAPrivateKey):
        data = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
    elif isinstance(private, ec.EllipticCurvePrivateKey):
        data = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private.public_key()))
    else:
        data = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(private.public_key()))
    if kid is not None:
        data["kid"] = kid
    if alg is not None:
        data["alg"] = alg
    data.update(extra)
    return data


def jwks(*keys: dict[str, Any]) -> KeySet:
    return KeySet({"keys": list(keys)})


def claims(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "iss": ISSUER,
        "aud": CLIENT,
        "sub": "248289761001",
        "iat": int(NOW) - 5,
        "exp": int(NOW) + 300,
        "nonce": NONCE,
        "preferred_username": "alice",
    }
    for k, v in over.items():
        if v is None:
            body.pop(k, None)
        else:
            body[k] = v
    return body


def sign(
    body: dict[str, Any], key: Any = RSA_KEY, alg: str = "RS256", kid: str | None = "k1"
) -> str:
    headers = {} if kid is None else {"kid": kid}
    return jwt.encode(body, key, algorithm=alg, headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def handmade(header: dict[str, Any], body: dict[str, Any], signature: bytes = b"") -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(body).encode())}.{b64(signature)}"


def check(token: str, keys: KeySet, **expect: Any) -> dict[str, Any]:
    """What the control plane does with a callback's token: header, key, then validate."""
    header = idtoken.read_header(token)
    key = keys.find(header)
    if key is None:
        raise TokenRejected("signed by a key the IdP does not publish")
    exp = {"issuer": ISSUER, "client_id": CLIENT, "nonce": NONCE, "now": NOW, **expect}
    return idtoken.validate(token, header, key, Expected(**exp))


RSA_SET = jwks(jwk(RSA_KEY, "k1"))


def test_a_good_token_gives_its_claims() -> None:
    got = check(sign(claims()), RSA_SET)
    assert got["preferred_username"] == "alice"
    assert got["sub"] == "248289761001"


@pytest.mark.parametrize(
    ("key", "alg", "kid"),
    [
        (RSA_KEY, "PS256", "k1"),
        (EC_KEY, "ES256", "e1"),
        (ED_KEY, "EdDSA", "o1"),
    ],
)
def test_other_asymmetric_algorithms_are_accepted(key: Any, alg: str, kid: str) -> None:
    keys = jwks(jwk(RSA_KEY, "k1"), jwk(EC_KEY, "e1"), jwk(ED_KEY, "o1"))
    assert check(sign(claims(), key, alg, kid), keys)["sub"] == "248289761001"


def test_alg_none_is_refused() -> None:
    token = handmade({"alg": "none", "kid": "k1"}, claims())
    with pytest.raises(TokenRejected, match="unsigned"):
        check(token, RSA_SET)
    token = handmade({"alg": "None"}, claims())
    with pytest.raises(TokenRejected, match="unsigned"):
        check(token, RSA_SET)


def test_hmac_signed_with_the_public_key_is_refused() -> None:
    """The key-confusion attack: HS256 keyed with the IdP's public key, which anyone has."""
    public_pem = RSA_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header, body = {"alg": "HS256", "kid": "k1", "typ": "JWT"}, claims()
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(body).encode())}"
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    with pytest.raises(TokenRejected, match="shared secret"):
        check(f"{signing_input}.{b64(mac)}", RSA_SET)


def test_a_shared_secret_in_the_jwks_is_never_used() -> None:
    secret = {"kty": "oct", "kid": "s1", "k": b64(b"x" * 32)}
    with pytest.raises(ValueError, match="no usable signing key"):
        KeySet({"keys": [secret]})
    keys = KeySet({"keys": [secret, jwk(RSA_KEY, "k1")]})
    assert keys.kids == ["k1"]


def test_a_tampered_payload_fails_the_signature() -> None:
    token = sign(claims())
    head, _, sig = token.split(".")
    forged = b64(json.dumps(claims(preferred_username="mallory")).encode())
    with pytest.raises(TokenRejected, match="signature does not verify"):
        check(f"{head}.{forged}.{sig}", RSA_SET)


def test_signed_by_another_key_with_the_same_kid_fails_the_signature() -> None:
    with pytest.raises(TokenRejected, match="signature does not verify"):
        check(sign(claims(), RSA_KEY2), RSA_SET)


def test_an_unknown_kid_finds_no_key() -> None:
    assert RSA_SET.find(idtoken.read_header(sign(claims(), kid="k2"))) is None


def test_no_kid_is_accepted_only_when_one_key_fits() -> None:
    token = sign(claims(), kid=None)
    assert check(token, RSA_SET)["sub"]
    two = jwks(jwk(RSA_KEY, "k1"), jwk(RSA_KEY2, "k2"))
    assert two.find(idtoken.read_header(token)) is None


def test_a_key_declared_for_another_algorithm_is_not_used() -> None:
    keys = jwks(jwk(RSA_KEY, "k1", alg="RS512"))
    assert keys.find(idtoken.read_header(sign(claims()))) is None


def test_encryption_keys_are_not_signing_keys() -> None:
    with pytest.raises(ValueError, match="no usable signing key"):
        jwks(jwk(RSA_KEY, "k1", use="enc"))


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("", "empty"),
        ("abc", "three dot-separated parts"),
        ("a.b.c.d", "three dot-separated parts"),
        ("!!!.e30.", "header cannot be decoded"),
        ("x" * 20000, "too long"),
    ],
)
def test_malformed_tokens_are_refused(token: str, reason: str) -> None:
    with pytest.raises(TokenRejected, match=reason):
        idtoken.read_header(token)


def test_a_header_without_alg_or_with_unknown_alg_or_crit_is_refused() -> None:
    with pytest.raises(TokenRejected, match="names no algorithm"):
        idtoken.read_header(handmade({"kid": "k1"}, claims()))
    with pytest.raises(TokenRejected, match="not supported"):
        idtoken.read_header(handmade({"alg": "RS1"}, claims()))
    # (PyJWT already refuses an unknown critical extension while reading the header)
    with pytest.raises(TokenRejected, match=r"critical|header cannot be decoded"):
        idtoken.read_header(handmade({"alg": "RS256", "crit": ["exp"]}, claims()))


def test_a_payload_that_is_not_json_is_refused() -> None:
    header = {"alg": "RS256", "kid": "k1"}
    token = jwt.api_jws.encode(b"not json", RSA_KEY, algorithm="RS256", headers=header)
    with pytest.raises(TokenRejected, match=r"not a JSON object|cannot be decoded"):
        check(token, RSA_SET)


@pytest.mark.parametrize(
    ("over", "reason"),
    [
        ({"iss": "https://evil.example.test/"}, "another issuer"),
        ({"iss": None}, "another issuer"),
        ({"aud": "someone-else"}, "another client"),
        ({"aud": None}, "no audience"),
        ({"aud": ["someone-else", "other"]}, "another client"),
        ({"aud": [CLIENT, "other"]}, "authorized party"),
        ({"aud": [CLIENT, "other"], "azp": "other"}, "authorized party"),
        ({"azp": "other"}, "authorized party"),
        ({"exp": int(NOW) - 61}, "expired"),
        ({"exp": None}, "no expiry"),
        ({"exp": "tomorrow"}, "no expiry"),
        ({"iat": int(NOW) + 61}, "in the future"),
        ({"iat": None}, "no issue time"),
        ({"nbf": int(NOW) + 120}, "not valid yet"),
        ({"nbf": "soon"}, "not-before"),
        ({"nonce": "another-login"}, "nonce"),
        ({"nonce": None}, "nonce"),
        ({"sub": None}, "no subject"),
        ({"sub": ""}, "no subject"),
    ],
)
def test_bad_claims_are_refused(over: dict[str, Any], reason: str) -> None:
    with pytest.raises(TokenRejected, match=reason):
        check(sign(claims(**over)), RSA_SET)


def test_several_audiences_with_azp_of_this_client_are_accepted() -> None:
    assert check(sign(claims(aud=[CLIENT, "other"], azp=CLIENT)), RSA_SET)["sub"]


def test_clock_skew_is_allowed_both_ways() -> None:
    assert check(sign(claims(exp=int(NOW) - 30)), RSA_SET)["sub"]
    assert check(sign(claims(iat=int(NOW) + 30)), RSA_SET)["sub"]
    with pytest.raises(TokenRejected, match="expired"):
        check(sign(claims(exp=int(NOW) - 30)), RSA_SET, clock_skew=10)


def test_messages_never_carry_the_token_or_claim_values() -> None:
    secret_name = "alice-" + str(time.time_ns())
    for over in ({"iss": secret_name}, {"nonce": secret_name}, {"aud": secret_name}):
        token = sign(claims(preferred_username=secret_name, **over))
        with pytest.raises(TokenRejected) as err:
            check(token, RSA_SET)
        assert secret_name not in str(err.value)
        assert token not in str(err.value)
