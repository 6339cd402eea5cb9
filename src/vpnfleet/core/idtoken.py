"""Validating an OpenID Connect ID token (OIDC Core 1.0, section 3.1.3.7), without I/O.

The caller brings the IdP's published keys (a JWKS, fetched and cached by
controlplane/oidcprovider.py) and what it expects (issuer, client id, the nonce it sent, the
time). Signature checking is PyJWT's; every other decision is made here, explicitly, so that
each refusal has its own sentence and its own test:

- only asymmetric algorithms are accepted (``none`` and the HMAC family are refused before
  any key is looked at: an HS256 token "signed" with the IdP's *public* key is the classic
  confusion attack);
- the key is chosen by ``kid`` among the IdP's signing keys; a token without ``kid`` is
  accepted only when exactly one published key fits its algorithm;
- ``iss`` must equal the configured issuer, ``aud`` must contain the client id (and with
  several audiences ``azp`` must be the client id), ``exp`` must be in the future and ``iat``
  not in the future (both within the clock skew), ``nonce`` must be the one this login sent.

Error messages never contain the token or its claims' values: only which check failed.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt

# Asymmetric JWS algorithms (RFC 7518, RFC 8037) an IdP signs ID tokens with.
SIGNING_ALGORITHMS = frozenset(
    {
        "RS256",
        "RS384",
        "RS512",
        "PS256",
        "PS384",
        "PS512",
        "ES256",
        "ES384",
        "ES512",
        "EdDSA",
    }
)
MAX_TOKEN_BYTES = 16 * 1024


class TokenRejected(ValueError):
    """The ID token is not acceptable; the message says which check failed."""


@dataclass(frozen=True)
class Expected:
    """What a valid ID token for this login must say."""

    issuer: str
    client_id: str
    nonce: str
    now: float  # seconds since the epoch
    clock_skew: float = 60.0


@dataclass(frozen=True)
class Header:
    alg: str
    kid: str | None


def read_header(token: str) -> Header:
    """The token's JOSE header, refused when malformed or not signed with an asymmetric key."""
    if not isinstance(token, str) or not token:
        raise TokenRejected("the ID token is empty")
    if len(token) > MAX_TOKEN_BYTES:
        raise TokenRejected("the ID token is too long")
    if token.count(".") != 2:
        raise TokenRejected("the ID token is not a signed JWT (three dot-separated parts)")
    try:
        raw = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise TokenRejected("the ID token's header cannot be decoded") from None
    alg = raw.get("alg")
    if not isinstance(alg, str):
        raise TokenRejected("the ID token's header names no algorithm")
    if alg.lower() == "none":
        raise TokenRejected("the ID token is unsigned (alg none)")
    if alg.upper().startswith("HS"):
        raise TokenRejected(f"the ID token is signed with {alg} (a shared secret), not an IdP key")
    if alg not in SIGNING_ALGORITHMS:
        raise TokenRejected(f"the ID token's algorithm {alg!r} is not supported")
    if raw.get("crit") is not None:
        raise TokenRejected("the ID token's header has critical extensions this does not know")
    kid = raw.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise TokenRejected("the ID token's key id is not a string")
    return Header(alg=alg, kid=kid)


class KeySet:
    """The IdP's signing keys from its JWKS document (keys for encryption are left out)."""

    def __init__(self, jwks: Mapping[str, Any]) -> None:
        keys = jwks.get("keys") if isinstance(jwks, Mapping) else None
        if not isinstance(keys, list):
            raise ValueError("the JWKS document has no 'keys' list")
        # Each key with the algorithm its JWK declares (None: any its type can do).
        self._keys: list[tuple[jwt.PyJWK, str | None]] = []
        for entry in keys:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            if entry.get("kty") == "oct":  # a shared secret has no place in a public JWKS
                continue
            try:
                declared = entry.get("alg")
                key = jwt.PyJWK.from_dict(entry)
                self._keys.append((key, declared if isinstance(declared, str) else None))
            except jwt.PyJWTError:
                continue  # a key type this cannot use; others may still sign
        if not self._keys:
            raise ValueError("the JWKS document has no usable signing key")

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def kids(self) -> list[str]:
        return [k.key_id for k, _ in self._keys if k.key_id is not None]

    def find(self, header: Header) -> jwt.PyJWK | None:
        """The key that signed a token with `header`, or None if this set does not hold it."""
        if header.kid is not None:
            for key, declared in self._keys:
                if key.key_id == header.kid and _fits(key, declared, header.alg):
                    return key
            return None
        fitting = [k for k, declared in self._keys if _fits(k, declared, header.alg)]
        return fitting[0] if len(fitting) == 1 else None


def _fits(key: jwt.PyJWK, declared: str | None, alg: str) -> bool:
    """Whether `key` can verify `alg` (its declared alg, or else its type)."""
    if declared is not None:
        return declared == alg
    families = {"RSA": ("RS", "PS"), "EC": ("ES",), "OKP": ("EdDSA",)}
    family = families.get(key.key_type or "", ())
    return any(alg.startswith(prefix) for prefix in family)


def validate(token: str, header: Header, key: jwt.PyJWK, expected: Expected) -> dict[str, Any]:
    """The token's claims once signature, issuer, audience, times and nonce all check out."""
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key=key.key,
            algorithms=[header.alg],
            options={
                "verify_signature": True,
                "verify_aud": False,
                "verify_iss": False,
                "verify_exp": False,
                "verify_iat": False,
                "verify_nbf": False,
            },
        )
    except jwt.InvalidSignatureError:
        raise TokenRejected("the ID token's signature does not verify") from None
    except jwt.DecodeError as exc:
        if "payload" in str(exc).lower() or "json" in str(exc).lower():
            raise TokenRejected("the ID token's claims are not a JSON object") from None
        raise TokenRejected("the ID token cannot be decoded") from None
    except jwt.PyJWTError:
        raise TokenRejected("the ID token cannot be verified with the IdP's key") from None
    if not isinstance(claims, dict):
        raise TokenRejected("the ID token's claims are not a JSON object")
    check_claims(claims, expected)
    return claims


def check_claims(claims: Mapping[str, Any], expected: Expected) -> None:
    """Issuer, audience, authorized party, expiry, issue time, nonce and subject."""
    if claims.get("iss") != expected.issuer:
        raise TokenRejected("the ID token was issued by another issuer than the configured IdP")
    aud = claims.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud
    if not isinstance(audiences, list) or not all(isinstance(a, str) for a in audiences):
        raise TokenRejected("the ID token has no audience")
    if expected.client_id not in audiences:
        raise TokenRejected("the ID token is meant for another client (audience)")
    azp = claims.get("azp")
    if (len(audiences) > 1 or azp is not None) and azp != expected.client_id:
        raise TokenRejected("the ID token's authorized party is another client")
    exp, iat, nbf = _time(claims, "exp"), _time(claims, "iat"), _time(claims, "nbf")
    if exp is None:
        raise TokenRejected("the ID token has no expiry time")
    if iat is None:
        raise TokenRejected("the ID token has no issue time")
    if expected.now > exp + expected.clock_skew:
        raise TokenRejected("the ID token has expired")
    if iat > expected.now + expected.clock_skew:
        raise TokenRejected("the ID token was issued in the future (check the clocks)")
    if nbf is not None and nbf > expected.now + expected.clock_skew:
        raise TokenRejected("the ID token is not valid yet")
    if "nbf" in claims and nbf is None:
        raise TokenRejected("the ID token's not-before time is not a number")
    nonce = claims.get("nonce")
    if not isinstance(nonce, str) or not hmac.compare_digest(
        nonce.encode(), expected.nonce.encode()
    ):
        raise TokenRejected("the ID token's nonce is not the one this login sent")
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise TokenRejected("the ID token has no subject")


def _time(claims: Mapping[str, Any], name: str) -> float | None:
    """A NumericDate claim as a float, None when absent or not a number."""
    v = claims.get(name)
    if isinstance(v, int | float) and not isinstance(v, bool):
        return float(v)
    return None
