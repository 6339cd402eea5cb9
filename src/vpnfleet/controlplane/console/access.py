"""Groups and the destinations they grant (rules), with the dataplane's limits checked."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy import select

from vpnfleet.controlplane.console import paging
from vpnfleet.controlplane.console.forms import number, validated
from vpnfleet.controlplane.console.render import page, redirect
from vpnfleet.controlplane.console.signin import Actor, Form, Viewer, need
from vpnfleet.controlplane.errors import not_found
from vpnfleet.controlplane.models import Group, Membership, Rule, User
from vpnfleet.controlplane.routers.groups import GROUPS
from vpnfleet.controlplane.routing import WriteThroughRoute
from vpnfleet.controlplane.schemas import GroupCreate, RuleCreate
from vpnfleet.controlplane.services import groups, rules
from vpnfleet.controlplane.services.journal import Journal
from vpnfleet.controlplane.state import DB, ReadDB
from vpnfleet.core import netparse
from vpnfleet.wire import MAX_INT32

router = APIRouter(route_class=WriteThroughRoute, prefix="/console", include_in_schema=False)

MAX_RULES_SHOWN = 1_000
MAX_MEMBERS_SHOWN = 500  # a group of everyone would list 10,000 names


@router.get("/groups")
def group_list(
    request: Request, db: ReadDB, me: Viewer, cursor: str | None = None, notice: str | None = None
) -> Response:
    need(me, "operator")
    rows = db.scalars(paging.query(GROUPS, select(Group), cursor)).all()
    listing = paging.listing(GROUPS, rows, lambda g: (g.name,), request.url.path, {})
    sizes = groups.counts(db, [g.id for g in listing.rows])
    return page(request, "groups.html", me, listing=listing, sizes=sizes, notice=notice)


@router.post("/groups/new")
def create_group(db: DB, me: Actor, form: Form) -> Response:
    need(me, "operator")
    body = validated(
        GroupCreate,
        {
            "name": form.get("name", "").strip(),
            "description": form.get("description", "").strip() or None,
        },
    )
    journal = Journal(db, me.principal)
    group = groups.create_group(db, journal, body.name, body.description)
    journal.commit()
    return redirect(f"/console/groups/{group.name}", notice=f"created group {group.name}")


@router.get("/groups/{name}")
def group_page(
    request: Request, name: str, db: ReadDB, me: Viewer, notice: str | None = None
) -> Response:
    need(me, "operator")
    group = groups.get_group(db, name)
    members = db.scalars(
        select(User.name)
        .join(Membership, Membership.user_id == User.id)
        .where(Membership.group_id == group.id)
        .order_by(User.name)
        .limit(MAX_MEMBERS_SHOWN + 1)
    ).all()
    size, _rules = groups.counts(db, [group.id])[group.id]
    found = db.scalars(
        select(Rule).where(Rule.group_id == group.id).order_by(Rule.id).limit(MAX_RULES_SHOWN)
    ).all()
    return page(
        request,
        "group.html",
        me,
        group=group,
        members=members[:MAX_MEMBERS_SHOWN],
        size=size,
        rules=[rules.rule_out(r, group.name) for r in found],
        notice=notice,
    )


@router.post("/groups/{name}/rules")
def add_rule(name: str, db: DB, me: Actor, form: Form) -> Response:
    """Grant the group a destination (refused when a pod's firewall could not hold it)."""
    need(me, "operator")
    body = validated(
        RuleCreate,
        {
            "group": name,
            "destination": form.get("destination", "").strip(),
            "proto": form.get("proto", "any").strip() or "any",
            "ports": form.get("ports", "").strip() or None,
            "description": form.get("description", "").strip() or None,
        },
    )
    group = groups.get_group(db, name)
    rules.check_new_rule(db, group, body.destination, body.proto, body.ports)
    journal = Journal(db, me.principal)
    rule = rules.create_rule(
        db,
        journal,
        group,
        destination=body.destination,
        proto=netparse.parse_protocol(body.proto),
        ports=body.ports,
        description=body.description,
    )
    journal.commit()
    what = f"{rule.proto} {rule.destination}" + (f" ports {rule.ports}" if rule.ports else "")
    return redirect(f"/console/groups/{name}", notice=f"{name} may now reach {what}")


@router.post("/groups/{name}/rules/delete")
def delete_rule(name: str, db: DB, me: Actor, form: Form) -> Response:
    need(me, "operator")
    rule_id = number(form, "rule", 0)
    if not 1 <= rule_id <= MAX_INT32:
        raise not_found("rule", rule_id)
    rule = rules.get_rule(db, rule_id)
    if rule.group.name != name:
        raise not_found("rule", rule_id)
    journal = Journal(db, me.principal)
    rules.delete_rule(db, journal, rule)
    journal.commit()
    return redirect(f"/console/groups/{name}", notice=f"rule {rule_id} removed; cut everywhere")
