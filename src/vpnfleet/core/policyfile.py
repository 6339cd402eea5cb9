"""Policy as code: parse, validate, render and diff a YAML policy file.

A policy file names users and groups and states what each should look like::

    version: 1
    users:
      alice: {email: alice@example.com, mode: nat, groups: [devs]}
    groups:
      devs:
        description: Developers
        grants:
          - {destination: 10.10.0.0/16, proto: tcp, ports: "22,443"}

Everything here is pure. Errors carry the line and the dotted field path so that a user sees
`policy.yaml:12: groups.devs.grants[1].ports: port 70000 is out of range 1-65535`.

YAML is read through `yaml.compose` (the node tree, which keeps line marks), never through
`yaml.load`: the node tree also shows duplicate keys, which a plain load silently merges, and
it lets names keep their literal text (`no`, `007` and `10.0.0.1` stay strings).
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from vpnfleet.core import fwlimits, netparse
from vpnfleet.core.netparse import Mode, PortRange, Protocol

VERSION = 1
MAX_SESSIONS = 100
MAX_DESCRIPTION = 500
MAX_PORTS_TEXT = 1000  # the rules.ports column

_NULL = "tag:yaml.org,2002:null"
_BOOL = "tag:yaml.org,2002:bool"
_INT = "tag:yaml.org,2002:int"
_MERGE = "tag:yaml.org,2002:merge"

_ROOT_KEYS = ("version", "users", "groups")
_USER_KEYS = ("email", "mode", "max_sessions", "enabled", "auth_policy", "groups")
_GROUP_KEYS = ("description", "auth_policy", "grants")
# auth_policy in a file (docs/sso.md): a user's own policy, or "inherit" (the groups decide);
# a group's, or "none" (it asks nothing). Left out: not managed by the file, left as it is (an
# older file applied again must not drop a group's single sign-on requirement).
USER_AUTH_POLICIES = ("cert", "cert+sso", "inherit")
GROUP_AUTH_POLICIES = ("cert", "cert+sso", "none")
_GRANT_KEYS = ("destination", "proto", "ports", "description")


# --- the model ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Issue:
    """One problem found in a policy file: where it is and what is wrong."""

    line: int | None
    field: str
    message: str

    def format(self, filename: str, level: str = "") -> str:
        """`file:line: field: message`, the way compilers print it."""
        where = f"{filename}:{self.line}" if self.line else filename
        prefix = f"{level}: " if level else ""
        body = f"{self.field}: {self.message}" if self.field else self.message
        return f"{where}: {prefix}{body}"


class PolicyError(ValueError):
    """The policy file is invalid; `issues` lists every problem, in line order."""

    def __init__(self, filename: str, issues: list[Issue]) -> None:
        self.filename = filename
        self.issues = sorted(issues, key=lambda i: (i.line or 0, i.field))
        first = self.issues[0].format(filename) if self.issues else f"{filename}: invalid"
        more = len(self.issues) - 1
        super().__init__(first + (f" (and {more} more problem(s))" if more > 0 else ""))


@dataclass(frozen=True)
class GrantSpec:
    """Members of a group may reach `destination` over `proto` on `ports` (None = all).

    The policy file's text form, as written and stored; the firewall's form, one per port
    range, is :class:`vpnfleet.core.grants.Grant`.
    """

    destination: str
    proto: Protocol = "any"
    ports: str | None = None
    description: str | None = None
    line: int | None = field(default=None, compare=False)
    # Set when the grant was read from the database: the Rule row it stands for.
    rule_id: int | None = field(default=None, compare=False)

    @property
    def key(self) -> tuple[str, str, str | None]:
        """What makes two grants the same rule (the description does not)."""
        return (self.destination, self.proto, self.ports)

    def label(self) -> str:
        """`10.0.0.0/8 tcp 22,443` for listings."""
        return " ".join(
            p for p in (_short_destination(self.destination), self.proto, self.ports) if p
        )


@dataclass(frozen=True)
class UserSpec:
    """A user as the policy wants it. Fields left out of the file take these defaults."""

    name: str
    email: str | None = None
    mode: Mode = "nat"
    max_sessions: int = 1
    enabled: bool = True
    groups: tuple[str, ...] = ()  # sorted, unique
    auth_policy: str | None = None  # USER_AUTH_POLICIES; None: not managed by the file
    line: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class GroupSpec:
    """A group and its grants (in file order)."""

    name: str
    description: str | None = None
    grants: tuple[GrantSpec, ...] = ()
    auth_policy: str | None = None  # GROUP_AUTH_POLICIES; None: not managed by the file
    line: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Policy:
    """A whole policy: users and groups by name, plus warnings found while parsing."""

    users: Mapping[str, UserSpec] = field(default_factory=dict)
    groups: Mapping[str, GroupSpec] = field(default_factory=dict)
    warnings: tuple[Issue, ...] = field(default=(), compare=False)

    def counts(self) -> dict[str, int]:
        """Sizes for a one-line summary."""
        return {
            "users": len(self.users),
            "groups": len(self.groups),
            "grants": sum(len(g.grants) for g in self.groups.values()),
        }


# --- parsing --------------------------------------------------------------------------------


def _line(node: Node) -> int:
    return int(node.start_mark.line) + 1


def _kind(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    return "null" if node.tag == _NULL else f"{node.value!r}"


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == _NULL


class _Reader:
    """Walks the YAML node tree, collecting every issue instead of stopping at the first."""

    def __init__(self) -> None:
        self.issues: list[Issue] = []
        self._seen: set[int] = set()

    def error(self, node: Node | None, path: str, message: str) -> None:
        self.issues.append(Issue(_line(node) if node is not None else None, path, message))

    def visit(self, node: Node, path: str) -> bool:
        """False (with an issue) for a node reached a second time through a YAML alias.

        compose() shares aliased nodes instead of copying them; refusing them keeps a small
        file from expanding into a huge policy ("billion laughs") and keeps line numbers true.
        """
        if id(node) in self._seen:
            # The shared node only knows where its anchor is, not where the alias is.
            self.error(
                node,
                path,
                f"reuses the value on line {_line(node)} through a YAML alias; "
                "aliases are not supported, write the value out",
            )
            return False
        self._seen.add(id(node))
        return True

    def mapping(
        self, node: Node, path: str, allowed: tuple[str, ...] | None
    ) -> dict[str, tuple[Node, Node]] | None:
        """Key text -> (key node, value node); None if `node` is not a mapping. Null is {}."""
        if _is_null(node):
            return {}
        if not isinstance(node, MappingNode):
            self.error(node, path, f"must be a mapping (key: value), not {_kind(node)}")
            return None
        out: dict[str, tuple[Node, Node]] = {}
        for knode, vnode in node.value:
            if knode.tag == _MERGE:
                self.error(knode, path, "merge keys (<<) are not supported: write the keys out")
                continue
            if not isinstance(knode, ScalarNode):
                self.error(knode, path, "keys must be plain names, not lists or mappings")
                continue
            key = str(knode.value)
            where = f"{path}.{key}" if path else key
            if key in out:
                first = _line(out[key][0])
                self.error(knode, where, f"duplicate key {key!r} (first given on line {first})")
                continue
            if allowed is not None and key not in allowed:
                self.error(knode, where, _unknown_key(key, allowed))
                continue
            out[key] = (knode, vnode)
        return out

    def sequence(self, node: Node, path: str) -> list[Node] | None:
        """The items of a list; None if `node` is not one. Null is []."""
        if _is_null(node):
            return []
        if not isinstance(node, SequenceNode):
            self.error(node, path, f"must be a list, not {_kind(node)}")
            return None
        return list(node.value)

    def text(self, node: Node, path: str) -> str | None:
        """A scalar's literal text (None for null); lists and mappings are an error."""
        if not isinstance(node, ScalarNode):
            self.error(node, path, f"must be text, not {_kind(node)}")
            return None
        if node.tag == _NULL:
            return None
        return str(node.value)

    def integer(self, node: Node, path: str) -> int | None:
        if not isinstance(node, ScalarNode) or node.tag != _INT or not str(node.value).isdigit():
            self.error(node, path, f"must be a whole number, not {_kind(node)}")
            return None
        return int(node.value)

    def boolean(self, node: Node, path: str) -> bool | None:
        if not isinstance(node, ScalarNode) or node.tag != _BOOL:
            self.error(node, path, f"must be true or false, not {_kind(node)}")
            return None
        return str(node.value).lower() in ("true", "yes", "on", "y")

    def check(self, node: Node, path: str, func: Any, *args: Any) -> Any:
        """Run a netparse validator; its ValueError becomes an issue at `node`."""
        try:
            return func(*args)
        except ValueError as exc:
            self.error(node, path, str(exc))
            return None


def _unknown_key(key: str, allowed: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f": use {', '.join(allowed)}"
    return f"unknown key {key!r}{hint}"


def _check_description(text: str) -> str:
    if len(text) > MAX_DESCRIPTION:
        raise ValueError(f"description is longer than {MAX_DESCRIPTION} characters")
    return text


def parse(text: str, filename: str = "policy.yaml") -> Policy:
    """Parse and validate a policy file; raise PolicyError listing every problem."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "syntax error"
        if isinstance(exc, yaml.composer.ComposerError) and "another document" in problem:
            problem = "the file holds more than one document (---); keep everything in one"
        line = int(mark.line) + 1 if mark is not None else None
        raise PolicyError(filename, [Issue(line, "", f"not valid YAML: {problem}")]) from None
    except yaml.YAMLError as exc:
        raise PolicyError(filename, [Issue(None, "", f"not valid YAML: {exc}")]) from None
    if root is None:
        raise PolicyError(filename, [Issue(1, "", "the file is empty: start with 'version: 1'")])
    reader = _Reader()
    policy = _read_policy(reader, root)
    if reader.issues or policy is None:
        raise PolicyError(filename, reader.issues)
    return policy


def _read_policy(r: _Reader, root: Node) -> Policy | None:
    if not isinstance(root, MappingNode):
        r.error(root, "", f"the policy must be a mapping with 'version: 1', not {_kind(root)}")
        return None
    r.visit(root, "")
    top = r.mapping(root, "", _ROOT_KEYS)
    if top is None:
        return None
    if "version" not in top:
        r.error(root, "version", f"is missing: add 'version: {VERSION}' at the top")
    else:
        vnode = top["version"][1]
        if not (isinstance(vnode, ScalarNode) and vnode.tag == _INT and vnode.value == "1"):
            shown = vnode.value if isinstance(vnode, ScalarNode) else _kind(vnode)
            r.error(
                vnode,
                "version",
                f"unsupported version {shown}: this vpnfleet reads version {VERSION}",
            )
    groups: dict[str, GroupSpec] = {}
    if "groups" in top:
        node = top["groups"][1]
        entries = r.mapping(node, "groups", None) if r.visit(node, "groups") else None
        for name, (knode, vnode) in (entries or {}).items():
            group = _read_group(r, name, knode, vnode)
            if group is not None:
                groups[name] = group
    users: dict[str, UserSpec] = {}
    if "users" in top:
        node = top["users"][1]
        entries = r.mapping(node, "users", None) if r.visit(node, "users") else None
        # Group names are checked against every group key in the file, even ones that had
        # errors, so that one typo does not cascade into "undefined group" noise.
        defined = _group_keys(top.get("groups"))
        for name, (knode, vnode) in (entries or {}).items():
            user = _read_user(r, name, knode, vnode, defined)
            if user is not None:
                users[name] = user
    overflow = fwlimits.check(
        {
            g.name: fwlimits.rules_elements((a.destination, a.proto, a.ports) for a in g.grants)
            for g in groups.values()
        },
        groups,
    )
    if overflow is not None:
        # The file alone: the server checks the result of applying it against what it holds.
        group = groups[overflow.group]
        r.issues.append(Issue(group.line, f"groups.{group.name}.grants", overflow.message()))
    warnings = tuple(itertools.chain.from_iterable(_overlaps(g) for g in groups.values()))
    return Policy(users=users, groups=groups, warnings=warnings)


def _group_keys(entry: tuple[Node, Node] | None) -> set[str]:
    if entry is None or not isinstance(entry[1], MappingNode):
        return set()
    return {str(k.value) for k, _ in entry[1].value if isinstance(k, ScalarNode)}


def _read_user(
    r: _Reader, name: str, knode: Node, vnode: Node, defined: set[str]
) -> UserSpec | None:
    path = f"users.{name}"
    ok = r.check(knode, path, netparse.validate_name, name, "user name") is not None
    if not r.visit(vnode, path):
        return None
    fields = r.mapping(vnode, path, _USER_KEYS)
    if fields is None:
        return None
    before = len(r.issues)
    values: dict[str, Any] = {}
    if "email" in fields:
        node = fields["email"][1]
        raw = r.text(node, f"{path}.email")
        values["email"] = (
            r.check(node, f"{path}.email", netparse.validate_email, raw) if raw else None
        )
    if "mode" in fields:
        node = fields["mode"][1]
        raw = r.text(node, f"{path}.mode")
        if raw is None and _is_null(node):
            r.error(node, f"{path}.mode", "must be nat or gateway, not null")
        elif raw is not None:
            values["mode"] = r.check(node, f"{path}.mode", netparse.parse_mode, raw)
    if "max_sessions" in fields:
        node = fields["max_sessions"][1]
        count = r.integer(node, f"{path}.max_sessions")
        if count is not None and not 1 <= count <= MAX_SESSIONS:
            r.error(node, f"{path}.max_sessions", f"{count} is out of range 1-{MAX_SESSIONS}")
        values["max_sessions"] = count
    if "enabled" in fields:
        values["enabled"] = r.boolean(fields["enabled"][1], f"{path}.enabled")
    if "auth_policy" in fields:
        values["auth_policy"] = _auth_policy(r, fields["auth_policy"][1], path, USER_AUTH_POLICIES)
    groups: list[str] = []
    if "groups" in fields:
        node = fields["groups"][1]
        items = r.sequence(node, f"{path}.groups") if r.visit(node, f"{path}.groups") else None
        seen: dict[str, int] = {}
        for i, item in enumerate(items or []):
            where = f"{path}.groups[{i}]"
            gname = r.text(item, where)
            if gname is None:
                if _is_null(item):
                    r.error(item, where, "must be a group name, not null")
                continue
            if gname in seen:
                r.error(
                    item, where, f"group {gname!r} is listed twice (also groups[{seen[gname]}])"
                )
                continue
            seen[gname] = i
            if gname not in defined:
                r.error(item, where, f"group {gname!r} is not defined under 'groups'")
                continue
            groups.append(gname)
    if not ok or len(r.issues) > before:
        return None
    return UserSpec(
        name=name,
        email=values.get("email"),
        mode=values.get("mode", "nat"),
        max_sessions=values.get("max_sessions", 1),
        enabled=values.get("enabled", True),
        groups=tuple(sorted(groups)),
        auth_policy=values.get("auth_policy"),
        line=_line(knode),
    )


def _auth_policy(r: _Reader, node: Node, path: str, allowed: tuple[str, ...]) -> str | None:
    where = f"{path}.auth_policy"
    raw = r.text(node, where)
    if raw is None or raw not in allowed:
        shown = "null" if raw is None and _is_null(node) else repr(raw)
        r.error(node, where, f"must be one of {', '.join(allowed)}, not {shown}")
        return None
    return raw


def _read_group(r: _Reader, name: str, knode: Node, vnode: Node) -> GroupSpec | None:
    path = f"groups.{name}"
    ok = r.check(knode, path, netparse.validate_name, name, "group name") is not None
    if not r.visit(vnode, path):
        return None
    fields = r.mapping(vnode, path, _GROUP_KEYS)
    if fields is None:
        return None
    before = len(r.issues)
    description = None
    if "description" in fields:
        node = fields["description"][1]
        raw = r.text(node, f"{path}.description")
        # "" stays "": the API accepts empty descriptions, and export must round-trip them.
        description = (
            r.check(node, f"{path}.description", _check_description, raw)
            if raw is not None
            else None
        )
    auth_policy = None
    if "auth_policy" in fields:
        auth_policy = _auth_policy(r, fields["auth_policy"][1], path, GROUP_AUTH_POLICIES)
    grants: list[GrantSpec] = []
    if "grants" in fields:
        node = fields["grants"][1]
        items = r.sequence(node, f"{path}.grants") if r.visit(node, f"{path}.grants") else None
        first_of: dict[tuple[str, str, str | None], int] = {}
        for i, item in enumerate(items or []):
            where = f"{path}.grants[{i}]"
            grant = _read_grant(r, where, item)
            if grant is None:
                continue
            if grant.key in first_of:
                r.error(item, where, f"duplicate grant: same as grants[{first_of[grant.key]}]")
                continue
            first_of[grant.key] = i
            grants.append(grant)
    if not ok or len(r.issues) > before:
        return None
    return GroupSpec(
        name=name,
        description=description,
        grants=tuple(grants),
        auth_policy=auth_policy,
        line=_line(knode),
    )


def _read_grant(r: _Reader, path: str, node: Node) -> GrantSpec | None:
    if not r.visit(node, path):
        return None
    if _is_null(node):
        r.error(node, path, "must be a mapping with a destination, not null")
        return None
    fields = r.mapping(node, path, _GRANT_KEYS)
    if fields is None:
        return None
    before = len(r.issues)
    destination = None
    if "destination" not in fields:
        r.error(node, path, "destination is missing: give an IPv4 address or CIDR")
    else:
        dnode = fields["destination"][1]
        raw = r.text(dnode, f"{path}.destination")
        net = r.check(dnode, f"{path}.destination", netparse.parse_destination, raw or "")
        destination = str(net) if net is not None else None
    proto: Protocol = "any"
    if "proto" in fields:
        pnode = fields["proto"][1]
        raw = r.text(pnode, f"{path}.proto")
        parsed = r.check(pnode, f"{path}.proto", netparse.parse_protocol, raw or "")
        proto = parsed or proto
    ranges: tuple[PortRange, ...] = ()
    if "ports" in fields:
        ports_node = fields["ports"][1]
        spec = _ports_text(r, ports_node, f"{path}.ports")
        if spec is not None:
            try:
                ranges = netparse.parse_ports(spec)
            except ValueError as exc:
                # The field path already says where; drop netparse's "in '<spec>'" echo.
                r.error(ports_node, f"{path}.ports", str(exc).replace(f" in {spec!r}", ""))
            else:
                r.check(
                    ports_node, f"{path}.ports", netparse.check_ports_for_protocol, proto, ranges
                )
                if len(netparse.format_ports(ranges) or "") > MAX_PORTS_TEXT:
                    r.error(
                        ports_node,
                        f"{path}.ports",
                        f"too many port ranges: the list may be at most {MAX_PORTS_TEXT} "
                        "characters; merge neighbours into ranges",
                    )
    description = None
    if "description" in fields:
        dnode = fields["description"][1]
        raw = r.text(dnode, f"{path}.description")
        description = (
            r.check(dnode, f"{path}.description", _check_description, raw)
            if raw is not None
            else None
        )
    if destination is None or len(r.issues) > before:
        return None
    return GrantSpec(
        destination=destination,
        proto=proto,
        ports=netparse.format_ports(ranges),
        description=description,
        line=_line(node),
    )


def _ports_text(r: _Reader, node: Node, path: str) -> str | None:
    """Ports as one spec string: `22`, `"22,443,8000-8100"` or a list of those."""
    if _is_null(node):
        return None
    if isinstance(node, SequenceNode):
        if not r.visit(node, path):
            return None
        parts = []
        for i, item in enumerate(node.value):
            text = r.text(item, f"{path}[{i}]")
            if text is None:
                return None
            parts.append(text)
        return ",".join(parts) if parts else None
    # Literal text, not the YAML value: `22:30` would otherwise be the base-60 integer 1350.
    return r.text(node, path)


def _protocols_meet(a: str, b: str) -> bool:
    return a == b or "any" in (a, b)


def _ports_meet(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return True
    ra, rb = netparse.parse_ports(a), netparse.parse_ports(b)
    return any(x.lo <= y.hi and y.lo <= x.hi for x in ra for y in rb)


def _overlaps(group: GroupSpec) -> list[Issue]:
    """Warn when two grants of one group cover some of the same traffic.

    Overlapping networks alone are normal (ping all of 10/8, ssh to one /16), so the warning
    needs the protocols and ports to meet as well: then one grant is at least partly redundant.
    """
    out: list[Issue] = []
    for (i, a), (j, b) in itertools.combinations(enumerate(group.grants), 2):
        na, nb = ipaddress.IPv4Network(a.destination), ipaddress.IPv4Network(b.destination)
        if na.overlaps(nb) and _protocols_meet(a.proto, b.proto) and _ports_meet(a.ports, b.ports):
            out.append(
                Issue(
                    b.line,
                    f"groups.{group.name}.grants[{j}]",
                    f"{b.label()} overlaps grants[{i}] ({a.label()}): "
                    "some traffic is granted twice",
                )
            )
    return out


# --- rendering ------------------------------------------------------------------------------


class _Flow(dict[str, Any]):
    """A mapping written on one line, `{key: value, ...}`."""


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True  # parse() refuses aliases, so render must never write one


def _represent_flow(dumper: yaml.SafeDumper, data: _Flow) -> yaml.MappingNode:
    return dumper.represent_mapping("tag:yaml.org,2002:map", list(data.items()), flow_style=True)


_Dumper.add_representer(_Flow, _represent_flow)


def _short_destination(destination: str) -> str:
    return destination.removesuffix("/32")


def render(policy: Policy) -> str:
    """The policy as YAML in the file format; `parse(render(p)) == p`."""
    users: dict[str, Any] = {}
    for name in sorted(policy.users):
        u = policy.users[name]
        entry = _Flow()
        if u.email is not None:
            entry["email"] = u.email
        entry.update(mode=u.mode, max_sessions=u.max_sessions, enabled=u.enabled)
        if u.auth_policy is not None:
            entry["auth_policy"] = u.auth_policy
        entry["groups"] = list(u.groups)
        users[name] = entry
    groups: dict[str, Any] = {}
    for name in sorted(policy.groups):
        g = policy.groups[name]
        gentry: dict[str, Any] = {}
        if g.description is not None:
            gentry["description"] = g.description
        if g.auth_policy is not None:
            gentry["auth_policy"] = g.auth_policy
        gentry["grants"] = [_grant_entry(gr) for gr in g.grants]
        groups[name] = gentry
    doc = {"version": VERSION, "users": users, "groups": groups}
    return yaml.dump(
        doc,
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
        width=10_000,
    )


def _grant_entry(grant: GrantSpec) -> _Flow:
    entry = _Flow(destination=_short_destination(grant.destination), proto=grant.proto)
    if grant.ports is not None:
        entry["ports"] = grant.ports
    if grant.description is not None:
        entry["description"] = grant.description
    return entry


# --- diffing --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldChange:
    """One field of an object that changes from `old` to `new`."""

    field: str
    old: Any
    new: Any


@dataclass(frozen=True)
class Update:
    """An object that exists on both sides but differs."""

    name: str
    changes: tuple[FieldChange, ...]


@dataclass(frozen=True)
class GroupRef:
    name: str
    description: str | None = None
    auth_policy: str | None = None  # as in the file (None: not set there)


@dataclass(frozen=True)
class MembershipRef:
    group: str
    user: str


@dataclass(frozen=True)
class GrantRef:
    """A grant of a group; `rule_id` names the existing Rule row (None for new grants)."""

    group: str
    destination: str
    proto: str
    ports: str | None
    description: str | None = None
    rule_id: int | None = None
    changes: tuple[FieldChange, ...] = ()


@dataclass
class PolicyDiff:
    """What applying a policy would change, per object kind; every list is sorted."""

    users_created: list[UserSpec] = field(default_factory=list)
    users_updated: list[Update] = field(default_factory=list)
    users_deleted: list[str] = field(default_factory=list)
    groups_created: list[GroupRef] = field(default_factory=list)
    groups_updated: list[Update] = field(default_factory=list)
    groups_deleted: list[str] = field(default_factory=list)
    memberships_added: list[MembershipRef] = field(default_factory=list)
    memberships_removed: list[MembershipRef] = field(default_factory=list)
    grants_added: list[GrantRef] = field(default_factory=list)
    grants_updated: list[GrantRef] = field(default_factory=list)
    grants_removed: list[GrantRef] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """How many objects each list holds, keyed like the attributes."""
        return {name: len(getattr(self, name)) for name in self.__dataclass_fields__}

    @property
    def empty(self) -> bool:
        return not any(self.counts().values())

    def summary(self) -> str:
        """One line for people: `2 users created, 1 grant removed` or `no changes`."""
        parts = []
        for name, n in self.counts().items():
            if n:
                kind, verb = name.split("_")
                noun = kind if n > 1 else kind.removesuffix("s")
                parts.append(f"{n} {noun} {verb}")
        return ", ".join(parts) or "no changes"


def _managed(spec: UserSpec | GroupSpec) -> list[str]:
    """The optional fields the file sets (compared only then)."""
    return ["auth_policy"] if spec.auth_policy is not None else []


def _field_changes(old: object, new: object, names: Iterable[str]) -> tuple[FieldChange, ...]:
    return tuple(
        FieldChange(n, getattr(old, n), getattr(new, n))
        for n in names
        if getattr(old, n) != getattr(new, n)
    )


def diff(current: Policy, desired: Policy, prune: bool = False) -> PolicyDiff:
    """What must change so that `current` matches `desired`.

    The policy manages what it names. A membership is managed only when both its user and its
    group are in `desired`; without `prune`, users and groups missing from `desired` (and their
    memberships) are left alone; with `prune` they are deleted.
    """
    out = PolicyDiff()
    for name in sorted(desired.groups):
        want = desired.groups[name]
        have = current.groups.get(name)
        if have is None:
            out.groups_created.append(GroupRef(name, want.description, want.auth_policy))
        else:
            changes = _field_changes(have, want, ["description", *_managed(want)])
            if changes:
                out.groups_updated.append(Update(name, changes))
        existing = {g.key: g for g in have.grants} if have else {}
        for grant in want.grants:
            old = existing.get(grant.key)
            if old is None:
                out.grants_added.append(_grant_ref(name, grant))
            elif old.description != grant.description:
                changes = _field_changes(old, grant, ["description"])
                ref = _grant_ref(name, grant, old.rule_id)
                out.grants_updated.append(dataclasses.replace(ref, changes=changes))
        wanted = {g.key for g in want.grants}
        for grant in have.grants if have else ():
            if grant.key not in wanted:
                out.grants_removed.append(_grant_ref(name, grant, grant.rule_id))
    for name in sorted(desired.users):
        want_user = desired.users[name]
        have_user = current.users.get(name)
        if have_user is None:
            out.users_created.append(want_user)
            out.memberships_added.extend(MembershipRef(g, name) for g in want_user.groups)
            continue
        changes = _field_changes(
            have_user,
            want_user,
            ["email", "mode", "max_sessions", "enabled", *_managed(want_user)],
        )
        if changes:
            out.users_updated.append(Update(name, changes))
        managed = {g for g in have_user.groups if g in desired.groups}
        out.memberships_added.extend(
            MembershipRef(g, name) for g in sorted(set(want_user.groups) - managed)
        )
        out.memberships_removed.extend(
            MembershipRef(g, name) for g in sorted(managed - set(want_user.groups))
        )
    if prune:
        out.users_deleted = sorted(set(current.users) - set(desired.users))
        out.groups_deleted = sorted(set(current.groups) - set(desired.groups))
    out.memberships_added.sort(key=lambda m: (m.group, m.user))
    out.memberships_removed.sort(key=lambda m: (m.group, m.user))
    return out


def _grant_ref(group: str, grant: GrantSpec, rule_id: int | None = None) -> GrantRef:
    return GrantRef(
        group=group,
        destination=grant.destination,
        proto=grant.proto,
        ports=grant.ports,
        description=grant.description,
        rule_id=rule_id,
    )
