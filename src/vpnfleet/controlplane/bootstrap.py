"""First-start work: schema, CA, default pools and the first admin token."""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from vpnfleet.controlplane import auth, certs, changelog, fleetstate
from vpnfleet.controlplane.changelog import Pending, Upsert
from vpnfleet.controlplane.models import AdminToken, Pool
from vpnfleet.controlplane.pki import Sealer
from vpnfleet.privatefiles import tighten, write_private
from vpnfleet.tokenbinding import ADMIN_TOKEN_FILE

log = logging.getLogger("vpnfleet.bootstrap")

DEFAULT_NAT_POOL = ("default", "nat", "10.200.0.0/16")
DEFAULT_GATEWAY_POOL = ("gateway", "gateway", "10.201.0.0/16")
TOKEN_FILE = ADMIN_TOKEN_FILE


def _write_secret_file(path: Path, content: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private(path, content + "\n")


def bootstrap(db: Session, sealer: Sealer, data_dir: Path, bootstrap_token: str | None) -> None:
    """Idempotent: create what a fresh database lacks, in one transaction."""
    tighten(data_dir / TOKEN_FILE)  # a token file loosened since it was written
    specs: list[Pending] = []
    if certs.ensure_ca(db, sealer):
        log.info("created the fleet CA and tls-crypt key")
        specs.append(Upsert(fleetstate.pki_state(db)))
    for name, kind, cidr in (DEFAULT_NAT_POOL, DEFAULT_GATEWAY_POOL):
        if db.scalar(select(Pool).where(Pool.kind == kind).limit(1)) is None:
            pool = Pool(name=name, kind=kind, cidr=cidr)
            db.add(pool)
            db.flush()
            specs.append(Upsert(fleetstate.pool_state(pool)))
    if specs:
        changelog.append(db, specs)
    if db.scalar(select(AdminToken.id).limit(1)) is None:
        token = bootstrap_token or auth.new_token()
        db.add(
            AdminToken(
                name="bootstrap-admin",
                role="admin",
                token_hash=auth.hash_token(token),
                prefix=auth.display_prefix(token),
                created_by="bootstrap",
            )
        )
        db.flush()
        if bootstrap_token:
            log.info("first admin token taken from VPNFLEET_BOOTSTRAP_TOKEN")
        else:
            path = data_dir / TOKEN_FILE
            _write_secret_file(path, token)
            log.info("first admin token written to %s (readable by its owner only)", path)
