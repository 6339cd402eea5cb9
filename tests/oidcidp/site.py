"""A real OpenID provider for the tests: django-oauth-toolkit in OIDC mode, on loopback.

django-oauth-toolkit is an established, maintained OAuth 2 / OIDC authorization server
(authorization code with PKCE, RS256 ID tokens, discovery, JWKS); this module only configures
it: one Django site with a login form, users and one client registered for vpnfleet. It runs
in its own process (uvicorn serving Django's ASGI application), started and stopped by
tests/oidcidp/__init__.py's helper; the database is a SQLite file in the test's directory.

    python -m tests.oidcidp.site setup   # migrate, users, the client (env: see below)
    python -m tests.oidcidp.site serve   # the ASGI application: uvicorn tests.oidcidp.site:app

    python -m tests.oidcidp.site groups NAME [GROUP ...]   # set a user's groups

Environment: IDP_DIR (state), IDP_ISSUER (http://127.0.0.1:PORT/o), IDP_REDIRECT_URI,
IDP_CLIENT_ID, IDP_CLIENT_SECRET, IDP_USERS ("name:password:email[:unverified],..."),
IDP_GROUPS_OVERAGE (optional: past this many groups the ID token carries Entra ID's overage
indicator instead of the `groups` claim).

With the `groups` scope, the ID token carries `groups`: the names of the user's Django groups,
which the `groups` command changes while the provider runs (it reads them at each login).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import django
from django.conf import settings

STATE = Path(os.environ["IDP_DIR"])
KEY_FILE = STATE / "rsa.pem"


def _rsa_key() -> str:
    if not KEY_FILE.exists():
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        KEY_FILE.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return KEY_FILE.read_text()


settings.configure(
    DEBUG=False,
    SECRET_KEY="test-idp-" + os.environ.get("IDP_CLIENT_SECRET", "x"),
    ALLOWED_HOSTS=["127.0.0.1", "localhost", *filter(None, [os.environ.get("IDP_HOST")])],
    # Test users' passwords: a fast hash (Django's default PBKDF2 costs ~0.3 s of CPU per
    # login, which would make this IdP, not vpnfleet, the bottleneck of bench/sso_pending.py).
    PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"],
    ROOT_URLCONF=__name__,
    INSTALLED_APPS=[
        "django.contrib.auth",
        "django.contrib.contenttypes",
        "django.contrib.sessions",
        "oauth2_provider",
    ],
    MIDDLEWARE=[
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.middleware.csrf.CsrfViewMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
    ],
    # Concurrent logins (bench/sso_pending.py) write at once: wait for SQLite's lock rather
    # than fail the token request with "database is locked" (an HTTP 500 to vpnfleet). A
    # transaction that reads and then writes must take the lock at BEGIN (IMMEDIATE): SQLite
    # fails a deferred one's upgrade at once, whatever the timeout.
    DATABASES={
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": str(STATE / "idp.db"),
            "OPTIONS": {
                "timeout": 30,
                "transaction_mode": "IMMEDIATE",
                "init_command": "PRAGMA journal_mode=WAL;",
            },
        }
    },
    TEMPLATES=[
        {
            "BACKEND": "django.template.backends.django.DjangoTemplates",
            "DIRS": [str(Path(__file__).parent / "templates")],
            "OPTIONS": {"context_processors": ["django.template.context_processors.request"]},
        }
    ],
    LOGIN_URL="/accounts/login/",
    USE_TZ=True,
    DEFAULT_AUTO_FIELD="django.db.models.AutoField",
    OAUTH2_PROVIDER={
        "OIDC_ENABLED": True,
        "OIDC_ISS_ENDPOINT": os.environ["IDP_ISSUER"],
        "OIDC_RSA_PRIVATE_KEY": _rsa_key(),
        "PKCE_REQUIRED": True,
        "OAUTH2_VALIDATOR_CLASS": f"{__name__}.Validator",
        "SCOPES": {
            "openid": "OpenID Connect",
            "profile": "profile",
            "email": "e-mail",
            "groups": "group memberships",
        },
    },
)
django.setup()

from django.contrib.auth import views as auth_views  # noqa: E402
from django.urls import include, path  # noqa: E402
from oauth2_provider.oauth2_validators import OAuth2Validator  # noqa: E402

UNVERIFIED = "unverified-email"  # kept in a test user's last name


class Validator(OAuth2Validator):  # type: ignore[misc]
    """Adds the claims vpnfleet maps users by."""

    oidc_claim_scope = {
        **OAuth2Validator.oidc_claim_scope,
        "groups": "groups",
        "_claim_names": "groups",
        "_claim_sources": "groups",
    }

    def get_additional_claims(self, request: Any) -> dict[str, Any]:
        user = request.user
        verified = user.last_name != UNVERIFIED
        claims: dict[str, Any] = {
            "preferred_username": user.username,
            "email": user.email,
            "email_verified": verified,
        }
        groups = sorted(user.groups.values_list("name", flat=True))
        overage = os.environ.get("IDP_GROUPS_OVERAGE")
        if overage is not None and len(groups) > int(overage):
            # What Entra ID sends for a user in too many groups: where to fetch them instead.
            claims["_claim_names"] = {"groups": "src1"}
            claims["_claim_sources"] = {
                "src1": {"endpoint": f"{os.environ['IDP_ISSUER']}/users/{user.pk}/groups"}
            }
        else:
            claims["groups"] = groups
        return claims


urlpatterns = [
    path("accounts/login/", auth_views.LoginView.as_view(template_name="login.html")),
    path("o/", include("oauth2_provider.urls", namespace="oauth2_provider")),
]


def setup() -> None:
    from django.contrib.auth.models import User
    from django.core.management import call_command
    from oauth2_provider.models import Application

    call_command("migrate", verbosity=0, interactive=False)
    for entry in filter(None, os.environ.get("IDP_USERS", "").split(",")):
        name, password, email, *flags = entry.split(":")
        # "unverified": the IdP has not verified this user's e-mail (email_verified false).
        last = UNVERIFIED if "unverified" in flags else ""
        User.objects.create_user(name, email=email, password=password, last_name=last)
    Application.objects.create(
        name="vpnfleet",
        client_id=os.environ["IDP_CLIENT_ID"],
        client_secret=os.environ["IDP_CLIENT_SECRET"],
        client_type=Application.CLIENT_CONFIDENTIAL,
        authorization_grant_type=Application.GRANT_AUTHORIZATION_CODE,
        redirect_uris=os.environ["IDP_REDIRECT_URI"],
        algorithm=Application.RS256_ALGORITHM,
        skip_authorization=True,
    )


def set_groups(name: str, groups: list[str]) -> None:
    """Make `groups` the user's groups (created as needed)."""
    from django.contrib.auth.models import Group, User

    user = User.objects.get(username=name)
    user.groups.set([Group.objects.get_or_create(name=g)[0] for g in groups])


def _asgi() -> Any:
    from django.core.asgi import get_asgi_application

    return get_asgi_application()


app = _asgi()

if __name__ == "__main__" and sys.argv[1:] == ["setup"]:
    setup()
elif __name__ == "__main__" and sys.argv[1:2] == ["groups"]:
    set_groups(sys.argv[2], sys.argv[3:])
