"""Is an operator-supplied secret strong enough to guard the fleet?

A bootstrap admin token, the key-sealing secret or a metrics token set by hand can be anything,
including `x`. We cannot measure how a value was made, so we ask for what a generator gives and
a person typing does not: at least 128 bits judged by the alphabet the value uses (4 bits a
character for hex, 6 for base64 / URL-safe base64, log2(95) for other printable ASCII, so 32
hex, 22 base64 or 20 mixed characters at least) and at least 8 different characters (which
refuses `aaaa...` and `abab...` of any length). A ``vpf_`` token prefix counts for nothing.

Made with ``python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`` or
``openssl rand -hex 32`` a value passes; the check never prints the value it refuses.
"""

from __future__ import annotations

import math
import string

MIN_BITS = 128
MIN_DISTINCT = 8
TOKEN_PREFIX = "vpf_"  # noqa: S105 - the marker of vpnfleet tokens, not a secret
GENERATE_HINT = (
    "generate one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))' "
    "(or: openssl rand -hex 32)"
)

_HEX = frozenset(string.hexdigits)
_BASE64 = frozenset(string.ascii_letters + string.digits + "+/-_")
_PRINTABLE = frozenset(chr(c) for c in range(0x21, 0x7F))


def bits_per_char(body: str) -> float:
    """Bits a character of ``body`` can carry, from the smallest usual alphabet holding it."""
    chars = set(body)
    if chars <= _HEX:
        return 4.0
    if chars <= _BASE64:
        return 6.0
    return math.log2(len(_PRINTABLE))


def weakness(secret: str) -> str | None:
    """Why ``secret`` is too weak (a phrase without the value), or None when it is fine."""
    body = secret.removeprefix(TOKEN_PREFIX).rstrip("=")  # base64 padding carries nothing
    if not body:
        return "it is empty"
    if any(c not in _PRINTABLE for c in body):
        return "it contains spaces or characters outside printable ASCII"
    bits = len(body) * bits_per_char(body)
    if bits < MIN_BITS:
        return (
            f"its {len(body)} characters carry at most {int(bits)} bits; {MIN_BITS} are needed "
            "(32 hex or 22 base64 characters)"
        )
    if len(set(body)) < MIN_DISTINCT:
        return f"it uses fewer than {MIN_DISTINCT} different characters"
    return None


def require_strong(secret: str, source: str) -> None:
    """Raise ValueError naming ``source`` (a flag or variable) when ``secret`` is weak."""
    reason = weakness(secret)
    if reason is not None:
        raise ValueError(f"{source} is too weak: {reason}; {GENERATE_HINT}")
