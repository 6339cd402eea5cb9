"""Fixtures shared by every test: databases (SQLite and the real PostgreSQL), the app, tokens."""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

PG_ENV = "VPNFLEET_TEST_PG_URL"


def _pg_admin_url() -> str:
    url = os.environ.get(PG_ENV)
    if not url:
        pytest.fail(
            f"{PG_ENV} is not set: run the tests with scripts/test.sh, which starts PostgreSQL",
            pytrace=False,
        )
    return url


@contextmanager
def fresh_database(kind: str, tmp_path: Path, *, encoding: str | None = None) -> Iterator[str]:
    """The URL of a fresh, empty database: a SQLite file under `tmp_path`, or a new database
    on the real PostgreSQL (dropped on exit), in `encoding` if given (with the C locale,
    which every encoding accepts)."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.db'}"
        return
    admin = make_url(_pg_admin_url())
    name = f"vft_{secrets.token_hex(6)}"
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        how = f" ENCODING '{encoding}' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
        conn.execute(text(f'CREATE DATABASE "{name}"{how if encoding else ""}'))
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        _drop_database(engine, name)
        engine.dispose()


DATABASES = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.fixture(params=DATABASES)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, or a new database on the real PostgreSQL."""
    with fresh_database(request.param, tmp_path) as url:
        yield url


def _drop_database(engine: Engine, name: str) -> None:
    """Drop a test database; FORCE ends leftover sessions (ours, or an autovacuum worker,
    which the test role may signal only with pg_signal_backend, granted by
    scripts/pg-test-server.sh). A refusal is retried briefly, then reported."""
    deadline = time.monotonic() + 10
    while True:
        try:
            with engine.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            return
        except DBAPIError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@dataclass
class Server:
    """A running control plane on loopback and its first admin token."""

    url: str
    admin_token: str
    data_dir: Path
    database_url: str

    def client(self, token: str | None = "admin") -> httpx.Client:
        tok = self.admin_token if token == "admin" else token
        headers = {"Authorization": f"Bearer {tok}"} if tok else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def pod_token(self, pod: str) -> str:
        """Pod `pod`'s own credential, enrolled with a fresh enrollment token."""
        with self.client(self.make_token("agent")) as c:
            r = c.post("/api/v1/agent/enroll", json={"name": pod})
            r.raise_for_status()
            return str(r.json()["token"])

    def make_token(self, role: str) -> str:
        with self.client() as c:
            r = c.post(
                "/api/v1/tokens", json={"name": f"{role}-{secrets.token_hex(3)}", "role": role}
            )
            r.raise_for_status()
            return str(r.json()["token"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RunningServer:
    """A real control plane (uvicorn in a thread, served as `vpnfleet server` serves) on
    loopback: started by the constructor, stopped by :meth:`stop` as a SIGTERM would."""

    def __init__(
        self, database_url: str, data_dir: Path, port: int | None = None, **settings: Any
    ) -> None:
        import uvicorn

        from vpnfleet.controlplane.app import create_app
        from vpnfleet.controlplane.serving import SHUTDOWN_GRACE, ControlPlaneServer
        from vpnfleet.controlplane.settings import ServerSettings

        self.port = port or free_port()
        cp_settings = ServerSettings(
            data_dir=data_dir,
            database_url=database_url,
            listen=f"127.0.0.1:{self.port}",
            public_endpoints=["vpn.example.test:1194", "vpn2.example.test:1195"],
            secret="test-seal-secret-Qx9LmPz4Rk8Vw2b7",
            heartbeat_interval=1.0,
        )
        for key, value in settings.items():  # what a test sets beyond the above
            setattr(cp_settings, key, value)
        app = create_app(cp_settings)
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=SHUTDOWN_GRACE,
        )
        self._srv = ControlPlaneServer(config, app.state.vpnfleet.hub, app.state.vpnfleet.bell)
        self._thread = threading.Thread(target=self._srv.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._srv.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("control plane did not start")
            time.sleep(0.05)
        token = (data_dir / "admin-token").read_text().strip()
        self.server = Server(f"http://127.0.0.1:{self.port}", token, data_dir, database_url)

    def stop(self, timeout: float = 15) -> float:
        """Stop as on SIGTERM; the seconds until the server had stopped."""
        started = time.monotonic()
        self._srv.should_exit = True
        self._thread.join(timeout=timeout)
        return time.monotonic() - started


@contextmanager
def running_server(database_url: str, data_dir: Path) -> Iterator[Server]:
    """A real control plane (uvicorn on a free loopback port) on the given database, stopped
    on exit."""
    running = RunningServer(database_url, data_dir)
    try:
        yield running.server
    finally:
        running.stop()


@pytest.fixture
def server(database_url: str, tmp_path: Path) -> Iterator[Server]:
    """A real control plane (uvicorn on a free loopback port) on the given database."""
    with running_server(database_url, tmp_path / "data") as srv:
        yield srv


@pytest.fixture
def admin(server: Server) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c
