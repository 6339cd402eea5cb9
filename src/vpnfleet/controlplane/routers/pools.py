"""Address pools: the NAT pool of each pod template and the cluster gateway pool."""

from __future__ import annotations

import ipaddress

from fastapi import APIRouter
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from vpnfleet.controlplane import changelog
from vpnfleet.controlplane.changelog import ChangeSpec
from vpnfleet.controlplane.errors import Problem, conflict
from vpnfleet.controlplane.models import GatewayLease, Pool
from vpnfleet.controlplane.schemas import PoolOut, PoolSet
from vpnfleet.controlplane.state import DB, Operator, jsonable
from vpnfleet.core import ipam, netparse

router = APIRouter(prefix="/api/v1/pools", tags=["pools"])


def pool_out(db: Session, pool: Pool) -> PoolOut:
    leases = db.scalar(
        select(func.count()).select_from(GatewayLease).where(GatewayLease.pool_id == pool.id)
    )
    return PoolOut(
        id=pool.id,
        name=pool.name,
        kind=pool.kind,
        cidr=pool.cidr,
        capacity=ipam.capacity(ipaddress.IPv4Network(pool.cidr)),
        leases=int(leases or 0),
        updated_at=pool.updated_at,
    )


@router.get("", response_model=list[PoolOut])
def list_pools(db: DB, _who: Operator) -> list[PoolOut]:
    return [pool_out(db, p) for p in db.scalars(select(Pool).order_by(Pool.kind, Pool.name))]


@router.put("/{name}", response_model=PoolOut)
def set_pool(name: str, body: PoolSet, db: DB, who: Operator) -> PoolOut:
    """Create or change a pool. Shrinking below existing gateway leases is refused."""
    netparse.validate_name(name, "pool name")
    pool = db.scalar(select(Pool).where(Pool.name == name))
    net = ipaddress.IPv4Network(body.cidr)
    before = jsonable(pool_out(db, pool).model_dump()) if pool else None
    if pool is None:
        if body.kind is None:
            raise Problem(422, "Invalid request", "kind: required when creating a pool")
        if (
            body.kind == "gateway"
            and db.scalar(select(Pool.id).where(Pool.kind == "gateway")) is not None
        ):
            raise conflict("there is already a gateway pool; change its CIDR instead")
        pool = Pool(name=name, kind=body.kind, cidr=str(net))
        db.add(pool)
    else:
        if body.kind is not None and body.kind != pool.kind:
            raise conflict(f"pool {name!r} is a {pool.kind} pool; its kind cannot change")
        outside = [
            a
            for a in db.scalars(select(GatewayLease.address).where(GatewayLease.pool_id == pool.id))
            if not ipam.is_client_address(net, ipaddress.IPv4Address(a))
        ]
        if outside:
            raise conflict(
                f"{len(outside)} gateway lease(s) (e.g. {outside[0]}) fall outside {net}; "
                "switch those users to nat mode first"
            )
        pool.cidr = str(net)
    others = db.scalars(select(Pool).where(Pool.name != name)).all()
    for other in others:
        # NAT pools may repeat on every pod, but a gateway pool must not overlap any other pool:
        # its addresses are routed in the company network.
        if (pool.kind == "gateway" or other.kind == "gateway") and net.overlaps(
            ipaddress.IPv4Network(other.cidr)
        ):
            raise conflict(f"{net} overlaps pool {other.name!r} ({other.cidr})")
    db.flush()
    out = pool_out(db, pool)
    changelog.record(
        db,
        who,
        "pool.set",
        name,
        before,
        jsonable(out.model_dump()),
        [
            ChangeSpec(
                "pool", "upsert", pool.id, {"name": name, "kind": pool.kind, "cidr": pool.cidr}
            )
        ],
    )
    return out
