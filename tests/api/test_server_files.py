"""The control plane's files on disk are private, and weak secrets stop it at start."""

from __future__ import annotations

import os
import secrets
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from vpnfleet.controlplane import auth
from vpnfleet.controlplane.app import prepare
from vpnfleet.controlplane.models import AdminToken
from vpnfleet.controlplane.settings import ServerSettings

SECRET = "test-seal-secret-Qx9LmPz4Rk8Vw2b7"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def loose_umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def start(data_dir: Path, **kw: object) -> None:
    state = prepare(ServerSettings(data_dir=data_dir, **kw))  # type: ignore[arg-type]
    state.engine.dispose()


def test_database_and_secrets_are_0600_in_an_existing_data_dir(
    tmp_path: Path, loose_umask: None
) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)  # a volume the operator made
    start(data)
    for name in ("vpnfleet.db", "secret.key", "admin-token"):
        assert mode(data / name) == 0o600, name
    for companion in ("vpnfleet.db-wal", "vpnfleet.db-shm"):
        if (data / companion).exists():
            assert mode(data / companion) == 0o600, companion
    assert mode(data) == 0o755  # the operator's directory is left as it is


def test_files_loosened_since_are_taken_back_at_the_next_start(
    tmp_path: Path, loose_umask: None
) -> None:
    data = tmp_path / "data"
    start(data)
    for name in ("vpnfleet.db", "secret.key", "admin-token"):
        (data / name).chmod(0o644)
    start(data)
    for name in ("vpnfleet.db", "secret.key", "admin-token"):
        assert mode(data / name) == 0o600, name


def test_a_data_dir_the_server_creates_is_0700(tmp_path: Path, loose_umask: None) -> None:
    data = tmp_path / "new" / "data"
    start(data, secret=SECRET)
    assert mode(data) == 0o700


def test_a_strong_bootstrap_token_becomes_the_first_admin_token(tmp_path: Path) -> None:
    token = "vpf_" + secrets.token_urlsafe(32)
    state = prepare(ServerSettings(data_dir=tmp_path, secret=SECRET, bootstrap_token=token))
    with state.factory() as db:
        (row,) = db.scalars(select(AdminToken)).all()
    state.engine.dispose()
    assert row.token_hash == auth.hash_token(token) and row.role == "admin"
    assert not (tmp_path / "admin-token").exists()


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("VPNFLEET_BOOTSTRAP_TOKEN", "x"),
        ("VPNFLEET_BOOTSTRAP_TOKEN", "hunter2hunter2hunter2"),
        ("VPNFLEET_SECRET", "hunter2hunter2hunter2"),
    ],
)
def test_vpnfleet_server_refuses_a_weak_secret_in_one_sentence(
    tmp_path: Path, var: str, value: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VPNFLEET_")}
    env[var] = value
    data = tmp_path / "data"
    out = subprocess.run(
        [sys.executable, "-m", "vpnfleet.cli.main", "server", "--data-dir", str(data)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 2
    assert f"{var} is too weak" in out.stderr
    if len(value) > 3:  # "x" occurs in any sentence
        assert value not in out.stderr + out.stdout
    assert "Traceback" not in out.stderr
    assert not data.exists()  # nothing was created: no database, no token


def test_prepare_refuses_a_weak_bootstrap_token_however_settings_were_made(
    tmp_path: Path,
) -> None:
    with pytest.raises(ValueError, match="VPNFLEET_BOOTSTRAP_TOKEN"):
        prepare(ServerSettings(data_dir=tmp_path / "d", secret=SECRET, bootstrap_token="x"))
    assert not (tmp_path / "d").exists()


def vpnfleet(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("VPNFLEET_")}
    return subprocess.run(
        [sys.executable, "-m", "vpnfleet.cli.main", *args],
        capture_output=True,
        text=True,
        env={**base, **env},
        timeout=60,
    )


def test_a_weak_seal_secret_can_be_replaced_by_resealing(database_url: str, tmp_path: Path) -> None:
    """A database sealed with a weak secret (from before the check) is re-sealed with a strong
    one, after which the server starts and every key opens; the weak one opens nothing."""
    from vpnfleet.controlplane import certs, db
    from vpnfleet.controlplane.auth import Principal
    from vpnfleet.controlplane.bootstrap import bootstrap
    from vpnfleet.controlplane.pki import PKIError, Sealer
    from vpnfleet.controlplane.schemas import DirectorySetIn, IdpSetIn
    from vpnfleet.controlplane.services import directory, idp
    from vpnfleet.controlplane.services.journal import Journal

    weak = "changeme"
    engine = db.make_engine(database_url)
    db.upgrade(engine)
    with db.transaction(db.session_factory(engine)) as session:
        bootstrap(session, Sealer(weak), tmp_path, None)
        certs.issue(session, Sealer(weak), "server", "pod1")
        settings = {
            "url": "ldap://127.0.0.1:389",
            "bind_dn": "cn=sync,dc=example,dc=test",
            "bind_password": "directory-bind-pw",
            "user_bases": ["dc=example,dc=test"],
            "group_bases": ["dc=example,dc=test"],
            "group_map": {"eng": "engineering"},
        }
        journal = Journal(session, Principal(token_id=0, name="test", role="admin"))
        directory.set_config(session, journal, Sealer(weak), DirectorySetIn(**settings))
        idp_settings = {
            "issuer": "https://idp.example.test",
            "client_id": "vpnfleet",
            "client_secret": "idp-client-secret",
            "public_url": "https://vpn.example.test",
        }
        idp.set_config(session, journal, Sealer(weak), IdpSetIn(**idp_settings))
        journal.commit()
    engine.dispose()
    old_file = tmp_path / "old-secret"
    old_file.write_text(weak + "\n")
    strong = secrets.token_urlsafe(32)

    wrong = tmp_path / "wrong-secret"
    wrong.write_text("not-it\n")
    out = vpnfleet("db", "reseal", "--old-secret-file", str(wrong),
                   "--database-url", database_url, VPNFLEET_SECRET=strong)  # fmt: skip
    assert out.returncode == 1 and "nothing changed" in out.stderr, out.stderr

    out = vpnfleet("db", "reseal", "--old-secret-file", str(old_file),
                   "--database-url", database_url, VPNFLEET_SECRET=strong)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert (
        "re-sealed 3 private keys and the directory bind password and the IdP client secret"
        in out.stdout
    )
    assert weak not in out.stdout + out.stderr and strong not in out.stdout + out.stderr

    state = prepare(ServerSettings(data_dir=tmp_path, database_url=database_url, secret=strong))
    try:
        with db.transaction(state.factory) as session:
            assert "PRIVATE KEY" in certs.load_ca(session, state.sealer).key_pem
            assert "OpenVPN Static key" in certs.tls_crypt_key(session, state.sealer)
            with pytest.raises(PKIError):
                certs.load_ca(session, Sealer(weak))
            row = directory.get_config(session)
            assert row is not None
            assert directory.ldap_config(row, state.sealer).bind_password == "directory-bind-pw"
            idp_row = idp.get_config(session)
            assert idp_row is not None
            assert idp.client_secret(idp_row, state.sealer) == "idp-client-secret"
    finally:
        state.engine.dispose()
