"""Groups, their members and their access rules."""

from __future__ import annotations

from fastapi import APIRouter, Response
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from vpnfleet.controlplane import changelog
from vpnfleet.controlplane.changelog import ChangeSpec
from vpnfleet.controlplane.errors import conflict, not_found
from vpnfleet.controlplane.models import Group, Membership, Rule, User
from vpnfleet.controlplane.routers.users import get_user, user_change
from vpnfleet.controlplane.schemas import GroupCreate, GroupOut, MemberIn, RuleCreate, RuleOut
from vpnfleet.controlplane.state import DB, Operator, jsonable

router = APIRouter(prefix="/api/v1", tags=["groups"])


def get_group(db: Session, name: str) -> Group:
    group = db.scalar(select(Group).where(Group.name == name))
    if group is None:
        raise not_found("group", name)
    return group


def group_out(db: Session, group: Group) -> GroupOut:
    members = db.scalars(
        select(User.name)
        .join(Membership)
        .where(Membership.group_id == group.id)
        .order_by(User.name)
    ).all()
    rules = db.scalar(select(func.count()).select_from(Rule).where(Rule.group_id == group.id))
    return GroupOut(
        id=group.id,
        name=group.name,
        description=group.description,
        members=list(members),
        rules=int(rules or 0),
        created_at=group.created_at,
    )


def rule_out(rule: Rule, group_name: str) -> RuleOut:
    return RuleOut(
        id=rule.id,
        group=group_name,
        destination=rule.destination,
        proto=rule.proto,
        ports=rule.ports,
        description=rule.description,
        created_at=rule.created_at,
    )


def rule_change(rule: Rule, group: Group, op: str = "upsert") -> ChangeSpec:
    return ChangeSpec(
        "rule",
        op,
        rule.id,
        {
            "group_id": group.id,
            "group": group.name,
            "destination": rule.destination,
            "proto": rule.proto,
            "ports": rule.ports,
        },
    )


def group_change(group: Group, op: str = "upsert") -> ChangeSpec:
    return ChangeSpec("group", op, group.id, {"name": group.name})


@router.get("/groups", response_model=list[GroupOut])
def list_groups(db: DB, _who: Operator) -> list[GroupOut]:
    return [group_out(db, g) for g in db.scalars(select(Group).order_by(Group.name))]


@router.post("/groups", response_model=GroupOut, status_code=201)
def create_group(body: GroupCreate, db: DB, who: Operator) -> GroupOut:
    if db.scalar(select(Group.id).where(Group.name == body.name)) is not None:
        raise conflict(f"group {body.name!r} already exists")
    group = Group(name=body.name, description=body.description)
    db.add(group)
    db.flush()
    out = group_out(db, group)
    changelog.record(
        db, who, "group.create", group.name, None, jsonable(out.model_dump()), [group_change(group)]
    )
    return out


@router.get("/groups/{name}", response_model=GroupOut)
def show_group(name: str, db: DB, _who: Operator) -> GroupOut:
    return group_out(db, get_group(db, name))


@router.delete("/groups/{name}", status_code=204)
def delete_group(name: str, db: DB, who: Operator) -> Response:
    group = get_group(db, name)
    before = jsonable(group_out(db, group).model_dump())
    members = list(db.scalars(select(User).join(Membership).where(Membership.group_id == group.id)))
    spec = group_change(group, "delete")
    db.delete(group)
    db.flush()
    specs = [spec] + [user_change(db, u) for u in members]
    changelog.record(db, who, "group.delete", name, before, None, specs)
    return Response(status_code=204)


@router.post("/groups/{name}/members", response_model=GroupOut)
def add_member(name: str, body: MemberIn, db: DB, who: Operator) -> GroupOut:
    group = get_group(db, name)
    user = get_user(db, body.user)
    if db.get(Membership, (group.id, user.id)) is not None:
        raise conflict(f"user {user.name!r} is already a member of group {name!r}")
    before = jsonable(group_out(db, group).model_dump())
    db.add(Membership(group_id=group.id, user_id=user.id))
    db.flush()
    out = group_out(db, group)
    changelog.record(
        db,
        who,
        "group.add_member",
        f"{name}/{user.name}",
        before,
        jsonable(out.model_dump()),
        [
            ChangeSpec(
                "membership",
                "upsert",
                group.id,
                {"group": name, "user": user.name, "user_id": user.id},
            ),
            user_change(db, user),
        ],
    )
    return out


@router.delete("/groups/{name}/members/{user_name}", response_model=GroupOut)
def remove_member(name: str, user_name: str, db: DB, who: Operator) -> GroupOut:
    group = get_group(db, name)
    user = get_user(db, user_name)
    membership = db.get(Membership, (group.id, user.id))
    if membership is None:
        raise not_found(f"membership of user {user_name!r} in group", name)
    before = jsonable(group_out(db, group).model_dump())
    db.delete(membership)
    db.flush()
    out = group_out(db, group)
    changelog.record(
        db,
        who,
        "group.remove_member",
        f"{name}/{user_name}",
        before,
        jsonable(out.model_dump()),
        [
            ChangeSpec(
                "membership",
                "delete",
                group.id,
                {"group": name, "user": user_name, "user_id": user.id},
            ),
            user_change(db, user),
        ],
    )
    return out


@router.get("/rules", response_model=list[RuleOut])
def list_rules(db: DB, _who: Operator, group: str | None = None) -> list[RuleOut]:
    query = select(Rule, Group.name).join(Group).order_by(Group.name, Rule.id)
    if group is not None:
        get_group(db, group)
        query = query.where(Group.name == group)
    return [rule_out(rule, gname) for rule, gname in db.execute(query).all()]


@router.post("/rules", response_model=RuleOut, status_code=201)
def create_rule(body: RuleCreate, db: DB, who: Operator) -> RuleOut:
    group = get_group(db, body.group)
    dup = db.scalar(
        select(Rule.id).where(
            Rule.group_id == group.id,
            Rule.destination == body.destination,
            Rule.proto == body.proto,
            Rule.ports.is_(None) if body.ports is None else Rule.ports == body.ports,
        )
    )
    if dup is not None:
        raise conflict(f"group {group.name!r} already has this rule (id {dup})")
    rule = Rule(
        group_id=group.id,
        destination=body.destination,
        proto=body.proto,
        ports=body.ports,
        description=body.description,
    )
    db.add(rule)
    db.flush()
    out = rule_out(rule, group.name)
    changelog.record(
        db,
        who,
        "rule.create",
        f"{group.name}#{rule.id}",
        None,
        jsonable(out.model_dump()),
        [rule_change(rule, group)],
    )
    return out


@router.delete("/rules/{rule_id}", status_code=204)
def delete_rule(rule_id: int, db: DB, who: Operator) -> Response:
    rule = db.get(Rule, rule_id)
    if rule is None:
        raise not_found("rule", rule_id)
    group = rule.group
    before = jsonable(rule_out(rule, group.name).model_dump())
    spec = rule_change(rule, group, "delete")
    db.delete(rule)
    db.flush()
    changelog.record(db, who, "rule.delete", f"{group.name}#{rule_id}", before, None, [spec])
    return Response(status_code=204)
