"""Console passwords: scrypt hashes and what a new password must be.

Operators' console passwords are typed by people, so unlike API tokens they are guarded by a
slow, memory-hard KDF: scrypt (RFC 7914) from the standard library, N=2^15, r=8, p=1 (32 MiB
and about 50-100 ms a check here), with a 16-byte random salt. The stored form names its
parameters, ``scrypt$N$r$p$salt$hash`` (salt and hash base64url), so they can be raised later
and old hashes still verify (`needs_rehash` tells the caller when to store a fresh one).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass

N = 2**15
R = 8
P = 1
SALT_BYTES = 16
HASH_BYTES = 32
MIN_LENGTH = 12
MAX_LENGTH = 1024  # a KDF input, bounded so a huge "password" costs nothing extra
MIN_DISTINCT = 5
_MAX_N = 2**20  # refuse stored parameters that would take seconds and gigabytes


@dataclass(frozen=True)
class _Stored:
    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _derive(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password.encode(), salt=salt, n=n, r=r, p=p, maxmem=256 * n * r, dklen=HASH_BYTES
    )


def weakness(password: str, name: str | None = None) -> str | None:
    """Why ``password`` may not be set (a phrase that never repeats it), or None."""
    if len(password) < MIN_LENGTH:
        return f"it has {len(password)} characters; at least {MIN_LENGTH} are needed"
    if len(password) > MAX_LENGTH:
        return f"it is longer than {MAX_LENGTH} characters"
    if len(set(password)) < MIN_DISTINCT:
        return f"it uses fewer than {MIN_DISTINCT} different characters"
    if name and name.lower() in password.lower():
        return "it contains the account's name"
    return None


def hash_password(password: str) -> str:
    """The stored form of a new password (check `weakness` first)."""
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _derive(password, salt, N, R, P)
    return f"scrypt${N}${R}${P}${_b64(salt)}${_b64(digest)}"


def _parse(stored: str) -> _Stored | None:
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        return None
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, digest = _unb64(parts[4]), _unb64(parts[5])
    except (ValueError, binascii.Error):
        return None
    if not (2 <= n <= _MAX_N and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16):
        return None
    return _Stored(n, r, p, salt, digest)


# A hash of nothing anyone knows: checked when the account does not exist, so that an unknown
# name takes as long as a wrong password (no account discovery by timing).
_DUMMY = hash_password(secrets.token_urlsafe(24))


def verify(password: str, stored: str | None) -> bool:
    """Does ``password`` match ``stored``? Always costs one KDF run, also for ``None``."""
    parsed = _parse(stored) if stored else None
    if parsed is None or len(password) > MAX_LENGTH:
        dummy = _parse(_DUMMY)
        assert dummy is not None
        _derive(password[:MAX_LENGTH], dummy.salt, dummy.n, dummy.r, dummy.p)
        return False
    digest = _derive(password, parsed.salt, parsed.n, parsed.r, parsed.p)
    return hmac.compare_digest(digest, parsed.digest)


def needs_rehash(stored: str) -> bool:
    """True when ``stored`` was made with other parameters than today's."""
    parsed = _parse(stored)
    return parsed is None or (parsed.n, parsed.r, parsed.p) != (N, R, P)
