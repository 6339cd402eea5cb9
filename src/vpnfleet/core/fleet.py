"""The agent's replica of the control plane's state, kept current from the watch stream.

Pure: `FleetView.apply(event)` updates the view and returns what the agent must look at (whose
clients to re-judge, which sessions were marked to end, whether the firewall or CRL needs
work). Whether a client must go, and why, is decided in one place only:
`core.sessionbook.SessionBook.violations`, against the view. The agent does the I/O.
Events are typed (vpnfleet.wire): a malformed one never gets here, so nothing is guessed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vpnfleet.wire import (
    ChangeEvent,
    CrlUpsert,
    GroupDelete,
    GroupState,
    GroupUpsert,
    LiveSession,
    MembershipDelete,
    MembershipUpsert,
    PkiUpsert,
    PodState,
    PodUpsert,
    PoolState,
    PoolUpsert,
    RuleDelete,
    RuleState,
    RuleUpsert,
    SessionDelete,
    SessionUpsert,
    Snapshot,
    UserDelete,
    UserState,
    UserUpsert,
)


@dataclass
class Effects:
    """What an applied change asks the agent to look at."""

    users: set[str] = field(default_factory=set)  # users whose clients must be re-judged
    sessions: set[str] = field(default_factory=set)  # session uids marked to end
    dataplane: bool = False
    crl: bool = False


@dataclass
class FleetView:
    """Users, groups, rules, pools, pods and live sessions as of `revision`."""

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

    def killed(self) -> dict[str, str]:
        """Session uid -> reason for every session the control plane asks to end.

        An agent that was away when a kill was asked for learns it here, from its snapshot.
        """
        return {uid: s.kill for uid, s in self.sessions.items() if s.kill is not None}

    def apply(self, event: ChangeEvent) -> Effects:
        """Apply one change event; events the view already contains are skipped."""
        effects = Effects()
        if event.revision <= self.revision:
            # Already part of this view: after a resync the stream replays events the new
            # snapshot contains, and re-applying them would pass through old states (a user
            # disabled then re-enabled would be kicked again).
            return effects
        if isinstance(event, UserUpsert):
            effects = self._upsert_user(event.object)
        elif isinstance(event, UserDelete):
            self.users.pop(event.key.name, None)
            effects.users.add(event.key.name)
            effects.dataplane = True
        elif isinstance(event, GroupUpsert):
            self.groups[event.object.id] = event.object
            effects.dataplane = True
        elif isinstance(event, GroupDelete):
            gone = event.key
            self.groups.pop(gone.id, None)
            self.rules = {k: r for k, r in self.rules.items() if r.group_id != gone.id}
            for user in [u for u in self.users.values() if gone.name in u.groups]:
                self._set_groups(user, [g for g in user.groups if g != gone.name])
            effects.dataplane = True
        elif isinstance(event, MembershipUpsert | MembershipDelete):
            m = event.object if isinstance(event, MembershipUpsert) else event.key
            member = self.users.get(m.user)
            if member is not None:
                others = [g for g in member.groups if g != m.group]
                self._set_groups(member, [*others, m.group] if event.op == "upsert" else others)
            effects.dataplane = True
        elif isinstance(event, RuleUpsert):
            self.rules[event.object.id] = event.object
            effects.dataplane = True
        elif isinstance(event, RuleDelete):
            self.rules.pop(event.key.id, None)
            effects.dataplane = True
        elif isinstance(event, PoolUpsert):
            self.pools[event.object.id] = event.object
        elif isinstance(event, PodUpsert):
            self.pods[event.object.name] = event.object
        elif isinstance(event, SessionUpsert):
            session = event.object
            self.sessions[session.uid] = session
            if session.kill is not None:
                effects.sessions.add(session.uid)
        elif isinstance(event, SessionDelete):
            self.sessions.pop(event.key.uid, None)
        elif isinstance(event, CrlUpsert | PkiUpsert):
            effects.crl = True
        self.revision = event.revision
        return effects

    def _set_groups(self, user: UserState, groups: list[str]) -> None:
        # The control plane lists a user's groups sorted by name; keep the same order so a
        # membership event and the user upsert that follows it agree.
        self.users[user.name] = user.model_copy(update={"groups": sorted(set(groups))})

    def _upsert_user(self, new: UserState) -> Effects:
        old = self.users.get(new.name)
        self.users[new.name] = new
        # Enabled, certificate, mode or lease may have changed: the agent re-judges the user's
        # clients (SessionBook.violations says whether one must go, and why).
        effects = Effects(users={new.name})
        if old is not None and (
            old.cert_serial != new.cert_serial or old.device_serials != new.device_serials
        ):
            effects.crl = True  # a replaced certificate was revoked: OpenVPN's CRL copy too
        if old is None or old.groups != new.groups:
            effects.dataplane = True
        return effects
