"""The control plane's FastAPI application."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy.exc import IntegrityError

from vpnfleet import __version__, tokenbinding
from vpnfleet.controlplane import console, errors, openapi, servertls
from vpnfleet.controlplane import db as dbmod
from vpnfleet.controlplane import metrics as cpmetrics
from vpnfleet.controlplane.bootstrap import TOKEN_FILE, bootstrap
from vpnfleet.controlplane.intake import RequestIntake
from vpnfleet.controlplane.pki import Sealer
from vpnfleet.controlplane.routers import (
    agents,
    audit,
    consoleaccounts,
    directory,
    fleet,
    groups,
    idp,
    nataudit,
    pkiroutes,
    policy,
    pools,
    sso,
    system,
    tokens,
    users,
    watchroute,
)
from vpnfleet.controlplane.settings import ServerSettings
from vpnfleet.controlplane.ssobell import DecisionBell
from vpnfleet.controlplane.state import AppState, refused_pod_token
from vpnfleet.controlplane.watch import ChangeHub
from vpnfleet.core.netparse import parse_listen

log = logging.getLogger("vpnfleet.server")


def prepare(settings: ServerSettings) -> AppState:
    """Open the database, apply migrations and bootstrap: everything before serving."""
    settings.validate()  # also when built without from_env: weak secrets never get this far
    settings.ensure_data_dir()
    tls = servertls.server_tls(
        settings.data_dir, settings.tls_cert, settings.tls_key, settings.tls_self_signed
    )
    engine = dbmod.make_engine(settings.resolved_database_url, settings.database_pool_size)
    dbmod.upgrade(engine)
    factory = dbmod.session_factory(engine)
    sealer = Sealer(settings.resolved_secret())
    for attempt in range(2):
        try:
            with dbmod.transaction(factory) as db:
                bootstrap(db, sealer, settings.data_dir, settings.bootstrap_token)
            break
        except IntegrityError:
            # Another replica bootstrapped the same database at the same moment.
            if attempt:
                raise
    bind_token_file(settings, tls)
    hub = ChangeHub(
        factory,
        settings.watch_poll_interval,
        settings.change_log_keep,
        max_subscribers=settings.watch_max_subscribers,
    )
    state = AppState(
        settings=settings,
        engine=engine,
        factory=factory,
        sealer=sealer,
        hub=hub,
        bell=DecisionBell(factory, settings.watch_poll_interval),
        tls=tls,
    )
    state.install_commit_hook()
    return state


def bind_token_file(settings: ServerSettings, tls: servertls.ServerTLS | None) -> None:
    """(Re)write the record of where the first admin token file may be sent: this server's
    URLs as configured now (vpnfleet/tokenbinding.py). Nothing to do without the file."""
    token_file = settings.data_dir / TOKEN_FILE
    if not token_file.exists():
        return
    host, port = parse_listen(settings.listen)
    urls = tokenbinding.server_urls(host, port, tls.names if tls else None, settings.advertise_urls)
    ca_file = str(tls.ca_file.resolve()) if tls and tls.ca_file else None
    tokenbinding.write(token_file, tokenbinding.TokenBinding(urls, ca_file))


def create_app(settings: ServerSettings, state: AppState | None = None) -> FastAPI:
    """Build the app; `state` may be prepared beforehand (tests, the server command)."""
    ready = state or prepare(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await ready.hub.start()
        try:
            yield
        finally:
            await ready.bell.stop()
            await ready.hub.stop()
            ready.engine.dispose()

    app = FastAPI(
        title="vpnfleet control plane",
        version=__version__,
        lifespan=lifespan,
        description="Users, groups, access rules, pools, PKI, pods, sessions and audit of a "
        "vpnfleet OpenVPN fleet. Authenticate with `Authorization: Bearer <token>`.",
    )
    app.state.vpnfleet = ready
    app.state.token_refusal = refused_pod_token  # asked by errors.py before answering a 422
    errors.install(app)
    openapi.install(app)  # error responses and roles in the schema
    for module in (
        system,
        agents,
        users,
        groups,
        pools,
        tokens,
        pkiroutes,
        audit,
        fleet,
        watchroute,
        policy,
        directory,
        idp,
        sso,
        consoleaccounts,
    ):
        app.include_router(module.router)
    app.include_router(nataudit.router)
    console.install(app)  # the web console under /console (controlplane/console)
    cpmetrics.install(app)  # /metrics and API latency (controlplane/metrics.py)
    app.add_middleware(
        RequestIntake,
        known_token=ready.known_token,
        max_body_bytes=settings.max_body_bytes,
        known_console_session=ready.known_console_session,
        recently_known=ready.recently_known,
    )
    return app
