"""How many ipset elements the pod firewall needs for the groups' grants, and the limit. Pure.

Every pod loads every group (:mod:`vpnfleet.core.fwdesired` builds sets for all groups in the
fleet view, whether or not a member is connected there), so the figure that matters is the
sum over all groups: it is what each pod's ``ipset restore`` holds and, on a resync (agent
start, drift repair), renders and loads at once. The count is the renderer's own: the set a
grant lands in comes from :func:`~vpnfleet.core.fwrender.destination_kind`, its networks
from :func:`~vpnfleet.core.fwrender.net_elements`, and elements the renderer would merge
(the same network and port from two grants) are counted once. Port ranges are summed as
merged intervals instead of being expanded: checking costs per grant, not per element.

Why a limit at all: a ``hash:net,port`` set has no port wildcard, so ``tcp 2-65535`` on one
network is 65,534 elements. Measured on the shared 2-core lab machine (kernel 6.18, ipset
7.17), 1 million elements took the agent about 7 s and 460 MB to render and 1.1 million took
``ipset restore`` about 11 s to load (33 MB of kernel memory): every pod pays that at each
start. The control plane refuses writes past :data:`MAX_FIREWALL_ELEMENTS`; an agent given
such a state anyway (data written before the check existed) enforces the other groups and
denies the largest ones (:func:`groups_to_deny`) instead of failing the whole apply.

Group members (``hash:ip``) and the fixed sets are not counted: they hold connected clients,
bounded by the address pools, not by what an operator writes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from vpnfleet.core.fwrender import destination_kind, net_elements
from vpnfleet.core.grants import Grant, grants_of

MAX_FIREWALL_ELEMENTS = 1 << 20
"""Destination-set elements of all groups together, on every pod (1,048,576)."""

ADVICE = "grant all ports (one element per network) or narrow the port ranges or destinations"


def group_elements(grants: Iterable[Grant]) -> int:
    """Exactly how many elements the renderer puts into a group's five destination sets."""
    plain: set[tuple[str, str]] = set()
    ranges: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for g in grants:
        kind = destination_kind(g)
        for net in net_elements(g.network):
            if kind != "d":
                plain.add((kind, net))
            else:
                assert g.port_lo is not None and g.port_hi is not None
                ranges.setdefault((net, g.proto), []).append((g.port_lo, g.port_hi))
    return len(plain) + sum(_covered(spans) for spans in ranges.values())


def _covered(spans: list[tuple[int, int]]) -> int:
    # Ports covered by the union of inclusive ranges.
    total, end = 0, -1
    for lo, hi in sorted(spans):
        if hi > end:
            total += hi - max(lo, end + 1) + 1
            end = hi
    return total


StoredRule = tuple[str, str, str | None]
"""A rule as stored and sent to agents: (destination, proto, ports)."""


def rules_elements(rules: Iterable[StoredRule]) -> int:
    """:func:`group_elements` of a group's rules as stored."""
    return group_elements(g for d, p, ports in rules for g in grants_of(d, p, ports))


class GroupSizes:
    """Counts groups' elements, remembering each group's count by its rules' content, so a
    write or a view change recounts only the groups it touched (parsing 10,000 rules takes
    about half a second; a lookup per group is microseconds).

    Whoever checks repeatedly owns one (the agent's desired-state builder, the control
    plane's rule service). It is trimmed to the last call's groups when it grows past a few
    times their number. A cache only: the counts are :func:`rules_elements`'s.
    """

    def __init__(self) -> None:
        self._known: dict[frozenset[StoredRule], int] = {}

    def count(self, groups: Mapping[str, Iterable[StoredRule]]) -> dict[str, int]:
        """Group name -> elements."""
        known = self._known
        used: dict[frozenset[StoredRule], int] = {}
        out: dict[str, int] = {}
        for name, rules in groups.items():
            # Identical rules yield identical elements: a set of them counts the same.
            key = frozenset(rules)
            n = known.get(key)
            if n is None:
                n = known[key] = rules_elements(key)
            out[name] = used[key] = n
        if len(known) > 4 * len(used) + 1024:
            self._known = used
        return out


@dataclass(frozen=True)
class Overflow:
    """A change that would put the pods' firewall over the limit, told from one group."""

    group: str
    elements: int  # the group's own
    total: int  # all groups together
    limit: int = MAX_FIREWALL_ELEMENTS

    def message(self) -> str:
        """One sentence naming the group, the sizes and the way out."""
        others = "" if self.total == self.elements else f", {self.total:,} with all other groups"
        return (
            f"group {self.group!r} would need {self.elements:,} firewall set elements{others} "
            f"(limit {self.limit:,} on every pod): {ADVICE}"
        )


def check(
    sizes: Mapping[str, int],
    changed: Iterable[str],
    *,
    before: int | None = None,
    limit: int = MAX_FIREWALL_ELEMENTS,
) -> Overflow | None:
    """None when the groups' ``sizes`` after a write (name -> :func:`group_elements`) fit,
    else an Overflow naming the largest of the ``changed`` groups (all groups if none of them
    is known).

    ``before``: the total before the write. A write that does not grow it is let through even
    over the limit, so that data stored before the limit existed can still be reduced.
    """
    total = sum(sizes.values())
    if total <= limit or (before is not None and total <= before):
        return None
    named = [g for g in changed if g in sizes] or list(sizes)
    group = max(named, key=lambda g: (sizes[g], g))
    return Overflow(group, sizes[group], total, limit)


def groups_to_deny(sizes: Mapping[str, int], limit: int = MAX_FIREWALL_ELEMENTS) -> list[str]:
    """The groups an agent leaves without grants so that the rest fits: the largest first
    (ties by name), as few as needed. Empty when everything fits."""
    total = sum(sizes.values())
    out: list[str] = []
    for name in sorted(sizes, key=lambda g: (-sizes[g], g)):
        if total <= limit:
            break
        out.append(name)
        total -= sizes[name]
    return out
