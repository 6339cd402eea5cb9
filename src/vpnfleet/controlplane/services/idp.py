"""The OpenID provider's settings: one row (models.IdpConfig), the client secret sealed.

The secret is sealed by the same Sealer as the private keys and the directory bind password,
never shown again, and the `idp.set` audit entry records only whether it changed.

The vpnfleet groups the IdP's group claim manages (`group_map`) must exist, and no group may
be managed by both the claim and the directory sync: whichever of `idp set` and
`directory set` comes second is refused (`shared_groups`), so two sources never take turns
undoing each other's memberships. Both lock the directory's settings row, then the IdP's, in
that order, so two admins setting them at once are checked one after the other.
"""

from __future__ import annotations

import time

from sqlalchemy import select
from sqlalchemy.orm import Session

from vpnfleet.controlplane import pki
from vpnfleet.controlplane.errors import Problem, conflict, not_found
from vpnfleet.controlplane.models import DirectoryConfig, Group, IdpConfig, utcnow
from vpnfleet.controlplane.oidcprovider import Connection, Provider, ProviderError
from vpnfleet.controlplane.schemas import IdpOut, IdpSetIn, IdpSettings, IdpTestOut
from vpnfleet.controlplane.services.journal import Journal
from vpnfleet.core.groupclaim import managed_groups

CONFIG_ID = 1
CALLBACK_PATH = "/sso/callback"


def get_config(db: Session, *, lock: bool = False) -> IdpConfig | None:
    query = select(IdpConfig).where(IdpConfig.id == CONFIG_ID)
    return db.scalar(query.with_for_update() if lock else query)


def require_config(db: Session) -> IdpConfig:
    row = get_config(db)
    if row is None:
        raise not_found("identity provider configuration", "idp")
    return row


def settings_of(row: IdpConfig) -> IdpSettings:
    return IdpSettings.model_validate(row.settings)


def redirect_uri(settings: IdpSettings) -> str:
    return settings.public_url.rstrip("/") + CALLBACK_PATH


def set_config(db: Session, journal: Journal, sealer: pki.Sealer, body: IdpSetIn) -> None:
    """Store the settings (one audit entry with before/after, never the secret)."""
    settings = IdpSettings.model_validate(body.model_dump(exclude={"client_secret"}))
    managed = managed_groups(settings.group_map)
    if managed:
        directory = db.scalar(
            select(DirectoryConfig).where(DirectoryConfig.id == CONFIG_ID).with_for_update()
        )
        shared = shared_groups(managed, directory.settings if directory else None)
        if shared:
            raise conflict(
                f"the directory sync already manages {listed(shared)} (its group_map): a group "
                "is managed by one source only"
            )
        missing = managed - set(
            db.scalars(select(Group.name).where(Group.name.in_(sorted(managed))))
        )
        if missing:
            raise conflict(
                f"group_map names groups that do not exist: {listed(missing)}; create them "
                "first (vpnfleet group add)"
            )
    row = get_config(db, lock=True)
    before = None if row is None else dict(row.settings)
    if row is None:
        row = IdpConfig(id=CONFIG_ID, client_secret_sealed=None)
        db.add(row)
    if body.client_secret is not None:
        row.client_secret_sealed = sealer.seal(body.client_secret)
    row.settings = settings.model_dump()
    row.updated_at = utcnow()
    row.updated_by = journal.who.name
    db.flush()
    after = {
        **row.settings,
        "client_secret_changed": body.client_secret is not None,
        "client_secret_set": row.client_secret_sealed is not None,
    }
    journal.audit("idp.set", "idp", before, after)


def listed(names: set[str] | frozenset[str]) -> str:
    """Group names for an error message: the first ten, sorted."""
    first = sorted(names)[:10]
    return ", ".join(repr(n) for n in first) + (" ..." if len(names) > 10 else "")


def shared_groups(managed: frozenset[str] | set[str], other: dict[str, object] | None) -> set[str]:
    """Which of `managed` the other source's stored settings (`group_map`'s values) manage."""
    if not other:
        return set()
    their = other.get("group_map")
    return set(managed) & set(their.values()) if isinstance(their, dict) else set()


def show(row: IdpConfig) -> IdpOut:
    s = settings_of(row)
    return IdpOut(
        **s.model_dump(),
        redirect_uri=redirect_uri(s),
        client_secret_set=row.client_secret_sealed is not None,
        updated_at=row.updated_at,
        updated_by=row.updated_by,
    )


def client_secret(row: IdpConfig, sealer: pki.Sealer) -> str | None:
    return None if row.client_secret_sealed is None else sealer.unseal(row.client_secret_sealed)


def reseal(db: Session, old: pki.Sealer, new: pki.Sealer) -> bool:
    """Seal the stored client secret with ``new`` (`vpnfleet db reseal`); False if none."""
    row = get_config(db)
    if row is None or row.client_secret_sealed is None:
        return False
    row.client_secret_sealed = new.seal(old.unseal(row.client_secret_sealed))
    db.flush()
    return True


def test_provider(settings: IdpSettings) -> IdpTestOut:
    """Fetch the discovery document and the keys afresh (nothing cached): what `idp test`
    shows. A failure is a 502 with one sentence."""
    started = time.monotonic()
    conn = Connection(
        timeout=settings.timeout_seconds, ca_file=settings.ca_file, allow_http=settings.allow_http
    )
    provider = Provider(settings.issuer, settings.client_id, conn, settings.clock_skew_seconds)
    try:
        meta = provider.metadata()
        keys = provider.keys.current()
    except ProviderError as exc:
        raise Problem(502, "Identity provider unusable", str(exc)) from None
    return IdpTestOut(
        issuer=meta.issuer,
        authorization_endpoint=meta.authorization_endpoint,
        token_endpoint=meta.token_endpoint,
        jwks_uri=meta.jwks_uri,
        signing_algorithms=list(meta.signing_algorithms),
        pkce_methods=None if meta.pkce_methods is None else list(meta.pkce_methods),
        key_ids=keys.kids,
        keys=len(keys),
        redirect_uri=redirect_uri(settings),
        seconds=round(time.monotonic() - started, 3),
    )
