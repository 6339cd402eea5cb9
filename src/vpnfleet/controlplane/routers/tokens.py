"""API tokens. The secret is returned once, at creation; only its hash is stored."""

from __future__ import annotations

from fastapi import APIRouter, Response
from sqlalchemy import select

from vpnfleet.controlplane.models import AdminToken
from vpnfleet.controlplane.pagination import LINK_HEADER, Keyset, PageParams
from vpnfleet.controlplane.routing import WriteThroughRoute
from vpnfleet.controlplane.schemas import TokenCreate, TokenCreated, TokenOut
from vpnfleet.controlplane.services import tokens
from vpnfleet.controlplane.state import DB, Admin

router = APIRouter(route_class=WriteThroughRoute, prefix="/api/v1/tokens", tags=["tokens"])


def token_out(row: AdminToken) -> TokenOut:
    return TokenOut(
        id=row.id,
        name=row.name,
        role=row.role,
        prefix=row.prefix,
        created_at=row.created_at,
        created_by=row.created_by,
        revoked_at=row.revoked_at,
        last_used_at=row.last_used_at,
    )


TOKENS = Keyset("tokens", (AdminToken.id,), ("int",))


@router.get("", response_model=list[TokenOut], responses=LINK_HEADER)
def list_tokens(db: DB, _who: Admin, page: PageParams) -> list[TokenOut]:
    """Tokens in creation order, a page at a time."""
    found = db.scalars(page.query(TOKENS, select(AdminToken))).all()
    return [token_out(t) for t in page.rows(TOKENS, found, lambda t: (t.id,))]


@router.post("", response_model=TokenCreated, status_code=201)
def create_token(body: TokenCreate, db: DB, who: Admin) -> TokenCreated:
    row, secret = tokens.create(db, who, body.name, body.role)
    return TokenCreated(**token_out(row).model_dump(), token=secret)


@router.delete("/{name}", status_code=204)
def revoke_token(name: str, db: DB, who: Admin) -> Response:
    tokens.revoke(db, who, name)
    return Response(status_code=204)
