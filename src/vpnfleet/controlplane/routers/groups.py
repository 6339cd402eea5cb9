"""Groups, their members and their access rules (services/groups.py, services/rules.py)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response
from sqlalchemy import select

from vpnfleet.controlplane.models import Group, Rule
from vpnfleet.controlplane.pagination import LINK_HEADER, Keyset, PageParams
from vpnfleet.controlplane.routing import WriteThroughRoute
from vpnfleet.controlplane.schemas import (
    GroupCreate,
    GroupOut,
    GroupUpdate,
    MemberIn,
    RuleCreate,
    RuleOut,
)
from vpnfleet.controlplane.services import groups, rules, users
from vpnfleet.controlplane.services.journal import Journal
from vpnfleet.controlplane.state import DB, Operator
from vpnfleet.core import netparse
from vpnfleet.wire import MAX_INT32

router = APIRouter(route_class=WriteThroughRoute, prefix="/api/v1", tags=["groups"])


GROUPS = Keyset("groups", (Group.name,), ("str",))
RULES = Keyset("rules", (Group.name, Rule.id), ("str", "int"))


@router.get("/groups", response_model=list[GroupOut], responses=LINK_HEADER)
def list_groups(db: DB, _who: Operator, page: PageParams) -> list[GroupOut]:
    """Groups by name, a page at a time."""
    found = db.scalars(page.query(GROUPS, select(Group))).all()
    return groups.groups_out(db, page.rows(GROUPS, found, lambda g: (g.name,)))


@router.post("/groups", response_model=GroupOut, status_code=201)
def create_group(body: GroupCreate, db: DB, who: Operator) -> GroupOut:
    journal = Journal(db, who)
    group = groups.create_group(db, journal, body.name, body.description)
    journal.commit()
    return groups.group_out(db, group)


@router.get("/groups/{name}", response_model=GroupOut)
def show_group(name: str, db: DB, _who: Operator) -> GroupOut:
    return groups.group_out(db, groups.get_group(db, name))


@router.patch("/groups/{name}", response_model=GroupOut)
def update_group(name: str, body: GroupUpdate, db: DB, who: Operator) -> GroupOut:
    """Change the description and/or the auth policy asked of the members' connections
    (`cert`, `cert+sso`, null for none); one audit entry each."""
    group = groups.get_group(db, name)
    changes = body.model_dump(exclude_unset=True)
    journal = Journal(db, who)
    if "description" in changes and changes["description"] != group.description:
        groups.update_group(db, journal, group, changes["description"])
    if "auth_policy" in changes and changes["auth_policy"] != group.auth_policy:
        groups.set_auth_policy(db, journal, group, changes["auth_policy"])
    journal.commit()
    return groups.group_out(db, group)


@router.delete("/groups/{name}", status_code=204)
def delete_group(name: str, db: DB, who: Operator) -> Response:
    journal = Journal(db, who)
    groups.delete_group(db, journal, groups.get_group(db, name))
    journal.commit()
    return Response(status_code=204)


@router.post("/groups/{name}/members", response_model=GroupOut)
def add_member(name: str, body: MemberIn, db: DB, who: Operator) -> GroupOut:
    group = groups.get_group(db, name)
    journal = Journal(db, who)
    groups.add_member(db, journal, group, users.get_user(db, body.user))
    journal.commit()
    return groups.group_out(db, group)


@router.delete("/groups/{name}/members/{user_name}", response_model=GroupOut)
def remove_member(name: str, user_name: str, db: DB, who: Operator) -> GroupOut:
    group = groups.get_group(db, name)
    journal = Journal(db, who)
    groups.remove_member(db, journal, group, users.get_user(db, user_name))
    journal.commit()
    return groups.group_out(db, group)


@router.get("/rules", response_model=list[RuleOut], responses=LINK_HEADER)
def list_rules(db: DB, _who: Operator, page: PageParams, group: str | None = None) -> list[RuleOut]:
    """Rules by group name, then id, a page at a time."""
    query = select(Rule, Group.name).join(Group)
    if group is not None:
        groups.get_group(db, group)
        query = query.where(Group.name == group)
    found = db.execute(page.query(RULES, query)).all()
    return [
        rules.rule_out(rule, gname)
        for rule, gname in page.rows(RULES, found, lambda r: (r[1], r[0].id))
    ]


@router.post("/rules", response_model=RuleOut, status_code=201)
def create_rule(body: RuleCreate, db: DB, who: Operator) -> RuleOut:
    group = groups.get_group(db, body.group)
    rules.check_new_rule(db, group, body.destination, body.proto, body.ports)
    journal = Journal(db, who)
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
    return rules.rule_out(rule, group.name)


@router.delete("/rules/{rule_id}", status_code=204)
def delete_rule(
    rule_id: Annotated[int, Path(ge=1, le=MAX_INT32)], db: DB, who: Operator
) -> Response:
    journal = Journal(db, who)
    rules.delete_rule(db, journal, rules.get_rule(db, rule_id))
    journal.commit()
    return Response(status_code=204)
