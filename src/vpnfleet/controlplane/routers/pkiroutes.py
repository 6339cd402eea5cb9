"""PKI: the CA certificate and the CRL."""

from __future__ import annotations

from fastapi import APIRouter, Response
from sqlalchemy import func, select

from vpnfleet.controlplane import certs, pki
from vpnfleet.controlplane.models import Certificate
from vpnfleet.controlplane.routing import WriteThroughRoute
from vpnfleet.controlplane.schemas import CertOut, PKIOut
from vpnfleet.controlplane.state import DB, State, Watcher

router = APIRouter(route_class=WriteThroughRoute, prefix="/api/v1/pki", tags=["pki"])


@router.get("", response_model=PKIOut)
def show_pki(db: DB, _who: Watcher) -> PKIOut:
    ca_pem = certs.ca_cert_pem(db)
    info = pki.cert_info(ca_pem)
    issued = db.scalar(select(func.count()).select_from(Certificate)) or 0
    revoked = (
        db.scalar(
            select(func.count()).select_from(Certificate).where(Certificate.revoked_at.is_not(None))
        )
        or 0
    )
    return PKIOut(
        ca=CertOut(
            serial=str(info.serial),
            common_name=info.common_name,
            not_after=info.not_after,
            created_at=info.not_before,
            revoked_at=None,
            revocation_reason=None,
            fingerprint_sha256=info.fingerprint_sha256,
        ),
        ca_pem=ca_pem,
        issued=int(issued),
        revoked=int(revoked),
        crl_next_update_days=pki.CRL_DAYS,
    )


@router.get("/crl", response_class=Response)
def get_crl(db: DB, _who: Watcher, state: State) -> Response:
    return Response(certs.crl_pem(db, state.sealer), media_type="application/x-pem-file")
