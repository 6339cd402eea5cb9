"""Address pools: the NAT pool of each pod template and the cluster gateway pool."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from vpnfleet.controlplane import fleetstate
from vpnfleet.controlplane.errors import Problem, conflict
from vpnfleet.controlplane.models import GatewayLease, Pool
from vpnfleet.controlplane.schemas import PoolOut
from vpnfleet.controlplane.services.journal import AuditView, Journal
from vpnfleet.controlplane.state import jsonable
from vpnfleet.core import ipam


def pool_out(db: Session, pool: Pool) -> PoolOut:
    """The pool as the admin API shows it (and the audit log records it)."""
    return pools_out(db, [pool])[0]


def pools_out(db: Session, rows: Sequence[Pool]) -> list[PoolOut]:
    """Many pools as the API shows them, with one query counting every pool's leases."""
    leases = dict(
        db.execute(
            select(GatewayLease.pool_id, func.count())
            .where(GatewayLease.pool_id.in_([p.id for p in rows]))
            .group_by(GatewayLease.pool_id)
        ).all()
    )
    return [
        PoolOut(
            id=pool.id,
            name=pool.name,
            kind=pool.kind,
            cidr=pool.cidr,
            capacity=ipam.capacity(ipaddress.IPv4Network(pool.cidr)),
            leases=leases.get(pool.id, 0),
            updated_at=pool.updated_at,
        )
        for pool in rows
    ]


def _audit_view(db: Session, pool: Pool) -> AuditView:
    return dict(jsonable(pool_out(db, pool).model_dump()))


def set_pool(
    db: Session, journal: Journal, name: str, net: ipaddress.IPv4Network, kind: str | None
) -> Pool:
    """Create or change a pool. Shrinking below existing gateway leases is refused."""
    existing = db.scalar(select(Pool).where(Pool.name == name))
    before = None if existing is None else journal.capture(lambda: _audit_view(db, existing))
    pool = existing
    if pool is None:
        if kind is None:
            raise Problem(422, "Invalid request", "kind: required when creating a pool")
        gateway = db.scalar(select(Pool.id).where(Pool.kind == "gateway"))
        if kind == "gateway" and gateway is not None:
            raise conflict("there is already a gateway pool; change its CIDR instead")
        pool = Pool(name=name, kind=kind, cidr=str(net))
        db.add(pool)
    else:
        if kind is not None and kind != pool.kind:
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
    for other in db.scalars(select(Pool).where(Pool.name != name)).all():
        # NAT pools may repeat on every pod, but a gateway pool must not overlap any other pool:
        # its addresses are routed in the company network.
        if (pool.kind == "gateway" or other.kind == "gateway") and net.overlaps(
            ipaddress.IPv4Network(other.cidr)
        ):
            raise conflict(f"{net} overlaps pool {other.name!r} ({other.cidr})")
    db.flush()
    done = pool
    journal.upsert(fleetstate.pool_state(done))
    journal.audit("pool.set", name, before, journal.capture(lambda: _audit_view(db, done)))
    return done
