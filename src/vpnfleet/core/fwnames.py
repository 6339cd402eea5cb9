"""Names of the pod firewall's ipsets and chains, and the jumps into its chains. Pure: no I/O.

Every set and chain the agent owns carries a prefix (``P``, e.g. ``vpnf``; chains use it in
upper case), so several agents or a test can share a namespace and nothing foreign is ever
touched: the kernel readers (:mod:`vpnfleet.core.fwkernel`) keep only names that match
:func:`own_set_pattern`. What each set holds and why is described in
:mod:`vpnfleet.core.fwrender`.

ipset names are at most 31 characters: prefix (10) + ``-g`` + group id (10) + ``-m`` +
``.new`` (the twin a resync builds, :data:`TEMP_SUFFIX`) = 28.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Literal

MAX_PREFIX_LEN = 10
MAX_GROUP_ID = 2**31 - 1
TEMP_SUFFIX = ".new"

GroupSetKind = Literal["m", "d", "t", "u", "i", "n"]

_PREFIX_RE = re.compile(rf"^[a-z][a-z0-9]{{0,{MAX_PREFIX_LEN - 1}}}$")


def validate_prefix(prefix: str) -> str:
    """Return ``prefix`` if it is usable for set and chain names, else raise ValueError."""
    if not isinstance(prefix, str) or not _PREFIX_RE.match(prefix):
        raise ValueError(
            f"invalid dataplane prefix {prefix!r}: use 1-{MAX_PREFIX_LEN} lower-case letters "
            "or digits, starting with a letter (e.g. 'vpnf')"
        )
    return prefix


def tun_set(prefix: str) -> str:
    """Name of the set holding the tunnel networks."""
    return f"{prefix}-tun"


def clients_set(prefix: str) -> str:
    """Name of the set holding every connected client."""
    return f"{prefix}-clients"


def nat_set(prefix: str) -> str:
    """Name of the set holding connected NAT-mode clients."""
    return f"{prefix}-nat"


def group_set(prefix: str, group_id: int, kind: GroupSetKind) -> str:
    """Name of one of a group's sets (``m`` members, ``d``/``t``/``u``/``i``/``n`` targets)."""
    return f"{prefix}-g{group_id}-{kind}"


def fwd_chain(prefix: str) -> str:
    """Name of the agent's filter chain."""
    return f"{prefix.upper()}-FWD"


def post_chain(prefix: str) -> str:
    """Name of the agent's nat chain."""
    return f"{prefix.upper()}-POST"


@functools.lru_cache(maxsize=16)
def own_set_pattern(prefix: str) -> re.Pattern[str]:
    """Matches every set name this prefix may own, live or temporary (``<name>.new``)."""
    p = re.escape(prefix)
    temp = re.escape(TEMP_SUFFIX)
    return re.compile(rf"^{p}-(?:tun|clients|nat|g\d{{1,10}}-[mdtuin])(?:{temp})?$")


@dataclass(frozen=True)
class Jump:
    """A jump from a built-in chain to one of the agent's chains."""

    table: Literal["filter", "nat"]
    chain: str
    target: str

    @property
    def rule(self) -> str:
        """The rule as ``iptables -S`` prints it."""
        return f"-A {self.chain} -j {self.target}"


def jumps(prefix: str) -> tuple[Jump, Jump]:
    """The two jumps the layout needs."""
    return (
        Jump("filter", "FORWARD", fwd_chain(prefix)),
        Jump("nat", "POSTROUTING", post_chain(prefix)),
    )
