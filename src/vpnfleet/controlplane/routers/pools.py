"""Address pools: the NAT pool of each pod template and the cluster gateway pool."""

from __future__ import annotations

import ipaddress

from fastapi import APIRouter
from sqlalchemy import select

from vpnfleet.controlplane.errors import bad_request
from vpnfleet.controlplane.models import Pool
from vpnfleet.controlplane.pagination import LINK_HEADER, Keyset, PageParams
from vpnfleet.controlplane.routing import WriteThroughRoute
from vpnfleet.controlplane.schemas import PoolOut, PoolSet
from vpnfleet.controlplane.services import pools
from vpnfleet.controlplane.services.journal import Journal
from vpnfleet.controlplane.state import DB, Operator
from vpnfleet.core import netparse

router = APIRouter(route_class=WriteThroughRoute, prefix="/api/v1/pools", tags=["pools"])


POOLS = Keyset("pools", (Pool.kind, Pool.name), ("str", "str"))


@router.get("", response_model=list[PoolOut], responses=LINK_HEADER)
def list_pools(db: DB, _who: Operator, page: PageParams) -> list[PoolOut]:
    """Pools by kind, then name, a page at a time."""
    found = db.scalars(page.query(POOLS, select(Pool))).all()
    return pools.pools_out(db, page.rows(POOLS, found, lambda p: (p.kind, p.name)))


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
