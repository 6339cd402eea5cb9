"""What the kernel reports about the pod firewall, read from its own text output, and how it
differs from the desired state (drift). Pure: no I/O (``vpnfleet.agent.dataplane`` runs
``ipset save``, ``iptables -S`` and ``conntrack -L`` and hands the text over).

Only what carries our prefix is kept (:func:`~vpnfleet.core.fwnames.own_set_pattern`, our
chain names and the jumps to them): other software's sets and rules in the same namespace
are never read into a :class:`KernelState`, so nothing derived from one can touch them.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Literal

from vpnfleet.core.fwnames import Jump, fwd_chain, jumps, own_set_pattern, post_chain
from vpnfleet.core.fwrender import DEFAULT_MAXELEM, desired_sets, expected_rules, sort_elements
from vpnfleet.core.fwstate import DesiredState
from vpnfleet.core.revocation import Flow


@dataclass(frozen=True)
class KernelSet:
    """An ipset as the kernel reports it."""

    name: str
    type: str
    maxelem: int
    elements: frozenset[str]


@dataclass(frozen=True)
class KernelState:
    """The parts of the kernel's netfilter state that carry this prefix."""

    prefix: str
    sets: Mapping[str, KernelSet] = field(default_factory=dict)
    # (table, chain) -> rules as printed; a chain present with no rules maps to ().
    chains: Mapping[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)
    jumps: Mapping[Jump, int] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        """True when nothing of ours is in the kernel."""
        return not self.sets and not self.chains and not any(self.jumps.values())


def parse_ipset_save(text: str, prefix: str) -> dict[str, KernelSet]:
    """Parse ``ipset save`` output, keeping only this prefix's sets."""
    own = own_set_pattern(prefix)
    meta: dict[str, tuple[str, int]] = {}
    elements: dict[str, set[str]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3 or not own.match(parts[1]):
            continue
        if parts[0] == "create":
            maxelem = DEFAULT_MAXELEM
            if "maxelem" in parts:
                maxelem = int(parts[parts.index("maxelem") + 1])
            meta[parts[1]] = (parts[2], maxelem)
            elements.setdefault(parts[1], set())
        elif parts[0] == "add":
            elements.setdefault(parts[1], set()).add(parts[2])
    return {
        name: KernelSet(name, typ, maxelem, frozenset(elements.get(name, ())))
        for name, (typ, maxelem) in meta.items()
    }


def parse_iptables_s(
    text: str, table: Literal["filter", "nat"], prefix: str
) -> tuple[dict[tuple[str, str], tuple[str, ...]], dict[Jump, int]]:
    """Parse ``iptables -t TABLE -S`` output: our chains' rules and our jumps' counts."""
    ours = fwd_chain(prefix) if table == "filter" else post_chain(prefix)
    jump = next(j for j in jumps(prefix) if j.table == table)
    rules: list[str] | None = None
    count = 0
    for line in text.splitlines():
        line = line.strip()
        if line == f"-N {ours}":
            rules = rules if rules is not None else []
        elif line.startswith(f"-A {ours} "):
            rules = rules if rules is not None else []
            rules.append(line)
        elif line == jump.rule:
            count += 1
    chains: dict[tuple[str, str], tuple[str, ...]] = {}
    if rules is not None:
        chains[(table, ours)] = tuple(rules)
    return chains, {jump: count}


def parse_conntrack(text: str) -> list[Flow]:
    """Parse ``conntrack -L`` output (IPv4, default format) into original-direction tuples."""
    flows: list[Flow] = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3 or not parts[1].isdigit():
            continue
        first: dict[str, str] = {}
        for token in parts[2:]:
            key, sep, value = token.partition("=")
            if sep and key not in first:
                first[key] = value
        if "src" not in first or "dst" not in first:
            continue
        try:
            flows.append(
                Flow(
                    proto=parts[0],
                    protonum=int(parts[1]),
                    src=IPv4Address(first["src"]),
                    dst=IPv4Address(first["dst"]),
                    sport=int(first["sport"]) if "sport" in first else None,
                    dport=int(first["dport"]) if "dport" in first else None,
                )
            )
        except ValueError:
            continue  # IPv6 or malformed: not ours
    return flows


def drift(state: DesiredState, kernel: KernelState, sample: int = 3) -> list[str]:
    """Human-readable differences between the kernel and the desired state (empty: in sync)."""
    out: list[str] = []
    specs = desired_sets(state)
    for name, spec in specs.items():
        ks = kernel.sets.get(name)
        if ks is None:
            out.append(f"ipset {name} is missing")
            continue
        if ks.type != spec.type:
            out.append(f"ipset {name} has type {ks.type}, expected {spec.type}")
            continue
        missing = spec.elements - ks.elements
        extra = ks.elements - spec.elements
        if missing:
            out.append(f"ipset {name} lacks {len(missing)} element(s): {_sample(missing, sample)}")
        if extra:
            out.append(
                f"ipset {name} has {len(extra)} unexpected element(s): {_sample(extra, sample)}"
            )
    for name in sorted(kernel.sets):
        if name not in specs:
            out.append(f"ipset {name} is stale (not in the desired state)")
    for (table, chain), want in expected_rules(state).items():
        have = kernel.chains.get((table, chain))
        if have is None:
            out.append(f"chain {chain} is missing from table {table}")
            continue
        if list(have) == list(want):
            continue
        missing_rules = [r for r in want if r not in have]
        extra_rules = [r for r in have if r not in want]
        out += [f"chain {chain} lacks rule: {r}" for r in missing_rules]
        out += [f"chain {chain} has unexpected rule: {r}" for r in extra_rules]
        if not missing_rules and not extra_rules:
            out.append(f"chain {chain} has its rules out of order")
    for jump in jumps(state.prefix):
        n = kernel.jumps.get(jump, 0)
        if n == 0:
            out.append(f"jump {jump.chain} -> {jump.target} ({jump.table}) is missing")
        elif n > 1:
            out.append(f"jump {jump.chain} -> {jump.target} ({jump.table}) appears {n} times")
    return out


def _sample(elements: Collection[str], n: int) -> str:
    items = sort_elements(elements)
    text = ", ".join(items[:n])
    return text + (", ..." if len(items) > n else "")
