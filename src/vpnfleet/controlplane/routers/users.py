"""Users: CRUD, enable/disable, certificates and client profiles (services/users.py)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from vpnfleet.controlplane.errors import Problem
from vpnfleet.controlplane.models import Certificate, User
from vpnfleet.controlplane.pagination import LINK_HEADER, Keyset, PageParams
from vpnfleet.controlplane.routing import WriteThroughRoute
from vpnfleet.controlplane.schemas import ReissueIn, UserCreate, UserOut, UserUpdate
from vpnfleet.controlplane.services import users
from vpnfleet.controlplane.services.journal import Journal
from vpnfleet.controlplane.settings import tcp_remotes
from vpnfleet.controlplane.state import DB, AppState, Operator, State
from vpnfleet.core import netparse

router = APIRouter(route_class=WriteThroughRoute, prefix="/api/v1/users", tags=["users"])


USERS = Keyset("users", (User.name,), ("str",))


@router.get("", response_model=list[UserOut], responses=LINK_HEADER)
def list_users(db: DB, _who: Operator, page: PageParams) -> list[UserOut]:
    """Users by name, a page at a time."""
    rows = page.rows(USERS, db.scalars(page.query(USERS, select(User))).all(), lambda u: (u.name,))
    return users.users_out(db, rows)


@router.post("", response_model=UserOut, status_code=201)
def create_user(body: UserCreate, db: DB, who: Operator, state: State) -> UserOut:
    journal = Journal(db, who)
    user = users.create_user(
        db,
        journal,
        state.sealer,
        name=body.name,
        email=body.email,
        mode=netparse.parse_mode(body.mode),
        enabled=body.enabled,
        max_sessions=body.max_sessions,
        groups=body.groups,
    )
    journal.commit()
    return users.user_out(db, user)


@router.get("/{name}", response_model=UserOut)
def show_user(name: str, db: DB, _who: Operator) -> UserOut:
    return users.user_out(db, users.get_user(db, name))


@router.patch("/{name}", response_model=UserOut)
def update_user(name: str, body: UserUpdate, db: DB, who: Operator) -> UserOut:
    user = users.get_user(db, name)
    changes = body.model_dump(exclude_unset=True)
    for required in ("mode", "enabled", "max_sessions"):
        if required in changes and changes[required] is None:
            raise Problem(422, "Invalid request", f"{required}: cannot be null")
    journal = Journal(db, who)
    users.update_user(db, journal, user, changes)
    journal.commit()
    return users.user_out(db, user)


@router.post("/{name}/disable", response_model=UserOut)
def disable_user(name: str, db: DB, who: Operator) -> UserOut:
    journal = Journal(db, who)
    user = users.set_enabled(db, journal, users.get_user(db, name), False)
    journal.commit()
    return users.user_out(db, user)


@router.post("/{name}/enable", response_model=UserOut)
def enable_user(name: str, db: DB, who: Operator) -> UserOut:
    journal = Journal(db, who)
    user = users.set_enabled(db, journal, users.get_user(db, name), True)
    journal.commit()
    return users.user_out(db, user)


@router.delete("/{name}", status_code=204)
def delete_user(name: str, db: DB, who: Operator) -> Response:
    journal = Journal(db, who)
    users.delete_user(db, journal, users.get_user(db, name))
    journal.commit()
    return Response(status_code=204)


@router.post("/{name}/reissue", response_model=UserOut)
def reissue_cert(
    name: str, db: DB, who: Operator, state: State, body: ReissueIn | None = None
) -> UserOut:
    """Revoke the user's current certificate and issue a new one."""
    journal = Journal(db, who)
    reason = (body.reason if body else None) or "reissued"
    user = users.reissue_cert(db, journal, state.sealer, users.get_user(db, name), reason)
    journal.commit()
    return users.user_out(db, user)


@router.post("/{name}/revoke", response_model=UserOut)
def revoke_cert(name: str, db: DB, who: Operator, body: ReissueIn | None = None) -> UserOut:
    """Revoke the user's certificate without issuing a new one."""
    journal = Journal(db, who)
    reason = (body.reason if body else None) or "revoked"
    user = users.revoke_cert(db, journal, users.get_user(db, name), reason)
    journal.commit()
    return users.user_out(db, user)


@router.get("/{name}/profile", response_class=Response)
def download_profile(name: str, db: DB, who: Operator, state: State) -> Response:
    return profile_download(db, Journal(db, who), state, users.get_user(db, name))


def profile_download(
    db: Session,
    journal: Journal,
    state: AppState,
    user: User,
    cert: Certificate | None = None,
    filename: str | None = None,
) -> Response:
    """A user's .ovpn as a download (with `cert`: that device's), its hand-out audited and
    committed: the API's, the console's and the self-service pages' one way to serve it."""
    profile = users.client_profile(
        db,
        journal,
        state.sealer,
        user,
        state.settings.public_endpoints,
        tcp_remotes(state.settings),
        cert=cert,
    )
    journal.commit()
    name = filename or f"{user.name}.ovpn"
    return Response(
        profile,
        media_type="application/x-openvpn-profile",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )
