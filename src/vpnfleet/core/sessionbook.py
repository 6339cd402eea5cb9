"""Who is connected to this pod: the session book. Pure (no I/O, no clock, no randomness).

The agent keeps one :class:`SessionBook`. It holds every client OpenVPN told the agent about,
from CONNECT until DISCONNECT: user, mode, tunnel address, real address, session uid, the
certificate serial it connected with; which session owns each tunnel address (flow and denied
packet attribution); and the NAT address allocator. A client's *groups* are not copied here:
they are always the user's current groups in the fleet view, so a membership change reaches
connected clients by construction.

Every operation returns what happened; the caller (``agent/clients.py``) does the I/O: answers
OpenVPN, spools session records, appends to the client journal, pokes the firewall. The session
uid and the clock are passed in, so every decision here is reproducible in a unit test.

Convergence: :meth:`SessionBook.violations` compares the clients with a fleet view and names
every client that must go (account deleted or disabled, certificate replaced, mode changed,
session killed by the control plane). It is level-triggered: the agent calls it after every
change, after a resync and after adopting clients at start, so a kill or a disable made while
the agent was down still ends the session once the agent learns of it.

One book for every OpenVPN server of the pod: a pod runs a UDP server and (unless turned off)
a TCP one, each with its own client ids, tunnel device and half of the NAT pool
(:func:`ipam.server_pools`). A client is known by ``(server, cid)``; limits, replacements,
kills and address owners are the book's, so they hold across both servers.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vpnfleet.core import authz, ipam, webauth
from vpnfleet.core.fleet import FleetView
from vpnfleet.core.mgmt_protocol import StatusClient

MODE_CHANGED = "connection mode changed"
SSO_LAPSED = "single sign-on session lifetime over"
PRIMARY = "udp"  # the server every pod runs; "tcp" is the optional fallback


@dataclass(frozen=True)
class Client:
    """One client of this pod's OpenVPN, from CONNECT until DISCONNECT.

    ``seq`` orders clients by admission: a status listing taken before a client was admitted
    cannot say that client is gone. ``kicked`` holds the reason once the agent told OpenVPN to
    drop the client (it stays here, not established, until OpenVPN reports the DISCONNECT).
    """

    cid: int
    user: str
    mode: str
    tunnel_ip: str
    real_ip: str | None
    real_port: int | None
    uid: str
    connected_at: str  # ISO 8601, UTC
    cert_serial: str | None = None
    established: bool = False
    kicked: str | None = None
    seq: int = 0
    server: str = PRIMARY
    # A single sign-on user's session ends then (Unix seconds): the login's time plus the
    # session lifetime (BookConfig.sso_lifetime). None: no end of its own.
    sso_until: float | None = None

    @property
    def key(self) -> tuple[str, int]:
        """The client's identity in the book: OpenVPN's cid is unique per server only."""
        return (self.server, self.cid)

    def with_state(self, *, established: bool, kicked: str | None) -> Client:
        """A copy with another life-cycle state (``dataclasses.replace`` costs ~10x more, and
        this runs for every connect)."""
        return Client(
            self.cid, self.user, self.mode, self.tunnel_ip, self.real_ip, self.real_port,
            self.uid, self.connected_at, self.cert_serial, established, kicked, self.seq,
            self.server, self.sso_until,
        )  # fmt: skip

    def to_record(self) -> dict[str, Any]:
        """JSON-ready form for the client journal (written per connect: kept cheap, no
        ``dataclasses.asdict``, which costs ~10x more)."""
        return {
            "cid": self.cid,
            "user": self.user,
            "mode": self.mode,
            "tunnel_ip": self.tunnel_ip,
            "real_ip": self.real_ip,
            "real_port": self.real_port,
            "uid": self.uid,
            "connected_at": self.connected_at,
            "cert_serial": self.cert_serial,
            "established": self.established,
            "server": self.server,
            "sso_until": self.sso_until,
        }

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> Client:
        """Inverse of :meth:`to_record`; raises ValueError on anything malformed."""
        try:
            client = cls(
                cid=int(data["cid"]),
                user=str(data["user"]),
                mode=str(data["mode"]),
                tunnel_ip=str(ipaddress.IPv4Address(data["tunnel_ip"])),
                real_ip=None if data.get("real_ip") is None else str(data["real_ip"]),
                real_port=None if data.get("real_port") is None else int(data["real_port"]),
                uid=str(data["uid"]),
                connected_at=str(data["connected_at"]),
                cert_serial=None if data.get("cert_serial") is None else str(data["cert_serial"]),
                established=bool(data["established"]),
                # Journals written before the TCP server existed hold UDP clients only.
                server=str(data.get("server") or PRIMARY),
                sso_until=None if data.get("sso_until") is None else float(data["sso_until"]),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed client record: {exc!r}") from None
        if not client.uid or not client.user:
            raise ValueError("malformed client record: empty uid or user")
        return client


@dataclass(frozen=True)
class BookConfig:
    """What the book needs to know about the pod: its address pools, pushed routes and
    OpenVPN servers (``servers``, primary first; the NAT pool is split between them)."""

    nat_pool: ipaddress.IPv4Network
    gateway_pool: ipaddress.IPv4Network | None = None
    push_routes: tuple[ipaddress.IPv4Network, ...] = ()
    servers: tuple[str, ...] = (PRIMARY,)
    # The servers hand out auth tokens (auth-gen-token): a renegotiation of a single sign-on
    # user must present a valid one.
    auth_tokens: bool = False
    # Seconds a single sign-on login lasts (the tokens' lifetime): a session of a `cert+sso`
    # user is ended that long after its login (lapsed()), not at the next renegotiation.
    sso_lifetime: int | None = None

    def __post_init__(self) -> None:
        if not self.servers or len(set(self.servers)) != len(self.servers):
            raise ValueError(f"servers must be distinct and at least one: {self.servers}")
        ipam.server_pools(self.nat_pool, len(self.servers))  # too small to split: ValueError

    def server_pool(self, server: str) -> ipaddress.IPv4Network:
        """The part of the NAT pool whose addresses ``server`` hands out."""
        return ipam.server_pools(self.nat_pool, len(self.servers))[self.servers.index(server)]

    @property
    def tunnel_networks(self) -> tuple[ipaddress.IPv4Network, ...]:
        """Every network a client address comes from."""
        return (self.nat_pool,) + ((self.gateway_pool,) if self.gateway_pool else ())


@dataclass(frozen=True)
class Kick:
    """A client the agent must disconnect: ``halt`` tells the client not to come back."""

    client: Client
    reason: str
    halt: bool = True


@dataclass(frozen=True)
class ConnectOutcome:
    """What to answer a CONNECT or REAUTH.

    ``decision.allow`` False: answer ``client-deny`` with the decision's reasons (and, for a
    REAUTH of a known client, ``ended`` is that client, whose session is over). Otherwise
    answer ``client-auth`` with ``push``, after disconnecting ``replaced`` (the same device's
    previous connections). ``client`` is the admitted client (None for a REAUTH).
    """

    decision: authz.Decision
    push: tuple[str, ...] = ()
    client: Client | None = None
    replaced: tuple[Client, ...] = ()
    ended: Client | None = None


@dataclass(frozen=True)
class Reconciled:
    """What comparing OpenVPN's client list with the book found.

    ``vanished``: established clients OpenVPN no longer has (a DISCONNECT was missed); their
    sessions are over. ``adopted``: clients OpenVPN has and the book did not (the agent
    restarted); their sessions continue (same uid when the journal knew them), and
    :meth:`SessionBook.violations` then judges them like every other client. ``restart``:
    clients whose CONNECT was never answered (sent while no agent listened), seen twice: ask
    them to reconnect.
    """

    vanished: tuple[Client, ...] = ()
    adopted: tuple[Client, ...] = ()
    restart: tuple[int, ...] = ()


class SessionBook:
    """The clients of one pod, their addresses, and who owns each tunnel address."""

    def __init__(self, config: BookConfig) -> None:
        self.config = config
        self._clients: dict[tuple[str, int], Client] = {}
        self._by_user: dict[str, set[tuple[str, int]]] = {}
        self._owners: dict[str, tuple[str, str]] = {}  # tunnel IP -> (user, session uid)
        self._nat = {s: ipam.AddressAllocator(config.server_pool(s)) for s in config.servers}
        self._seq = 0
        self._unanswered: set[tuple[str, int]] = set()

    # ------------------------------------------------------------------ reading

    def __len__(self) -> int:
        return len(self._clients)

    def __iter__(self) -> Iterator[Client]:
        return iter(list(self._clients.values()))

    def get(self, cid: int, server: str = PRIMARY) -> Client | None:
        """The client with OpenVPN client id ``cid`` on ``server``, if any."""
        return self._clients.get((server, cid))

    def established(self) -> list[Client]:
        """Clients whose tunnel is up and whose session is live."""
        return [c for c in self._clients.values() if c.established]

    def by_uid(self, uid: str) -> list[Client]:
        """Clients of the session ``uid`` (one, or none)."""
        return [c for c in self._clients.values() if c.uid == uid]

    def of_users(self, users: Iterable[str]) -> list[Client]:
        """Clients of the given users."""
        out: list[Client] = []
        for user in users:
            out += [self._clients[key] for key in self._by_user.get(user, ())]
        return out

    def owner(self, tunnel_ip: str) -> tuple[str, str] | None:
        """(user, session uid) of the session holding ``tunnel_ip`` now."""
        return self._owners.get(tunnel_ip)

    @property
    def seq(self) -> int:
        """Admissions so far; pass it to :meth:`reconcile` with a listing taken after it."""
        return self._seq

    # ------------------------------------------------------------------ decisions

    def connect(
        self,
        view: FleetView,
        cid: int,
        env: Mapping[str, str],
        *,
        reauth: bool,
        uid: str,
        now: str,
        server: str = PRIMARY,
        signed_in: bool = False,
    ) -> ConnectOutcome:
        """Decide a CONNECT (new client) or REAUTH (TLS renegotiation) and record the result.
        ``signed_in``: this connection's single sign-on login succeeded (``authz.decide``).

        The same device reconnecting (same user, same public address) replaces its previous
        connections, which OpenVPN may keep for seconds or until a ping timeout: they do not
        count against the session limit. Clients already being disconnected do not count
        either. Raises nothing: an exhausted NAT pool is a deny. Sessions on every server of
        the pod count: the same device falling back from UDP to TCP replaces its UDP client.
        """
        key = (server, cid)
        cn = env.get("common_name", "")
        serial = env.get("tls_serial_0")
        real_ip = env.get("untrusted_ip") or None
        mine = [c for c in self.of_users([cn]) if c.key != key and c.kicked is None]
        stale = [] if reauth or real_ip is None else [c for c in mine if c.real_ip == real_ip]
        local = len(mine) - len(stale)
        superseded = {c.uid for c in stale} | {
            s.uid
            for s in view.sessions.values()
            if s.user == cn and real_ip is not None and s.real_ip == real_ip
        }
        # OpenVPN's verdict on the auth token the client presented (auth-gen-token with
        # external-auth). At CONNECT only "Authenticated" for the certificate's own user name
        # stands for a single sign-on login, on whichever pod: OpenVPN signed that token for
        # the name the client sent when it was handed out (profiles name their user,
        # ovpn_config.render_client_profile). "AuthenticatedEmptyUser" is a token made for
        # no name (an older profile): it would be good with any certificate, so it is not.
        # At REAUTH the TLS session goes on and only the token's age matters: with tokens
        # on, a client that presents none (a modified one) or an expired one is cut.
        session_state = env.get("session_state", "")
        token_valid = session_state == "Authenticated" and env.get("username") == cn
        signed_in_at = None
        if token_valid and self.config.sso_lifetime:
            signed_in_at = webauth.token_signed_in_at(env.get("password"))
        if reauth:
            token_lapsed = self.config.auth_tokens and session_state not in (
                "Authenticated",
                "AuthenticatedEmptyUser",
            )
        else:
            # A CONNECT with a token that ran out must not be sent to log in: OpenVPN would
            # carry the old token's first-issue time into the token it hands out after the
            # login (auth_token.c), so that token would be expired from the start and the
            # next renegotiation would cut the user again. Refused, the client drops its
            # token and comes straight back without one: a fresh login, a fresh token. A
            # token OpenVPN still takes but whose login is older than the lifetime (the
            # lifetime was shortened, or a second's rounding) is refused the same way.
            token_lapsed = self.config.auth_tokens and (
                session_state in ("Expired", "ExpiredEmptyUser")
                or (
                    signed_in_at is not None
                    and self.config.sso_lifetime is not None
                    and signed_in_at + self.config.sso_lifetime <= _unix(now)
                )
            )
        decision = authz.decide(
            view,
            cn,
            serial,
            local,
            frozenset(superseded),
            reauth=reauth,
            signed_in=signed_in or token_valid,
            token_expired=token_lapsed,
        )
        known = self._clients.get(key)
        if reauth:
            if decision.allow or known is None:
                return ConnectOutcome(decision)
            return ConnectOutcome(decision, ended=self.kick(cid, decision.reason, server))
        if not decision.allow:
            self.forget(cid, server)
            return ConnectOutcome(decision)
        user = decision.user
        assert user is not None
        try:
            address = self._address_for(user.mode, user.gateway_address, server)
        except ipam.PoolExhausted:
            self.forget(cid, server)
            return ConnectOutcome(authz.Decision(False, "address pool exhausted", "server full"))
        if known is not None:  # a CONNECT for a cid we hold: OpenVPN restarted the instance
            self.forget(cid, server)
        port = env.get("untrusted_port", "")
        self._seq += 1
        sso_until = None
        if user.auth == "cert+sso" and self.config.sso_lifetime:
            # Logged in now, or when the token it presents was first issued.
            at = signed_in_at if signed_in_at is not None else _unix(now)
            sso_until = float(at + self.config.sso_lifetime)
        client = Client(
            cid=cid,
            user=cn,
            mode=user.mode,
            tunnel_ip=str(address),
            real_ip=real_ip,
            real_port=int(port) if port.isdigit() and int(port) <= 65535 else None,
            uid=uid,
            connected_at=now,
            cert_serial=serial,
            seq=self._seq,
            server=server,
            sso_until=sso_until,
        )
        self._put(client)
        push = self._push_lines(user.mode, address, server)
        return ConnectOutcome(decision, push=push, client=client, replaced=tuple(stale))

    def _address_for(
        self, mode: str, gateway_address: str | None, server: str
    ) -> ipaddress.IPv4Address:
        if mode == "gateway" and gateway_address:
            return ipaddress.IPv4Address(gateway_address)
        return self._nat[server].allocate()

    def _push_lines(
        self, mode: str, address: ipaddress.IPv4Address, server: str
    ) -> tuple[str, ...]:
        own = self.config.server_pool(server)
        pool = own
        if mode == "gateway" and self.config.gateway_pool is not None:
            pool = self.config.gateway_pool
        lines = [f"ifconfig-push {address} {pool.netmask}"]
        if pool != own:
            # The gateway pool is another subnet: the client's next hop must be on it.
            lines.append(f'push "route-gateway {ipam.server_address(pool)}"')
        for net in self.config.push_routes:
            lines.append(f'push "route {net.network_address} {net.netmask}"')
        return tuple(lines)

    # ------------------------------------------------------------------ life cycle

    def establish(self, cid: int, server: str = PRIMARY) -> Client | None:
        """ESTABLISHED: the tunnel is up. Returns the client, or None if unknown or kicked."""
        client = self._clients.get((server, cid))
        if client is None or client.kicked is not None or client.established:
            return None
        client = client.with_state(established=True, kicked=None)
        self._put(client)
        return client

    def kick(self, cid: int, reason: str, server: str = PRIMARY) -> Client | None:
        """The agent disconnects ``cid``. Returns the client if its session was live (now over).

        The client stays in the book (its address stays taken) until OpenVPN reports the
        DISCONNECT, but it no longer holds its tunnel address for the firewall.
        """
        client = self._clients.get((server, cid))
        if client is None or client.kicked is not None:
            return None
        was_live = client.established
        self._put(client.with_state(established=False, kicked=reason))
        return client if was_live else None

    def forget(self, cid: int, server: str = PRIMARY) -> Client | None:
        """DISCONNECT (or a CONNECT that was refused): drop the client, free its address.

        Returns the client as it was; its session was live only if ``established``.
        """
        key = (server, cid)
        client = self._clients.pop(key, None)
        if client is None:
            return None
        keys = self._by_user.get(client.user)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_user[client.user]
        self._drop_owner(client)
        if client.mode == "nat":
            self._nat[server].release(ipaddress.IPv4Address(client.tunnel_ip))
        return client

    def clear(self, server: str | None = None) -> list[Client]:
        """OpenVPN (``server``, or every one) started afresh: its clients are gone.

        Returns the established ones.
        """
        gone = [c for c in self._clients.values() if server is None or c.server == server]
        for client in gone:
            self.forget(client.cid, client.server)
        if server is None:
            self._owners.clear()  # journal owners seeded for clients never adopted
        for s in self._nat if server is None else (server,):
            self._nat[s] = ipam.AddressAllocator(self.config.server_pool(s))
        self._unanswered = {k for k in self._unanswered if server is not None and k[0] != server}
        return [c for c in gone if c.established]

    def _put(self, client: Client) -> None:
        self._clients[client.key] = client
        self._by_user.setdefault(client.user, set()).add(client.key)
        if client.established:
            self._owners[client.tunnel_ip] = (client.user, client.uid)
        else:
            self._drop_owner(client)

    def release_owner(self, client: Client) -> None:
        """``client`` (from the journal) will not be adopted: its address has no owner now."""
        self._drop_owner(client)

    def _drop_owner(self, client: Client) -> None:
        # Only if the address is still this session's (a later session may hold it now).
        owner = self._owners.get(client.tunnel_ip)
        if owner is not None and owner[1] == client.uid:
            del self._owners[client.tunnel_ip]

    def gateway_routes(self) -> dict[str, str]:
        """Gateway addresses that need a host route into a server other than the primary.

        The gateway pool is routed into the primary (UDP) server's tunnel device. A gateway
        user connected to another server needs its ``/32`` routed into that server's device
        (address -> server). When one address is live on two servers (a user allowed several
        sessions), its newest session gets the route: that is the one the user last brought up.
        """
        newest: dict[str, Client] = {}
        servers: dict[str, set[str]] = {}
        for c in self._clients.values():
            if c.mode != "gateway" or not c.established:
                continue
            servers.setdefault(c.tunnel_ip, set()).add(c.server)
            if c.tunnel_ip not in newest or c.seq > newest[c.tunnel_ip].seq:
                newest[c.tunnel_ip] = c
        return {ip: c.server for ip, c in newest.items() if servers[ip] != {PRIMARY}}

    # ------------------------------------------------------------------ convergence

    def violations(self, view: FleetView, users: Iterable[str] | None = None) -> list[Kick]:
        """Clients the view no longer allows (of ``users`` only, when given).

        Already kicked clients are not listed again.
        """
        clients = self._clients.values() if users is None else self.of_users(users)
        killed = {s.uid: s.kill for s in view.sessions.values() if s.kill}
        out: list[Kick] = []
        for c in clients:
            if c.kicked is not None:
                continue
            reason = _violation(view, c, killed)
            if reason is not None:
                out.append(Kick(c, reason, halt=reason != MODE_CHANGED))
        return out

    def lapsed(self, now: float) -> list[Kick]:
        """Clients of single sign-on users whose login is older than the session lifetime
        (``now``: Unix seconds). They are restarted, not halted: the client comes back, and
        its user logs in again."""
        return [
            Kick(c, SSO_LAPSED, halt=False)
            for c in self._clients.values()
            if c.sso_until is not None and c.sso_until <= now and c.kicked is None
        ]

    # ------------------------------------------------------------------ restart

    def seed_owners(self, cached: Iterable[Client]) -> None:
        """Owners of tunnel addresses from the journal, before the clients are adopted.

        The conntrack listener's first table dump may come before adoption: its flows keep
        their users. :meth:`reconcile` drops owners whose client was not there to adopt.
        """
        for c in cached:
            if c.established:
                self._owners.setdefault(c.tunnel_ip, (c.user, c.uid))

    def reconcile(
        self,
        rows: Sequence[StatusClient],
        cached: Mapping[tuple[str, str], Client],
        *,
        listed_after: int,
        new_uid: Iterator[str],
        now: str,
        server: str = PRIMARY,
    ) -> Reconciled:
        """Compare OpenVPN's client list (``status 3``) with the book and repair both ways.

        ``listed_after``: the book's :attr:`seq` when the listing was asked for; clients
        admitted since cannot be judged by it. ``cached``: the journal's clients by (user,
        tunnel IP), so adopted clients keep their session uid, start time and certificate
        serial. ``new_uid`` yields uids for clients the journal did not know. ``rows`` are
        ``server``'s listing: only its clients are compared.
        """
        present = {r.client_id: r for r in rows if r.client_id is not None}
        vanished: list[Client] = []
        for (srv, cid), client in list(self._clients.items()):
            if srv == server and cid not in present and client.seq <= listed_after:
                gone = self.forget(cid, server)
                if gone is not None and gone.established:
                    vanished.append(gone)
        adopted: list[Client] = []
        restart: list[int] = []
        unanswered = {k for k in self._unanswered if k[0] != server}
        for cid, row in present.items():
            if (server, cid) in self._clients:
                continue
            if not row.virtual_address:
                # A CONNECT sent while no agent was attached is never replayed: the client
                # would wait for its hand-window. Seen twice in a row, it gets a restart.
                unanswered.add((server, cid))
                if (server, cid) in self._unanswered:
                    restart.append(cid)
                continue
            vaddr = str(row.virtual_address)
            old = cached.get((row.common_name, vaddr))
            since = row.connected_since.isoformat() if row.connected_since else now
            mode = old.mode if old else _mode_of(vaddr, self.config)
            self._seq += 1
            client = Client(
                cid=cid,
                user=row.common_name,
                mode=mode,
                tunnel_ip=vaddr,
                real_ip=row.real_ip or None,
                real_port=row.real_port,
                uid=old.uid if old else next(new_uid),
                connected_at=old.connected_at if old else since,
                cert_serial=old.cert_serial if old else None,
                established=True,
                seq=self._seq,
                server=server,
                sso_until=old.sso_until if old else None,
            )
            if client.mode == "nat":
                self._nat[server].reserve(ipaddress.IPv4Address(vaddr))
            self._put(client)
            adopted.append(client)
        self._unanswered = unanswered
        held = {c.tunnel_ip for c in self._clients.values() if c.established}
        for ip in [ip for ip in self._owners if ip not in held]:
            del self._owners[ip]  # a journal owner whose client was not there to adopt
        return Reconciled(tuple(vanished), tuple(adopted), tuple(restart))


def _mode_of(address: str, config: BookConfig) -> str:
    # A client the journal did not know: its address tells the mode it connected with.
    gateway = config.gateway_pool
    return "gateway" if gateway is not None and ipaddress.IPv4Address(address) in gateway else "nat"


def _unix(iso: str) -> int:
    """Unix seconds of an ISO 8601 time with its zone (the book's ``now``)."""
    return int(dt.datetime.fromisoformat(iso).timestamp())


def _violation(view: FleetView, c: Client, killed: Mapping[str, str | None]) -> str | None:
    user = view.users.get(c.user)
    if user is None:
        return "account deleted"
    if not user.enabled:
        return "account disabled"
    if c.cert_serial is not None and not authz.holds_certificate(user, c.cert_serial):
        return "certificate revoked or replaced"
    if c.mode != user.mode or (user.mode == "gateway" and c.tunnel_ip != user.gateway_address):
        # The tunnel address depends on the mode: reconnect to get the new one.
        return MODE_CHANGED
    reason = killed.get(c.uid)
    if reason:
        return reason
    return None
