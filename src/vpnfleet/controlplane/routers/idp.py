"""The OpenID provider for VPN single sign-on: settings (admin), show (operator), test (admin).

Setting the IdP decides who may complete a VPN login and holds a client secret, so it is the
admin's; `test` makes the control plane contact the configured IdP, so it is the admin's too.
"""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from vpnfleet.controlplane.routing import WriteThroughRoute
from vpnfleet.controlplane.schemas import IdpOut, IdpSetIn, IdpTestOut
from vpnfleet.controlplane.services import idp as idpsvc
from vpnfleet.controlplane.services.journal import Journal
from vpnfleet.controlplane.state import DB, Admin, Operator, State

router = APIRouter(route_class=WriteThroughRoute, prefix="/api/v1/idp", tags=["idp"])


@router.get("", response_model=IdpOut)
def show_idp(db: DB, _who: Operator) -> IdpOut:
    """The IdP settings (never the client secret) and the redirect URI to register."""
    return idpsvc.show(idpsvc.require_config(db))


@router.put("", response_model=IdpOut)
def set_idp(body: IdpSetIn, db: DB, who: Admin, state: State) -> IdpOut:
    """Configure the IdP; the client secret is sealed and never shown again (leave it out to
    keep the stored one)."""
    journal = Journal(db, who)
    idpsvc.set_config(db, journal, state.sealer, body)
    journal.commit()
    return idpsvc.show(idpsvc.require_config(db))


@router.post("/test", response_model=IdpTestOut)
async def test_idp(db: DB, _who: Admin) -> IdpTestOut:
    """Fetch the IdP's discovery document and signing keys now; 502 with the reason when the
    IdP cannot be used."""
    settings = idpsvc.settings_of(idpsvc.require_config(db))
    return await run_in_threadpool(idpsvc.test_provider, settings)
