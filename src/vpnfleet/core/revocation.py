"""Which open connections must go when access shrinks. Pure: no I/O.

New rules only judge new flows: a connection opened while a grant held stays ESTABLISHED in
conntrack after the grant is gone. So revoking access also deletes conntrack entries, after
the new policy is in place (the next packet of a cut flow is then judged as NEW). Two ways
to know what to delete:

- from a change of state (:func:`revoked_flows`, part of every
  :func:`~vpnfleet.core.fwdiff.diff`): per client, "all its flows" (it disconnected) or "its
  flows matching this grant" (it lost the grant). The runner lists matching entries and
  re-checks each with :func:`~vpnfleet.core.fwstate.is_allowed` before deleting it;
- from a list of open flows and one state, with no old state to compare (an agent restart,
  a periodic reconcile): :func:`flows_to_cut`. The list comes from ``conntrack -L``
  (:func:`~vpnfleet.core.fwkernel.parse_conntrack`) or from the flow tracker's index
  (:meth:`~vpnfleet.core.flowtracker.FlowTracker.open_flows`).

A :class:`Flow` carries a whole original-direction tuple, so a TCP or UDP entry can be deleted
exactly (:func:`~vpnfleet.core.ctnetlink.encode_ct_delete`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from vpnfleet.core.fwstate import DesiredState, is_allowed
from vpnfleet.core.grants import Grant


@dataclass(frozen=True)
class Flow:
    """A conntrack entry's original-direction tuple.

    ``proto`` is the protocol name as conntrack prints it (``tcp``, ``udp``, ``icmp``, or the
    number for others), ``protonum`` its number. Ports are None for protocols without them
    (ICMP keeps an echo id instead, which no decision here uses).
    """

    proto: str
    protonum: int
    src: IPv4Address
    dst: IPv4Address
    sport: int | None
    dport: int | None


@dataclass(frozen=True)
class RevokedFlow:
    """A client lost access: its open flows matching ``grant`` (None: all of them) must go."""

    client: IPv4Address
    grant: Grant | None


_ANY = Grant(IPv4Network("0.0.0.0/0"), "any")


def revoked_flows(old: DesiredState, new: DesiredState) -> list[RevokedFlow]:
    """Flows that were allowed under ``old`` and may not be under ``new``.

    A grant counts as revoked for a client unless one grant the client holds in ``new``
    covers it alone; the runner re-checks each open flow with :func:`is_allowed` before
    deleting it, so overlap across several grants never kills a flow that is still allowed.
    Only clients that left a group, or belong to a group that lost a grant, are examined
    (connecting, joining a group or gaining a grant cannot revoke anything); leaving
    allow_all examines every client.
    """
    return _revoked_flows(old, new, None, {})


def _revoked_flows(
    old: DesiredState,
    new: DesiredState,
    gone: frozenset[IPv4Address] | None,
    left: Mapping[int, frozenset[IPv4Address]],
) -> list[RevokedFlow]:
    # :func:`revoked_flows` for fwdiff.diff(), which has already computed ``gone`` (clients
    # that disconnected) and ``left`` (per group, members that left it): set differences of
    # unshared addresses cost __eq__ calls, so they are not taken twice.
    if gone is None:
        gone = old.all_clients - new.all_clients
    out = [RevokedFlow(c, None) for c in sorted(gone)]
    if new.allow_all:
        return out
    old_groups, new_groups = old.groups_by_id, new.groups_by_id
    # Per group: the grants a member loses by staying in it (all of them if it is gone).
    dropped: dict[int, frozenset[Grant]] = {}
    touched: list[frozenset[IPv4Address]] = []  # clients that may have lost something
    for gid, og in old_groups.items():
        ng = new_groups.get(gid)
        if ng is og:
            continue
        if ng is None:
            dropped[gid] = og.grant_set
            touched.append(og.members)
            continue
        if ng.grants != og.grants:
            removed = og.grant_set - ng.grant_set
            if removed:
                dropped[gid] = removed
                touched.append(og.members)
                continue
        if ng.members is not og.members:
            known = left.get(gid)
            touched.append(og.members - ng.members if known is None else known)
    if old.allow_all:
        candidates = old.all_clients & new.all_clients
    else:
        candidates = frozenset[IPv4Address]().union(*touched) & new.all_clients
    if not candidates:
        return out
    was = {} if old.allow_all else _memberships(old, candidates)
    now = _memberships(new, candidates)
    none: tuple[int, ...] = ()
    for client in sorted(candidates):
        now_ids = now.get(client, none)
        if old.allow_all:
            lost = frozenset({_ANY})
        else:
            # A group left takes all its grants; a group kept takes the grants it dropped.
            lost = frozenset[Grant]().union(
                *(
                    old_groups[gid].grant_set if gid not in now_ids else dropped[gid]
                    for gid in was.get(client, none)
                    if gid not in now_ids or gid in dropped
                )
            )
            if not lost:
                continue
        after_groups = [new_groups[gid] for gid in now_ids]
        kept = frozenset[Grant]().union(*(g.grant_set for g in after_groups))
        for g in sorted(lost - kept, key=Grant.sort_key):
            if not any(ag.covers(g) for ag in after_groups):
                out.append(RevokedFlow(client, g))
    return out


def _memberships(
    state: DesiredState, clients: frozenset[IPv4Address]
) -> dict[IPv4Address, tuple[int, ...]]:
    """Group ids of each of ``clients`` (only clients in at least one group appear)."""
    out: dict[IPv4Address, tuple[int, ...]] = {}
    for g in state.groups:
        # Both walk the smaller set with its stored hashes: cheap for few clients.
        if not g.members.isdisjoint(clients):
            for c in g.members & clients:
                out[c] = (*out.get(c, ()), g.group_id)
    return out


def flows_to_cut(state: DesiredState, flows: Iterable[Flow]) -> list[Flow]:
    """Open flows that ``state`` would not allow to start now.

    From a tunnel address: the source must be a connected client allowed to reach the
    destination. From elsewhere to a tunnel address: only gateway clients may be reached.
    Flows between two outside addresses are not ours. A client's flow to the pod itself is
    judged like forwarded traffic; cutting it is harmless, since local traffic is not
    filtered here and its next packet simply starts a new entry.
    """
    out: list[Flow] = []
    for f in flows:
        from_tun = any(f.src in n for n in state.tunnel_networks)
        to_tun = any(f.dst in n for n in state.tunnel_networks)
        if from_tun:
            if not is_allowed(state, f.src, f.proto, f.dst, f.dport):
                out.append(f)
        elif to_tun and (f.dst not in state.all_clients or f.dst in state.nat_members):
            out.append(f)
    return out
