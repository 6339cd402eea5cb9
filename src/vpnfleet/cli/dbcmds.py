"""`vpnfleet db`: the database's schema and the sealing of its secrets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vpnfleet.cli.client import CLIError
from vpnfleet.cli.servercmd import describe_failure

db_app = typer.Typer(help="Database schema.", no_args_is_help=True)


@db_app.command("upgrade")
def db_upgrade(
    data_dir: Annotated[Path | None, typer.Option()] = None,
    database_url: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Apply schema migrations (the server also does this at start)."""
    from vpnfleet.controlplane import db
    from vpnfleet.controlplane.settings import ServerSettings

    try:
        settings = ServerSettings.from_env(data_dir=data_dir, database_url=database_url)
    except ValueError as exc:
        raise CLIError(str(exc), 2) from None
    settings.ensure_data_dir()
    try:
        engine = db.make_engine(settings.resolved_database_url)
        db.upgrade(engine)
        typer.echo(f"database at revision {db.current_revision(engine)}")
    except Exception as exc:
        raise CLIError(f"migration failed: {describe_failure(exc)}") from None


@db_app.command("reseal")
def db_reseal(
    old_secret_file: Annotated[
        Path,
        typer.Option(help="File holding the secret the keys are sealed with now (any strength)."),
    ],
    data_dir: Annotated[Path | None, typer.Option()] = None,
    database_url: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Re-seal every stored private key, the directory bind password and the IdP client secret
    with the current secret (VPNFLEET_SECRET or the data dir's secret.key), e.g. to replace a
    weak secret the server now refuses. Stop the servers first; one transaction: on any error
    nothing is changed."""
    from vpnfleet.controlplane import certs, db
    from vpnfleet.controlplane.pki import PKIError, Sealer
    from vpnfleet.controlplane.services import directory as directory_service
    from vpnfleet.controlplane.services import idp as idp_service
    from vpnfleet.controlplane.settings import ServerSettings

    try:
        settings = ServerSettings.from_env(data_dir=data_dir, database_url=database_url)
        old = Sealer(old_secret_file.read_text().strip())
        new = Sealer(settings.resolved_secret())
    except (ValueError, OSError) as exc:
        raise CLIError(str(exc), 2) from None
    engine = db.make_engine(settings.resolved_database_url)
    try:
        with db.transaction(db.session_factory(engine)) as session:
            count = certs.reseal(session, old, new)
            bind_password = directory_service.reseal(session, old, new)
            client_secret = idp_service.reseal(session, old, new)
    except PKIError:
        raise CLIError(
            f"nothing changed: the stored keys do not open with the secret in {old_secret_file}"
        ) from None
    except Exception as exc:
        raise CLIError(f"re-sealing failed, nothing changed: {describe_failure(exc)}") from None
    finally:
        engine.dispose()
    extras = [
        what
        for what, done in (
            ("the directory bind password", bind_password),
            ("the IdP client secret", client_secret),
        )
        if done
    ]
    also = "".join(f" and {what}" for what in extras)
    typer.echo(f"re-sealed {count} private keys{also} with the current secret")
