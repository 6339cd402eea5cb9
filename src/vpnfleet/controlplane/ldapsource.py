"""Reading users and group memberships from an LDAP or Active Directory server (ldap3).

One `read_directory` call opens a connection (ldap:// or ldaps://, optionally StartTLS, the
server certificate checked against a CA file), binds with the configured DN, searches users
and groups page by page, and resolves which users belong to each mapped group, nesting
included:

- OpenLDAP and other servers: from `member`/`uniqueMember` on groups or `memberOf` on entries,
  nesting resolved here by walking groups that are members of groups (cycles are harmless).
- Active Directory with nesting on: one search per mapped group with the matching rule
  LDAP_MATCHING_RULE_IN_CHAIN (1.2.840.113556.1.4.1941), which the server resolves itself.

Any failure (unreachable server, TLS, refused credentials, a search error, a mapped group that
does not exist) raises `DirectoryError` with one sentence and never the bind password; the
caller then changes nothing. `queries` counts every LDAP request sent (bind, StartTLS, each
search page).
"""

from __future__ import annotations

import contextlib
import re
import ssl
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import ldap3
from ldap3.core.exceptions import LDAPException
from ldap3.utils.conv import escape_filter_chars

from vpnfleet.core import netparse
from vpnfleet.core.directory import DirectoryUser, DirectoryView

IN_CHAIN = "1.2.840.113556.1.4.1941"
AD_ACCOUNT_DISABLED = 0x2  # userAccountControl ACCOUNTDISABLE
PAGE_SIZE = 500
MEMBER_ATTRIBUTES = ("member", "uniqueMember", "memberOf")
FLAVORS = ("openldap", "ad")


class DirectoryError(Exception):
    """The directory could not be read; the message is safe to show (no secrets)."""


@dataclass(frozen=True)
class LdapConfig:
    """How to reach and read the directory (the bind password in clear, only in memory)."""

    url: str
    bind_dn: str
    bind_password: str
    user_bases: tuple[str, ...]
    group_bases: tuple[str, ...]
    group_map: dict[str, str]  # directory group DN or name -> vpnfleet group
    flavor: str = "openldap"
    start_tls: bool = False
    ca_file: str | None = None
    user_filter: str = "(objectClass=inetOrgPerson)"
    group_filter: str = "(|(objectClass=groupOfNames)(objectClass=groupOfUniqueNames))"
    name_attribute: str = "uid"
    email_attribute: str | None = "mail"
    group_name_attribute: str = "cn"
    member_attribute: str = "member"
    disabled_attribute: str | None = None
    disabled_value: str | None = None
    nested: bool = True
    timeout: float = 10.0


@dataclass
class ReadResult:
    view: DirectoryView
    queries: int
    skipped: list[str] = field(default_factory=list)  # entries that were not usable, and why


def check_url(url: str) -> tuple[str, int, bool]:
    """(host, port, use_ssl) of an ldap:// or ldaps:// URL; ValueError otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("ldap", "ldaps") or not parts.hostname:
        raise ValueError(f"{url!r} is not an ldap:// or ldaps:// URL with a host")
    if parts.path not in ("", "/") or parts.query or parts.username:
        raise ValueError(f"{url!r}: give only scheme, host and port (bases are separate)")
    use_ssl = parts.scheme == "ldaps"
    try:
        port = parts.port or (636 if use_ssl else 389)
    except ValueError as exc:
        raise ValueError(f"{url!r} has an invalid port") from exc
    return parts.hostname, port, use_ssl


_DN_SPLIT = re.compile(r"(?<!\\),")


def norm_dn(dn: str) -> str:
    """A DN compared case-insensitively and without spaces around separators."""
    rdns = []
    for rdn in _DN_SPLIT.split(dn):
        attr, _, value = rdn.partition("=")
        rdns.append(f"{attr.strip().lower()}={value.strip().lower()}")
    return ",".join(rdns)


def _values(entry: dict[str, Any], attr: str | None) -> list[str]:
    if not attr:
        return []
    for key, raw in entry.items():
        if key.lower() == attr.lower():
            if isinstance(raw, list | tuple):
                return [v.decode(errors="replace") if isinstance(v, bytes) else str(v) for v in raw]
            return [raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)]
    return []


class _Reader:
    def __init__(self, cfg: LdapConfig) -> None:
        self.cfg = cfg
        self.queries = 0
        self.conn: ldap3.Connection | None = None

    def _fail(self, what: str) -> DirectoryError:
        assert self.conn is not None
        result = self.conn.result or {}
        desc = result.get("description") or "error"
        msg = result.get("message") or ""
        return DirectoryError(f"{what}: {desc}{f' ({msg})' if msg else ''}")

    def connect(self) -> None:
        cfg = self.cfg
        try:
            host, port, use_ssl = check_url(cfg.url)
        except ValueError as exc:
            raise DirectoryError(str(exc)) from None
        try:
            self._open(host, port, use_ssl)
        except LDAPException as exc:
            raise DirectoryError(f"cannot reach the directory at {cfg.url}: {exc}") from None
        except KeyError:
            # ldap3 looks up the answer to its request by message id and raises KeyError when
            # the connection broke before any came (seen once, against a closed port, in a
            # clean-clone run): the directory could not be reached all the same.
            raise DirectoryError(
                f"cannot reach the directory at {cfg.url}: the connection broke before it answered"
            ) from None
        except (OSError, ValueError) as exc:
            # e.g. a CA file that cannot be read on this replica
            raise DirectoryError(f"cannot connect to {cfg.url}: {exc}") from None

    def _open(self, host: str, port: int, use_ssl: bool) -> None:
        cfg = self.cfg
        tls = None
        if use_ssl or cfg.start_tls:
            tls = ldap3.Tls(
                validate=ssl.CERT_REQUIRED,
                ca_certs_file=cfg.ca_file,
                version=ssl.PROTOCOL_TLS_CLIENT,
            )
        server = ldap3.Server(
            host,
            port=port,
            use_ssl=use_ssl,
            tls=tls,
            get_info=ldap3.NONE,
            connect_timeout=cfg.timeout,
        )
        self.conn = ldap3.Connection(
            server,
            user=cfg.bind_dn,
            password=cfg.bind_password,
            auto_bind=ldap3.AUTO_BIND_NONE,
            read_only=True,
            receive_timeout=int(max(1, cfg.timeout)),
            raise_exceptions=False,
            auto_referrals=False,
        )
        self.conn.open()
        if cfg.start_tls and not use_ssl:
            self.queries += 1
            if not self.conn.start_tls():
                raise self._fail(f"StartTLS with {cfg.url} failed")
        self.queries += 1
        if not self.conn.bind():
            result = self.conn.result or {}
            if result.get("description") == "invalidCredentials":
                raise DirectoryError(
                    f"the directory at {cfg.url} refused the bind DN {cfg.bind_dn!r}: "
                    "wrong DN or password (invalidCredentials)"
                )
            raise self._fail(f"binding to {cfg.url} as {cfg.bind_dn!r} failed")

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(LDAPException):
                self.conn.unbind()

    def search(self, base: str, flt: str, attrs: Iterable[str | None]) -> Iterator[dict[str, Any]]:
        """Every entry under `base` matching `flt`, paged (each page counts as a query)."""
        assert self.conn is not None
        cookie: Any = None
        wanted = sorted({a for a in attrs if a})
        while True:
            self.queries += 1
            try:
                ok = self.conn.search(
                    base,
                    flt,
                    search_scope=ldap3.SUBTREE,
                    attributes=wanted or [ldap3.NO_ATTRIBUTES],
                    paged_size=PAGE_SIZE,
                    paged_cookie=cookie,
                    time_limit=int(max(1, self.cfg.timeout)),
                )
            except LDAPException as exc:
                raise DirectoryError(f"searching {base!r} with {flt!r} failed: {exc}") from None
            result = self.conn.result or {}
            if not ok and result.get("description") not in ("success", "noSuchObject"):
                raise self._fail(f"searching {base!r} with {flt!r} failed")
            if result.get("description") == "noSuchObject":
                raise DirectoryError(f"the search base {base!r} does not exist in the directory")
            for item in self.conn.response or []:
                if item.get("type") == "searchResEntry":
                    yield {"dn": item["dn"], **dict(item.get("raw_attributes") or {})}
            controls = result.get("controls") or {}
            cookie = controls.get("1.2.840.113556.1.4.319", {}).get("value", {}).get("cookie")
            if not cookie:
                return


def _is_disabled(cfg: LdapConfig, entry: dict[str, Any]) -> bool:
    if cfg.flavor == "ad":
        for raw in _values(entry, "userAccountControl"):
            try:
                if int(raw) & AD_ACCOUNT_DISABLED:
                    return True
            except ValueError:
                continue
    if cfg.disabled_attribute:
        values = _values(entry, cfg.disabled_attribute)
        if cfg.disabled_value is None:
            return bool(values)
        return any(v.lower() == cfg.disabled_value.lower() for v in values)
    return False


def read_directory(cfg: LdapConfig) -> ReadResult:
    """Read the users and the resolved members of every mapped group (DirectoryError)."""
    reader = _Reader(cfg)
    try:
        reader.connect()
        return _read(cfg, reader)
    finally:
        reader.close()


def _read(cfg: LdapConfig, reader: _Reader) -> ReadResult:
    member_of = cfg.member_attribute == "memberOf"
    in_chain = cfg.flavor == "ad" and cfg.nested
    user_attrs = [cfg.name_attribute, cfg.email_attribute, cfg.disabled_attribute]
    if cfg.flavor == "ad":
        user_attrs.append("userAccountControl")
    if member_of and not in_chain:
        user_attrs.append("memberOf")

    skipped: list[str] = []
    users_by_dn: dict[str, DirectoryUser] = {}
    seen_names: dict[str, str] = {}
    edges: dict[str, set[str]] = defaultdict(set)  # group dn -> direct member dns
    for base in cfg.user_bases:
        for entry in reader.search(base, cfg.user_filter, user_attrs):
            dn = norm_dn(entry["dn"])
            names = _values(entry, cfg.name_attribute)
            if not names:
                skipped.append(f"{entry['dn']}: no {cfg.name_attribute}")
                continue
            name = names[0].strip().lower()
            try:
                netparse.validate_name(name, "user name")
            except ValueError as exc:
                skipped.append(f"{entry['dn']}: {exc}")
                continue
            if name in seen_names and seen_names[name] != dn:
                skipped.append(f"{entry['dn']}: user name {name!r} already taken by another entry")
                continue
            seen_names[name] = dn
            emails = _values(entry, cfg.email_attribute)
            email = emails[0].strip() if emails else None
            if email is not None:
                try:
                    netparse.validate_email(email)
                except ValueError:
                    email = None
            users_by_dn[dn] = DirectoryUser(name, entry["dn"], email, _is_disabled(cfg, entry))
            for group_dn in _values(entry, "memberOf") if member_of else ():
                edges[norm_dn(group_dn)].add(dn)

    group_attrs = [cfg.group_name_attribute]
    if not in_chain:
        group_attrs.append("memberOf" if member_of else cfg.member_attribute)
    groups: dict[str, list[str]] = {}  # dn -> names it may be mapped by (its DN, its name)
    original_dn: dict[str, str] = {}
    for base in cfg.group_bases:
        for entry in reader.search(base, cfg.group_filter, group_attrs):
            dn = norm_dn(entry["dn"])
            original_dn[dn] = entry["dn"]
            groups[dn] = [dn] + [v.lower() for v in _values(entry, cfg.group_name_attribute)]
            if in_chain:
                continue
            if member_of:
                for parent in _values(entry, "memberOf"):
                    edges[norm_dn(parent)].add(dn)
            else:
                edges[dn].update(norm_dn(m) for m in _values(entry, cfg.member_attribute))

    # Which directory groups each vpnfleet group maps from.
    sources: dict[str, set[str]] = defaultdict(set)
    for key, target in cfg.group_map.items():
        wanted = norm_dn(key) if "=" in key else key.lower()
        found = [dn for dn, keys in groups.items() if wanted in keys]
        if not found:
            raise DirectoryError(
                f"the mapped directory group {key!r} was not found under "
                f"{', '.join(repr(b) for b in cfg.group_bases)} with filter {cfg.group_filter!r}"
            )
        if len(found) > 1:
            raise DirectoryError(
                f"the mapped directory group {key!r} matches {len(found)} groups: map it by DN"
            )
        sources[target].add(found[0])

    members: dict[str, frozenset[str]] = {}
    for target in sorted(sources):
        dns: set[str] = set()
        for group_dn in sorted(sources[target]):
            if in_chain:
                dns |= _in_chain_members(cfg, reader, original_dn[group_dn])
            else:
                dns |= _walk(edges, group_dn, cfg.nested)
        members[target] = frozenset(users_by_dn[d].name for d in dns if d in users_by_dn)
    users = {u.name: u for u in users_by_dn.values()}
    return ReadResult(DirectoryView(users, members), reader.queries, skipped)


def _walk(edges: dict[str, set[str]], group_dn: str, nested: bool) -> set[str]:
    """Every member DN of `group_dn`, through member groups when `nested` (cycle-safe)."""
    if not nested:
        return set(edges.get(group_dn, ()))
    seen = {group_dn}
    stack = [group_dn]
    out: set[str] = set()
    while stack:
        for child in edges.get(stack.pop(), ()):
            out.add(child)
            if child not in seen and child in edges:
                seen.add(child)
                stack.append(child)
    return out


def _in_chain_members(cfg: LdapConfig, reader: _Reader, group_dn: str) -> set[str]:
    """Active Directory resolves nesting itself: users whose memberOf chain reaches the group."""
    flt = f"(&{cfg.user_filter}(memberOf:{IN_CHAIN}:={escape_filter_chars(group_dn)}))"
    out: set[str] = set()
    for base in cfg.user_bases:
        out.update(norm_dn(e["dn"]) for e in reader.search(base, flt, []))
    return out
