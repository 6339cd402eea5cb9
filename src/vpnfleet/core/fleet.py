"""The agent's replica of the control plane's state, kept current from the watch stream.

Pure: `FleetView.apply(event)` updates the view and returns what the agent must act on
(whom to disconnect, whether the firewall or CRL needs work). The agent does the I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vpnfleet.wire import (
    GroupState,
    LiveSession,
    PodState,
    PoolState,
    RuleState,
    Snapshot,
    UserState,
)


@dataclass
class Effects:
    """What an applied change asks the agent to do."""

    kick: dict[str, str] = field(default_factory=dict)  # user name -> reason
    kick_sessions: dict[str, str] = field(default_factory=dict)  # session uid -> reason
    dataplane: bool = False
    crl: bool = False
    resync: bool = False

    def merge(self, other: Effects) -> None:
        self.kick.update(other.kick)
        self.kick_sessions.update(other.kick_sessions)
        self.dataplane |= other.dataplane
        self.crl |= other.crl
        self.resync |= other.resync


@dataclass
class FleetView:
    """Users, groups, rules, pools and live sessions as of `revision`."""

    revision: int = 0
    users: dict[str, UserState] = field(default_factory=dict)
    groups: dict[int, GroupState] = field(default_factory=dict)
    rules: dict[int, RuleState] = field(default_factory=dict)
    pools: dict[int, PoolState] = field(default_factory=dict)
    sessions: dict[str, LiveSession] = field(default_factory=dict)
    pods: dict[str, PodState] = field(default_factory=dict)

    @classmethod
    def from_snapshot(cls, snap: Snapshot) -> FleetView:
        return cls(
            revision=snap.revision,
            users={u.name: u for u in snap.users},
            groups={g.id: g for g in snap.groups},
            rules={r.id: r for r in snap.rules},
            pools={p.id: p for p in snap.pools},
            sessions={s.uid: s for s in snap.sessions},
            pods={p.name: p for p in snap.pods},
        )

    def to_snapshot(self) -> Snapshot:
        return Snapshot(
            revision=self.revision,
            users=list(self.users.values()),
            groups=list(self.groups.values()),
            rules=list(self.rules.values()),
            pools=list(self.pools.values()),
            sessions=list(self.sessions.values()),
            pods=list(self.pods.values()),
        )

    def user_by_id(self, user_id: int) -> UserState | None:
        for user in self.users.values():
            if user.id == user_id:
                return user
        return None

    def live_sessions_of(self, user: str) -> int:
        return sum(1 for s in self.sessions.values() if s.user == user)

    def apply(self, event: dict[str, Any]) -> Effects:
        """Apply one watch event (type `change`); unknown kinds are ignored, not fatal."""
        effects = Effects()
        rev = event.get("revision")
        if isinstance(rev, int) and rev <= self.revision:
            # Already part of this view: after a resync the stream replays events the new
            # snapshot contains, and re-applying them would pass through old states (a user
            # disabled then re-enabled would be kicked again).
            return effects
        kind, op, data = event.get("kind"), event.get("op"), event.get("data") or {}
        obj_id = event.get("id")
        if kind == "user":
            effects.merge(self._apply_user(op, obj_id, data))
        elif kind == "group":
            if op == "delete" and isinstance(obj_id, int):
                self.groups.pop(obj_id, None)
                self.rules = {k: r for k, r in self.rules.items() if r.group_id != obj_id}
            elif isinstance(obj_id, int):
                self.groups[obj_id] = GroupState(id=obj_id, name=str(data.get("name")))
            effects.dataplane = True
        elif kind == "rule" and isinstance(obj_id, int):
            if op == "delete":
                self.rules.pop(obj_id, None)
            else:
                self.rules[obj_id] = RuleState(
                    id=obj_id,
                    group_id=int(data["group_id"]),
                    destination=str(data["destination"]),
                    proto=str(data["proto"]),
                    ports=data.get("ports"),
                )
            effects.dataplane = True
        elif kind == "membership":
            effects.dataplane = True  # the user event that follows carries the new groups
        elif kind == "pool" and isinstance(obj_id, int):
            self.pools[obj_id] = PoolState(
                id=obj_id, name=str(data["name"]), kind=str(data["kind"]), cidr=str(data["cidr"])
            )
        elif kind == "session":
            uid = str(data.get("uid", ""))
            if op == "delete":
                self.sessions.pop(uid, None)
            elif uid:
                self.sessions[uid] = LiveSession(
                    uid=uid,
                    user=str(data["user"]),
                    pod=str(data["pod"]),
                    tunnel_ip=str(data["tunnel_ip"]),
                    mode=str(data["mode"]),
                    real_ip=data.get("real_ip"),
                )
        elif kind == "pod" and isinstance(obj_id, int):
            pod_name = str(data.get("name", ""))
            self.pods[pod_name] = PodState(id=obj_id, name=pod_name, pod_ip=data.get("pod_ip"))
        elif kind == "kill":
            name, uids = data.get("user"), data.get("sessions")
            if isinstance(uids, list) and uids:
                # Only the sessions live when the kill was asked for, not newer ones.
                for uid in uids:
                    effects.kick_sessions[str(uid)] = "disconnected by the control plane"
            elif isinstance(name, str):
                effects.kick[name] = "disconnected by an administrator"
        elif kind in ("crl", "pki"):
            effects.crl = True
        if isinstance(rev, int):
            self.revision = rev
        return effects

    def _apply_user(self, op: Any, obj_id: Any, data: dict[str, Any]) -> Effects:
        effects = Effects()
        name = str(data.get("name", ""))
        old = self.users.get(name)
        if op == "delete":
            self.users.pop(name, None)
            effects.kick[name] = "account deleted"
            effects.dataplane = True
            return effects
        new = UserState(
            id=int(obj_id) if isinstance(obj_id, int) else (old.id if old else 0),
            name=name,
            enabled=bool(data.get("enabled", True)),
            mode=str(data.get("mode", "nat")),
            max_sessions=int(data.get("max_sessions", 1)),
            groups=list(data.get("groups") or []),
            gateway_address=data.get("gateway_address"),
            cert_serial=data.get("cert_serial"),
        )
        self.users[name] = new
        if not new.enabled:
            effects.kick[name] = "account disabled"
        elif old is not None and old.cert_serial != new.cert_serial:
            effects.kick[name] = "certificate revoked or replaced"
            effects.crl = True
        elif old is not None and (
            old.mode != new.mode or old.gateway_address != new.gateway_address
        ):
            # The tunnel address depends on the mode: reconnect to get the new one.
            effects.kick[name] = "connection mode changed"
        if old is None or old.groups != new.groups:
            effects.dataplane = True
        return effects
