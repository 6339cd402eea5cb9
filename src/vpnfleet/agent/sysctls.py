"""The kernel settings the pod needs: read first, written only where they differ, named if missing.

The agent needs forwarding and conntrack accounting/timestamps in its network namespace (flow
records need byte counters and start/stop times on every conntrack entry). In an unprivileged
container ``/proc/sys`` is read-only, as in a Kubernetes pod: there the settings are made by
whoever creates the pod (``securityContext.sysctls``, an init container, ``podman run
--sysctl``), and the agent only checks them. Where it may write (the lab's namespaces, a VM),
it sets the missing ones itself. Either way a setting that is still wrong afterwards stops the
agent with one :class:`SysctlsMissing` naming every such key, the value it needs and how to
set it, before it registers with the control plane.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

PROC_SYS = Path("/proc/sys")

SYSCTLS: tuple[tuple[str, str], ...] = (
    ("net.ipv4.ip_forward", "1"),
    # Flow records need byte counters and start/stop timestamps on every conntrack entry.
    ("net.netfilter.nf_conntrack_acct", "1"),
    ("net.netfilter.nf_conntrack_timestamp", "1"),
)


@dataclass(frozen=True)
class Shortfall:
    """A setting that is not what the agent needs."""

    key: str
    want: str
    have: str | None  # None: the key does not exist in this namespace


class SysctlsMissing(RuntimeError):
    """Settings the agent needs are wrong and it could not set them: one message for all."""

    def __init__(self, shortfalls: Sequence[Shortfall], reason: str = "") -> None:
        self.shortfalls = tuple(shortfalls)
        self.reason = reason
        super().__init__(explain(self.shortfalls, reason))


def explain(shortfalls: Sequence[Shortfall], reason: str = "") -> str:
    """One paragraph: every missing key with the value it needs, and the ways to set them."""
    parts = []
    for s in shortfalls:
        have = "absent" if s.have is None else f"is {s.have}"
        parts.append(f"{s.key}={s.want} ({have})")
    flags = " ".join(f"--sysctl {s.key}={s.want}" for s in shortfalls)
    why = f" ({reason})" if reason else ""
    text = (
        f"this pod's network namespace lacks kernel settings the agent needs and it could not "
        f"set them itself{why}: {', '.join(parts)}. Set them when the pod is created: "
        f"Kubernetes: the pod's securityContext.sysctls (the kubelet must allow them with "
        f"--allowed-unsafe-sysctls) or a privileged init container running "
        f"`sysctl -w {' '.join(f'{s.key}={s.want}' for s in shortfalls)}`; "
        f"podman/docker: `{flags}` (docs/kubernetes.md, the agent's sysctls)"
    )
    if any(s.have is None and s.key.startswith("net.netfilter.") for s in shortfalls):
        text += "; the net.netfilter keys exist once the node has the nf_conntrack module loaded"
    return text


def path_of(key: str, root: Path = PROC_SYS) -> Path:
    """``net.ipv4.ip_forward`` -> ``/proc/sys/net/ipv4/ip_forward``."""
    if "/" in key or not all(key.split(".")):
        raise ValueError(f"not a sysctl key: {key!r}")
    return root.joinpath(*key.split("."))


def read(key: str, root: Path = PROC_SYS) -> str | None:
    """The current value (whitespace-normalised), None if the key does not exist."""
    try:
        return " ".join(path_of(key, root).read_text().split())
    except FileNotFoundError:
        return None


def shortfalls(
    current: Mapping[str, str | None], wanted: Sequence[tuple[str, str]] = SYSCTLS
) -> list[Shortfall]:
    """The wanted settings whose current value differs, in ``wanted``'s order."""
    return [Shortfall(k, v, current.get(k)) for k, v in wanted if current.get(k) != v]


def _write_file(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, f"{value}\n".encode())
    finally:
        os.close(fd)


def ensure(
    root: Path = PROC_SYS,
    wanted: Sequence[tuple[str, str]] = SYSCTLS,
    *,
    write: Callable[[Path, str], None] = _write_file,
) -> list[str]:
    """Check ``wanted`` under ``root`` (this process's namespace) and write only the settings
    that differ. Returns the keys written; raises :class:`SysctlsMissing` naming every setting
    still wrong afterwards (a read-only ``/proc/sys``, no permission, a missing key)."""
    written: list[str] = []
    reasons: list[str] = []
    for s in shortfalls({k: read(k, root) for k, _ in wanted}, wanted):
        if s.have is None:
            continue
        try:
            write(path_of(s.key, root), s.want)
        except OSError as exc:
            reasons.append(f"writing {s.key}: {exc.strerror or exc}")
            continue
        written.append(s.key)
    left = shortfalls({k: read(k, root) for k, _ in wanted}, wanted)
    if left:
        raise SysctlsMissing(left, _first(reasons))
    return written


def _first(reasons: Sequence[str]) -> str:
    """The write failure that explains the others (they are nearly always the same)."""
    if not reasons:
        return ""
    more = f", and {len(reasons) - 1} more" if len(reasons) > 1 else ""
    return reasons[0] + more
