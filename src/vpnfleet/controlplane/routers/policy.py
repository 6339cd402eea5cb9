"""Policy as code (apply, check, export) and a user's effective access."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from fastapi import APIRouter, Query
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from vpnfleet.controlplane import changelog
from vpnfleet.controlplane import policy as service
from vpnfleet.controlplane.errors import Problem
from vpnfleet.controlplane.routing import WriteThroughRoute
from vpnfleet.controlplane.state import DB, Operator, Reader, State
from vpnfleet.core import policyfile
from vpnfleet.core.policyfile import Policy, PolicyDiff
from vpnfleet.wire import Storable

router = APIRouter(route_class=WriteThroughRoute, prefix="/api/v1", tags=["policy"])

MAX_POLICY_CHARS = 5_000_000


class PolicyIn(Storable):
    """A policy file's text; `filename` only labels error messages."""

    model_config = ConfigDict(extra="forbid")
    yaml: str = Field(max_length=MAX_POLICY_CHARS)
    filename: str = Field(default="policy.yaml", min_length=1, max_length=200)  # audit target


class IssueOut(BaseModel):
    line: int | None
    field: str
    message: str


class FieldChangeOut(BaseModel):
    field: str
    old: Any
    new: Any


class UpdateOut(BaseModel):
    name: str
    changes: list[FieldChangeOut]


class PolicyUserOut(BaseModel):
    name: str
    email: str | None
    mode: str
    max_sessions: int
    enabled: bool
    groups: list[str]


class PolicyGroupOut(BaseModel):
    name: str
    description: str | None


class MembershipOut(BaseModel):
    group: str
    user: str


class GrantOut(BaseModel):
    group: str
    destination: str
    proto: str
    ports: str | None
    description: str | None
    rule_id: int | None
    changes: list[FieldChangeOut] = Field(default_factory=list)


class UsersDiff(BaseModel):
    created: list[PolicyUserOut]
    updated: list[UpdateOut]
    deleted: list[str]


class GroupsDiff(BaseModel):
    created: list[PolicyGroupOut]
    updated: list[UpdateOut]
    deleted: list[str]


class MembershipsDiff(BaseModel):
    added: list[MembershipOut]
    removed: list[MembershipOut]


class GrantsDiff(BaseModel):
    added: list[GrantOut]
    updated: list[GrantOut]
    removed: list[GrantOut]


class PolicyDiffOut(BaseModel):
    """What an apply changes (or, with dry_run, would change)."""

    filename: str
    dry_run: bool
    prune: bool
    changed: bool
    revision: int
    summary: str
    users: UsersDiff
    groups: GroupsDiff
    memberships: MembershipsDiff
    grants: GrantsDiff
    warnings: list[IssueOut]


class PolicyCheckOut(BaseModel):
    filename: str
    valid: bool
    users: int
    groups: int
    grants: int
    warnings: list[IssueOut]


class AccessGrantOut(BaseModel):
    group: str
    rule_id: int
    destination: str
    proto: str
    ports: str | None
    description: str | None


class PodEnforcementOut(BaseModel):
    pod: str
    ready: bool
    applied_revision: int
    last_heartbeat: dt.datetime | None
    enforced: bool


class UserAccessOut(BaseModel):
    """A user's effective grants and whether each pod enforces the latest change to them."""

    user: str
    mode: str
    enabled: bool
    groups: list[str]
    grants: list[AccessGrantOut]
    revision: int = Field(description="newest change affecting this user's access")
    current_revision: int
    enforced_everywhere: bool
    pods: list[PodEnforcementOut]


def parse_policy(body: PolicyIn) -> Policy:
    try:
        return policyfile.parse(body.yaml, body.filename)
    except policyfile.PolicyError as exc:
        raise Problem(
            422,
            "Invalid policy",
            str(exc),
            errors=[dataclasses.asdict(i) for i in exc.issues],
        ) from None


def _issues(policy: Policy) -> list[IssueOut]:
    return [IssueOut.model_validate(dataclasses.asdict(w)) for w in policy.warnings]


def diff_out(
    diff: PolicyDiff, policy: Policy, body: PolicyIn, dry_run: bool, prune: bool, revision: int
) -> PolicyDiffOut:
    d = dataclasses.asdict(diff)
    return PolicyDiffOut(
        filename=body.filename,
        dry_run=dry_run,
        prune=prune,
        changed=not diff.empty,
        revision=revision,
        summary=diff.summary(),
        users=UsersDiff(
            created=d["users_created"], updated=d["users_updated"], deleted=d["users_deleted"]
        ),
        groups=GroupsDiff(
            created=d["groups_created"], updated=d["groups_updated"], deleted=d["groups_deleted"]
        ),
        memberships=MembershipsDiff(added=d["memberships_added"], removed=d["memberships_removed"]),
        grants=GrantsDiff(
            added=d["grants_added"], updated=d["grants_updated"], removed=d["grants_removed"]
        ),
        warnings=_issues(policy),
    )


@router.post("/policy/apply", response_model=PolicyDiffOut)
def apply_policy(
    body: PolicyIn,
    db: DB,
    who: Operator,
    state: State,
    dry_run: bool = Query(default=False, description="compute the diff, write nothing"),
    prune: bool = Query(default=False, description="delete users and groups not in the file"),
) -> PolicyDiffOut:
    """Make users, groups, memberships and grants match the file, in one transaction."""
    desired = parse_policy(body)
    if dry_run:
        diff = service.plan(db, desired, prune, body.filename)
        revision = changelog.current_revision(db)
    else:
        diff, revision = service.apply(db, who, state.sealer, desired, prune, body.filename)
    return diff_out(diff, desired, body, dry_run, prune, revision)


@router.post("/policy/check", response_model=PolicyCheckOut)
def check_policy(body: PolicyIn, _who: Reader) -> PolicyCheckOut:
    """Validate a policy file without looking at or touching the database."""
    desired = parse_policy(body)
    counts = desired.counts()
    return PolicyCheckOut(
        filename=body.filename,
        valid=True,
        users=counts["users"],
        groups=counts["groups"],
        grants=counts["grants"],
        warnings=_issues(desired),
    )


class YamlResponse(PlainTextResponse):
    """A policy file; declared so that the OpenAPI schema names the type it is served as."""

    media_type = "application/yaml"


@router.get(
    "/policy/export",
    response_class=YamlResponse,
    responses={
        200: {
            "description": "A policy file (docs/policy.md)",
            "content": {
                "application/yaml": {
                    "schema": {"type": "object", "required": ["version", "users", "groups"]}
                }
            },
        }
    },
)
def export_policy(db: DB, _who: Reader) -> YamlResponse:
    """The current users, groups and grants as a policy file (apply it back: no changes)."""
    return YamlResponse(service.export(db))


@router.get("/users/{name}/access", response_model=UserAccessOut)
def user_access(name: str, db: DB, _who: Reader) -> UserAccessOut:
    """Effective grants of a user (with the group each comes from) and per-pod enforcement."""
    access = service.user_access(db, name)
    data = dataclasses.asdict(access)
    data["enforced_everywhere"] = access.enforced_everywhere
    return UserAccessOut.model_validate(data)
