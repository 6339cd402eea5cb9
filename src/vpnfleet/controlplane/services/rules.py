"""Access rules (grants): members of a group may reach a destination over a protocol/ports."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from vpnfleet.controlplane import changelog, fleetstate
from vpnfleet.controlplane.errors import Problem, conflict, not_found
from vpnfleet.controlplane.models import Group, Rule
from vpnfleet.controlplane.schemas import RuleOut
from vpnfleet.controlplane.services.journal import AuditView, Journal
from vpnfleet.controlplane.state import jsonable
from vpnfleet.core import fwlimits, netparse


def get_rule(db: Session, rule_id: int) -> Rule:
    rule = db.get(Rule, rule_id)
    if rule is None:
        raise not_found("rule", rule_id)
    return rule


def rule_out(rule: Rule, group_name: str) -> RuleOut:
    """The rule as the admin API shows it (and the audit log records it)."""
    return RuleOut(
        id=rule.id,
        group=group_name,
        destination=rule.destination,
        proto=rule.proto,
        ports=rule.ports,
        description=rule.description,
        created_at=rule.created_at,
    )


def _audit_view(rule: Rule, group: Group) -> AuditView:
    return dict(jsonable(rule_out(rule, group.name).model_dump()))


StoredRule = fwlimits.StoredRule

# Counts by rules' content, so a create recounts only its own group (a cache; thread-safe
# enough: a lost update only means a recount).
_sizes = fwlimits.GroupSizes()


def firewall_sizes(groups: dict[str, list[StoredRule]]) -> dict[str, int]:
    """Each group's firewall set elements (:func:`fwlimits.group_elements`)."""
    return _sizes.count(groups)


def stored_rules(db: Session) -> dict[str, list[StoredRule]]:
    """Every group's rules as (destination, proto, ports), groups without rules included."""
    rules: dict[str, list[StoredRule]] = {name: [] for name in db.scalars(select(Group.name))}
    query = select(Group.name, Rule.destination, Rule.proto, Rule.ports).join(Group)
    for gname, dest, proto, ports in db.execute(query):
        rules[gname].append((dest, proto, ports))
    return rules


def limit_problem(overflow: fwlimits.Overflow, field: str) -> Problem:
    """The 422 answer for a write that would put the pods' firewall over its limit."""
    detail = f"{overflow.message()}; nothing was written"
    return Problem(
        422,
        "Firewall limit exceeded",
        detail,
        errors=[{"field": field, "message": overflow.message()}],
        group=overflow.group,
        elements=overflow.elements,
        total_elements=overflow.total,
        limit=overflow.limit,
    )


def check_new_rule(
    db: Session, group: Group, destination: str, proto: str, ports: str | None
) -> None:
    """Refuse (422) a rule that would put the firewall of every pod over its element limit.

    Takes the change-log lock first (PostgreSQL), so two concurrent creates cannot both fit
    alone and overflow together."""
    changelog.lock(db)
    rules = stored_rules(db)
    sizes = firewall_sizes(rules)
    before = sum(sizes.values())
    rules[group.name].append((destination, proto, ports))
    sizes = firewall_sizes(rules)
    overflow = fwlimits.check(sizes, [group.name], before=before)
    if overflow is not None:
        raise limit_problem(overflow, "ports" if ports else "destination")


def create_rule(
    db: Session,
    journal: Journal,
    group: Group,
    *,
    destination: str,
    proto: netparse.Protocol,
    ports: str | None,
    description: str | None,
) -> Rule:
    """A new grant; the same destination/proto/ports twice in one group is refused."""
    dup = db.scalar(
        select(Rule.id).where(
            Rule.group_id == group.id,
            Rule.destination == destination,
            Rule.proto == proto,
            Rule.ports.is_(None) if ports is None else Rule.ports == ports,
        )
    )
    if dup is not None:
        raise conflict(f"group {group.name!r} already has this rule (id {dup})")
    rule = Rule(
        group_id=group.id,
        destination=destination,
        proto=proto,
        ports=ports,
        description=description,
    )
    db.add(rule)
    db.flush()
    journal.upsert(fleetstate.rule_state(rule))
    journal.audit(
        "rule.create",
        f"{group.name}#{rule.id}",
        None,
        journal.capture(lambda: _audit_view(rule, group)),
    )
    return rule


def update_rule(db: Session, journal: Journal, rule: Rule, description: str | None) -> Rule:
    """Change a rule's description (what it grants never changes: replace the rule)."""
    group = rule.group
    before = journal.capture(lambda: _audit_view(rule, group))
    rule.description = description
    db.flush()
    journal.upsert(fleetstate.rule_state(rule))
    journal.audit(
        "rule.update",
        f"{group.name}#{rule.id}",
        before,
        journal.capture(lambda: _audit_view(rule, group)),
    )
    return rule


def delete_rule(db: Session, journal: Journal, rule: Rule) -> None:
    group = rule.group
    before = journal.capture(lambda: _audit_view(rule, group))
    key = fleetstate.rule_key(rule)
    db.delete(rule)
    db.flush()
    journal.delete(key)
    journal.audit("rule.delete", f"{group.name}#{key.id}", before, None)
