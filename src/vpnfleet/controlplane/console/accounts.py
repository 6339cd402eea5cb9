"""Console accounts, for admins: who may sign in here, with which role."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy import select

from vpnfleet.controlplane.console.render import page, redirect
from vpnfleet.controlplane.console.signin import Actor, Form, Viewer, need
from vpnfleet.controlplane.errors import not_found
from vpnfleet.controlplane.models import ConsoleAccount
from vpnfleet.controlplane.routing import WriteThroughRoute
from vpnfleet.controlplane.services import consoleaccounts as accounts
from vpnfleet.controlplane.services.journal import Journal
from vpnfleet.controlplane.state import DB, ReadDB

router = APIRouter(route_class=WriteThroughRoute, prefix="/console", include_in_schema=False)

MAX_SHOWN = 1_000


@router.get("/accounts")
def account_list(request: Request, db: ReadDB, me: Viewer, notice: str | None = None) -> Response:
    need(me)
    rows = db.scalars(select(ConsoleAccount).order_by(ConsoleAccount.name).limit(MAX_SHOWN)).all()
    return page(
        request,
        "accounts.html",
        me,
        accounts=[accounts.view(a) for a in rows],
        roles=accounts.ROLES,
        notice=notice,
    )


@router.post("/accounts/new")
def create_account(db: DB, me: Actor, form: Form) -> Response:
    need(me)
    journal = Journal(db, me.principal)
    account = accounts.create(
        db,
        journal,
        form.get("name", "").strip(),
        form.get("role", ""),
        form.get("password", ""),
    )
    journal.commit()
    return redirect("/console/accounts", notice=f"created {account.role} account {account.name}")


@router.post("/accounts/{name}/{action}")
def account_action(name: str, action: str, db: DB, me: Actor, form: Form) -> Response:
    """disable, enable, password, role, delete."""
    need(me)
    account = accounts.get_account(db, name)
    journal = Journal(db, me.principal)
    if action in ("disable", "enable"):
        accounts.set_disabled(db, journal, account, action == "disable")
        notice = f"{name} is {action}d"
    elif action == "password":
        accounts.set_password(db, journal, account, form.get("password", ""))
        notice = f"{name} has a new password; their sessions ended"
    elif action == "role":
        accounts.set_role(db, journal, account, form.get("role", ""))
        notice = f"{name} is now {account.role}"
    elif action == "delete":
        accounts.remove(db, journal, account)
        notice = f"removed {name}"
    else:
        raise not_found("action", action)
    journal.commit()
    return redirect("/console/accounts", notice=notice)
