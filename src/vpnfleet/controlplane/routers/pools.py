"""Address pools: the NAT pool of each pod template and the cluster gateway pool."""

from __future__ import annotations

import ipaddress

from fastapi import APIRouter
from sqlalchemy import select

from vpnfleet.controlplane.errors import bad_request
from vpnfleet.controlplane.models import Pool
from vpnfleet.controlplane.schemas import PoolOut, PoolSet
from vpnfleet.controlplane.services import pools
from vpnfleet.controlplane.services.journal import Journal
from vpnfleet.controlplane.state import DB, Operator
from vpnfleet.core import netparse

router = APIRouter(prefix="/api/v1/pools", tags=["pools"])


@router.get("", response_model=list[PoolOut])
def list_pools(db: DB, _who: Operator) -> list[PoolOut]:
    return [pools.pool_out(db, p) for p in db.scalars(select(Pool).order_by(Pool.kind, Pool.name))]


@router.put("/{name}", response_model=PoolOut)
def set_pool(name: str, body: PoolSet, db: DB, who: Operator) -> PoolOut:
    """Create or change a pool. Shrinking below existing gateway leases is refused."""
    try:
        netparse.validate_name(name, "pool name")
    except ValueError as exc:
        raise bad_request(str(exc)) from None
    journal = Journal(db, who)
    pool = pools.set_pool(db, journal, name, ipaddress.IPv4Network(body.cidr), body.kind)
    journal.commit()
    return pools.pool_out(db, pool)
