"""Bearer tokens and roles."""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass
from typing import Literal

# "agent" is the enrollment role (the Secret every pod starts with): it may only enroll a pod
# name that no live pod holds. "pod" is one pod's own credential, made at enrollment and bound
# to that pod's name; only it may act as that pod. Neither is created by hand as "pod".
# "user": a VPN user on the console's self-service pages (audit rows only; never a token).
Role = Literal["admin", "operator", "auditor", "agent", "pod", "user"]
ROLES: tuple[Role, ...] = ("admin", "operator", "auditor", "agent", "pod")
TOKEN_ROLES: tuple[Role, ...] = ("admin", "operator", "auditor", "agent")
TOKEN_PREFIX = "vpf_"  # noqa: S105 - a marker, not a secret


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's name and role."""

    token_id: int
    name: str
    role: Role
    pod: str | None = None  # the pod a "pod" credential is bound to


def parse_role(text: str) -> Role:
    if text not in ROLES:
        raise ValueError(f"unknown role {text!r}: use one of {', '.join(ROLES)}")
    return text


def new_token() -> str:
    """A fresh secret token (shown to the creator once, then only its hash is kept)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    # Tokens carry 256 random bits, so a fast hash is enough; a slow KDF would only add latency.
    return hashlib.sha256(token.encode()).hexdigest()


def display_prefix(token: str) -> str:
    return token[: len(TOKEN_PREFIX) + 4]


def touch_due(last_used: dt.datetime | None, now: dt.datetime) -> bool:
    """Update last_used_at at most once a minute to keep reads cheap."""
    return last_used is None or (now - last_used) > dt.timedelta(minutes=1)
