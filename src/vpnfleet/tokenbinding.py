"""Where a token read from a file may be sent.

The control plane writes its first admin token to `DATA_DIR/admin-token` (the token alone, one
line, as before) and, beside it, `admin-token.binding.json`: the URLs it serves that token's API
on and the CA file that proves it. The CLI reads the record and refuses to send the file's token
to any other origin (scheme, host, port): a mistyped or hostile `--url` must not receive the
admin token. A token given explicitly (`--token`, `VPNFLEET_TOKEN`) is the user's choice and is
not checked.

Token files without a record (written by hand, or by a control plane older than the record) stay
readable: the server's own default file is then sent to loopback URLs only; a file named by
`VPNFLEET_TOKEN_FILE` or the config file is sent wherever `--url` says, as it always was.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

# The control plane's first admin token, in its data directory (controlplane/bootstrap.py).
ADMIN_TOKEN_FILE = "admin-token"  # noqa: S105 - a file name
SUFFIX = ".binding.json"
VERSION = 1
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")


@dataclass(frozen=True)
class TokenBinding:
    """The URLs a token file is for, and the CA that vouches for them (https only)."""

    urls: tuple[str, ...]
    ca_file: str | None = None


def binding_path(token_file: Path) -> Path:
    return token_file.with_name(token_file.name + SUFFIX)


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL, with the scheme's default port filled in."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http:// or https:// URL")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{url!r} has an invalid port") from None
    return scheme, parts.hostname.lower(), port or (443 if scheme == "https" else 80)


def _host_in_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def server_urls(
    listen_host: str,
    port: int,
    tls_names: Iterable[str] | None,
    advertised: Iterable[str] = (),
) -> tuple[str, ...]:
    """The URLs a server listening on `listen_host:port` answers on: loopback when it listens
    on every address, its own address otherwise, the certificate's names under TLS (no
    wildcards), and the URLs the operator advertised."""
    scheme = "https" if tls_names is not None else "http"
    listen_host = listen_host.strip("[]")
    if listen_host in _WILDCARD_HOSTS:
        hosts = ["127.0.0.1", "localhost"]
    else:
        hosts = [listen_host]
        if _is_loopback(listen_host):
            hosts.append("localhost")
    hosts += [n for n in (tls_names or ()) if "*" not in n]
    urls = [f"{scheme}://{_host_in_url(h)}:{port}" for h in dict.fromkeys(hosts)]
    return tuple(dict.fromkeys([*urls, *(u.rstrip("/") for u in advertised)]))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def write(token_file: Path, binding: TokenBinding) -> None:
    """Write the record beside `token_file` (atomically, owner-only like the token)."""
    path = binding_path(token_file)
    body = {"version": VERSION, "urls": list(binding.urls), "ca_file": binding.ca_file}
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(body, indent=2) + "\n")
    os.replace(tmp, path)


def read(token_file: Path) -> TokenBinding | None:
    """The record beside `token_file`, None if there is none; ValueError if it is unreadable
    (then the token is not sent anywhere: a damaged record must not widen where it goes)."""
    path = binding_path(token_file)
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = json.loads(raw)
        urls = data["urls"]
        ca_file = data.get("ca_file")
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            raise TypeError
        if ca_file is not None and not isinstance(ca_file, str):
            raise TypeError
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(f"{path} is not a token binding record (JSON with a urls list)") from None
    return TokenBinding(tuple(urls), ca_file)


def allows(binding: TokenBinding, url: str) -> bool:
    """Is `url` at one of the record's origins?"""
    target = origin(url)
    for allowed in binding.urls:
        try:
            if origin(allowed) == target:
                return True
        except ValueError:
            continue
    return False


def is_loopback_url(url: str) -> bool:
    return _is_loopback(origin(url)[1])
