"""The control plane's FastAPI application."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy.exc import IntegrityError

from vpnfleet import __version__
from vpnfleet.controlplane import db as dbmod
from vpnfleet.controlplane import errors
from vpnfleet.controlplane import metrics as cpmetrics
from vpnfleet.controlplane.bootstrap import bootstrap
from vpnfleet.controlplane.intake import RequestIntake
from vpnfleet.controlplane.pki import Sealer
from vpnfleet.controlplane.routers import (
    agents,
    audit,
    fleet,
    groups,
    nataudit,
    pkiroutes,
    policy,
    pools,
    system,
    tokens,
    users,
    watchroute,
)
from vpnfleet.controlplane.settings import ServerSettings
from vpnfleet.controlplane.state import AppState
from vpnfleet.controlplane.watch import ChangeHub

log = logging.getLogger("vpnfleet.server")


def prepare(settings: ServerSettings) -> AppState:
    """Open the database, apply migrations and bootstrap: everything before serving."""
    settings.ensure_data_dir()
    engine = dbmod.make_engine(settings.resolved_database_url)
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
    hub = ChangeHub(
        factory,
        settings.watch_poll_interval,
        settings.change_log_keep,
        max_subscribers=settings.watch_max_subscribers,
    )
    state = AppState(settings=settings, engine=engine, factory=factory, sealer=sealer, hub=hub)
    state.install_commit_hook()
    return state


def create_app(settings: ServerSettings, state: AppState | None = None) -> FastAPI:
    """Build the app; `state` may be prepared beforehand (tests, the server command)."""
    ready = state or prepare(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await ready.hub.start()
        try:
            yield
        finally:
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
    errors.install(app)
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
    ):
        app.include_router(module.router)
    app.include_router(nataudit.router)
    cpmetrics.install(app)  # /metrics and API latency (controlplane/metrics.py)
    app.add_middleware(
        RequestIntake, known_token=ready.known_token, max_body_bytes=settings.max_body_bytes
    )
    return app
