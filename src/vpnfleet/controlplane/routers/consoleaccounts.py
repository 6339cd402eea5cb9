"""Console accounts over the API (admin only): how the first console admin is made."""

from __future__ import annotations

import datetime as dt

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from vpnfleet.controlplane.models import ConsoleAccount
from vpnfleet.controlplane.pagination import LINK_HEADER, Keyset, PageParams
from vpnfleet.controlplane.routing import WriteThroughRoute
from vpnfleet.controlplane.services import consoleaccounts as accounts
from vpnfleet.controlplane.services.journal import Journal
from vpnfleet.controlplane.state import DB, Admin
from vpnfleet.core import passwords
from vpnfleet.wire import Storable

router = APIRouter(
    route_class=WriteThroughRoute, prefix="/api/v1/console-accounts", tags=["console"]
)

ACCOUNTS = Keyset("console-accounts", (ConsoleAccount.name,), ("str",))


class AccountOut(BaseModel):
    name: str
    role: str
    disabled: bool
    created_at: dt.datetime
    created_by: str | None
    password_changed_at: dt.datetime
    last_login_at: dt.datetime | None


class AccountCreate(Storable):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=64)
    role: str = Field(max_length=16)
    password: str = Field(max_length=passwords.MAX_LENGTH)


class AccountUpdate(Storable):
    """Each field given is changed; a new password ends the account's sessions."""

    model_config = ConfigDict(extra="forbid")
    role: str | None = Field(default=None, max_length=16)
    password: str | None = Field(default=None, max_length=passwords.MAX_LENGTH)
    disabled: bool | None = None


def _out(account: ConsoleAccount) -> AccountOut:
    return AccountOut(**accounts.view(account))


@router.get("", response_model=list[AccountOut], responses=LINK_HEADER)
def list_accounts(db: DB, _who: Admin, page: PageParams) -> list[AccountOut]:
    found = db.scalars(page.query(ACCOUNTS, select(ConsoleAccount))).all()
    return [_out(a) for a in page.rows(ACCOUNTS, found, lambda a: (a.name,))]


@router.post("", response_model=AccountOut, status_code=201)
def create_account(body: AccountCreate, db: DB, who: Admin) -> AccountOut:
    journal = Journal(db, who)
    account = accounts.create(db, journal, body.name, body.role, body.password)
    journal.commit()
    return _out(account)


@router.patch("/{name}", response_model=AccountOut)
def update_account(name: str, body: AccountUpdate, db: DB, who: Admin) -> AccountOut:
    journal = Journal(db, who)
    account = accounts.get_account(db, name)
    if body.role is not None:
        accounts.set_role(db, journal, account, body.role)
    if body.password is not None:
        accounts.set_password(db, journal, account, body.password)
    if body.disabled is not None:
        accounts.set_disabled(db, journal, account, body.disabled)
    journal.commit()
    return _out(account)


@router.delete("/{name}", status_code=204)
def delete_account(name: str, db: DB, who: Admin) -> Response:
    journal = Journal(db, who)
    accounts.remove(db, journal, accounts.get_account(db, name))
    journal.commit()
    return Response(status_code=204)
