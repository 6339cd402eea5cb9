"""The session book: CONNECT decisions, addresses, convergence and adoption, without I/O."""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import itertools
from collections.abc import Iterator

import pytest

from vpnfleet.core import ipam
from vpnfleet.core.fleet import FleetView
from vpnfleet.core.mgmt_protocol import StatusClient
from vpnfleet.core.sessionbook import BookConfig, Client, ConnectOutcome, SessionBook
from vpnfleet.wire import LiveSession, Snapshot, UserState

NAT = ipaddress.IPv4Network("10.200.0.0/24")
GWPOOL = ipaddress.IPv4Network("10.201.0.0/24")
NOW = "2026-12-02T10:00:00+00:00"


def user(name: str, **kw: object) -> UserState:
    fields: dict[str, object] = {
        "id": abs(hash(name)) % 1000,
        "name": name,
        "enabled": True,
        "mode": "nat",
        "max_sessions": 1,
        "groups": [],
        "gateway_address": None,
        "cert_serial": "7",
        "auth": "cert",
    }
    fields.update(kw)
    return UserState.model_validate(fields)


def session(uid: str, name: str, real_ip: str, kill: str | None = None) -> LiveSession:
    return LiveSession.model_validate(
        {
            "uid": uid,
            "user": name,
            "pod": "pod2",
            "tunnel_ip": "10.200.0.9",
            "mode": "nat",
            "real_ip": real_ip,
            "kill": kill,
        }
    )


def view(*users: UserState, sessions: tuple[LiveSession, ...] = (), revision: int = 7) -> FleetView:
    return FleetView.from_snapshot(
        Snapshot(
            revision=revision,
            users=list(users),
            groups=[],
            rules=[],
            pools=[],
            sessions=list(sessions),
            pods=[],
        )
    )


def env(
    name: str, ip: str = "198.51.100.7", serial: str = "7", port: int = 40000
) -> dict[str, str]:
    return {
        "common_name": name,
        "tls_serial_0": serial,
        "untrusted_ip": ip,
        "untrusted_port": str(port),
    }


def uids() -> Iterator[str]:
    return (f"pod1-{i:016x}" for i in itertools.count(1))


@pytest.fixture
def book() -> SessionBook:
    return SessionBook(
        BookConfig(NAT, GWPOOL, push_routes=(ipaddress.IPv4Network("10.20.0.0/16"),))
    )


def admit(book: SessionBook, v: FleetView, cid: int, **kw: str) -> Client:
    out = book.connect(
        v, cid, env(**kw) if kw else env("alice"), reauth=False, uid=f"pod1-{cid:016x}", now=NOW
    )
    assert out.decision.allow, out.decision
    assert out.client is not None
    client = book.establish(cid)
    assert client is not None
    return client


def test_a_nat_user_gets_a_pool_address_and_the_pushed_routes(book: SessionBook) -> None:
    out = book.connect(view(user("alice")), 3, env("alice"), reauth=False, uid="u1", now=NOW)
    assert out.decision.allow and out.client is not None
    assert out.push == (
        "ifconfig-push 10.200.0.2 255.255.255.0",
        'push "route 10.20.0.0 255.255.0.0"',
    )
    assert (out.client.user, out.client.mode, out.client.real_port) == ("alice", "nat", 40000)
    assert out.client.cert_serial == "7" and not out.client.established


def test_a_gateway_user_gets_its_leased_address_and_a_route_gateway(book: SessionBook) -> None:
    gw = user("gary", mode="gateway", gateway_address="10.201.0.5")
    out = book.connect(view(gw), 1, env("gary"), reauth=False, uid="u1", now=NOW)
    assert out.push[:2] == (
        "ifconfig-push 10.201.0.5 255.255.255.0",
        'push "route-gateway 10.201.0.1"',
    )


@pytest.mark.parametrize(
    ("users", "name", "serial", "reason"),
    [
        ((), "alice", "7", "unknown user"),
        ((user("alice", enabled=False),), "alice", "7", "user disabled"),
        ((user("alice"),), "alice", "8", "certificate not current"),
    ],
)
def test_refused_connects_leave_nothing_behind(
    book: SessionBook, users: tuple[UserState, ...], name: str, serial: str, reason: str
) -> None:
    out = book.connect(view(*users), 1, env(name, serial=serial), reauth=False, uid="u", now=NOW)
    assert not out.decision.allow and out.decision.reason == reason
    assert len(book) == 0 and out.push == ()


def test_the_same_device_reconnecting_replaces_its_old_session(book: SessionBook) -> None:
    v = view(user("alice", max_sessions=1))
    first = admit(book, v, 1)
    out = book.connect(v, 2, env("alice"), reauth=False, uid="u2", now=NOW)
    assert out.decision.allow
    assert [c.uid for c in out.replaced] == [first.uid]


def test_the_fleet_sessions_of_the_same_device_do_not_count(book: SessionBook) -> None:
    # alice's laptop was on pod2 and reconnects here: that session is being replaced.
    v = view(user("alice"), sessions=(session("pod2-0000000000000001", "alice", "198.51.100.7"),))
    assert book.connect(v, 1, env("alice"), reauth=False, uid="u", now=NOW).decision.allow
    other = view(user("alice"), sessions=(session("pod2-0000000000000001", "alice", "192.0.2.1"),))
    out = SessionBook(BookConfig(NAT)).connect(
        other, 1, env("alice"), reauth=False, uid="u", now=NOW
    )
    assert out.decision.reason == "session limit reached (1)"


def test_another_device_over_the_limit_is_refused(book: SessionBook) -> None:
    v = view(user("alice", max_sessions=1))
    admit(book, v, 1)
    out = book.connect(v, 2, env("alice", ip="192.0.2.9"), reauth=False, uid="u2", now=NOW)
    assert not out.decision.allow and out.decision.reason == "session limit reached (1)"
    assert book.get(2) is None


def test_a_client_being_disconnected_does_not_count(book: SessionBook) -> None:
    v = view(user("alice", max_sessions=1))
    first = admit(book, v, 1)
    assert book.kick(first.cid, "disconnected by an administrator") is not None
    out = book.connect(v, 2, env("alice", ip="192.0.2.9"), reauth=False, uid="u2", now=NOW)
    assert out.decision.allow


def test_reauth_of_a_client_no_longer_allowed_ends_its_session(book: SessionBook) -> None:
    v = view(user("alice"))
    client = admit(book, v, 1)
    out = book.connect(
        view(user("alice", enabled=False)), 1, env("alice"), reauth=True, uid="ignored", now=NOW
    )
    assert not out.decision.allow and out.ended is not None and out.ended.uid == client.uid
    assert book.owner(client.tunnel_ip) is None
    ending = book.get(1)  # kept, marked, until OpenVPN reports the disconnect
    assert ending is not None and ending.kicked == out.decision.reason == "user disabled"
    ok = book.connect(v, 1, env("alice"), reauth=True, uid="ignored", now=NOW)
    assert ok.decision.allow and ok.client is None  # nothing new to record


def test_owners_follow_establish_kick_and_forget(book: SessionBook) -> None:
    v = view(user("alice", max_sessions=3))
    c = admit(book, v, 1)
    assert book.owner(c.tunnel_ip) == ("alice", c.uid)
    assert book.kick(1, "x") == c and book.owner(c.tunnel_ip) is None
    assert book.kick(1, "again") is None  # already kicked
    assert book.establish(1) is None  # a kicked client does not come back
    gone = book.forget(1)
    assert gone is not None and gone.kicked == "x"
    # The address is free again: in a pool of one address, the next client gets it.
    tiny = SessionBook(BookConfig(ipaddress.IPv4Network("10.200.0.0/30")))
    first = admit(tiny, v, 1)
    tiny.kick(1, "x")
    assert not tiny.connect(
        v, 2, env("alice", ip="192.0.2.5"), reauth=False, uid="b", now=NOW
    ).decision.allow
    tiny.forget(1)
    assert admit(tiny, v, 3, name="alice", ip="192.0.2.5").tunnel_ip == first.tunnel_ip


def test_an_exhausted_pool_is_a_deny(book: SessionBook) -> None:
    tiny = SessionBook(BookConfig(ipaddress.IPv4Network("10.200.0.0/30")))
    v = view(user("alice", max_sessions=9))
    assert tiny.connect(
        v, 1, env("alice", ip="192.0.2.1"), reauth=False, uid="a", now=NOW
    ).decision.allow
    out = tiny.connect(v, 2, env("alice", ip="192.0.2.2"), reauth=False, uid="b", now=NOW)
    assert (out.decision.allow, out.decision.client_reason) == (False, "server full")
    assert tiny.get(2) is None


# ------------------------------------------------------------------ convergence


def test_violations_name_every_client_the_view_no_longer_allows(book: SessionBook) -> None:
    users = {n: user(n, max_sessions=2) for n in ("ann", "bob", "cat", "dan", "eve", "fay")}
    users["fay"] = user("fay", mode="gateway", gateway_address="10.201.0.9", max_sessions=2)
    v = view(*users.values())
    clients = {n: admit(book, v, i, name=n, ip=f"192.0.2.{i}") for i, n in enumerate(users)}
    after = view(
        users["ann"],  # unchanged
        # bob deleted
        user("cat", enabled=False),
        user("dan", cert_serial="8"),
        user("eve", mode="gateway", gateway_address="10.201.0.7"),
        user("fay", mode="gateway", gateway_address="10.201.0.10"),
        sessions=(session(clients["ann"].uid, "ann", "x", kill=None),),
    )
    found = {k.client.user: (k.reason, k.halt) for k in book.violations(after)}
    assert found == {
        "bob": ("account deleted", True),
        "cat": ("account disabled", True),
        "dan": ("certificate revoked or replaced", True),
        "eve": ("connection mode changed", False),
        "fay": ("connection mode changed", False),
    }
    killed = view(
        *users.values(),
        sessions=(
            session(clients["ann"].uid, "ann", "x", kill="disconnected by an administrator"),
        ),
    )
    assert [(k.client.uid, k.reason) for k in book.violations(killed)] == [
        (clients["ann"].uid, "disconnected by an administrator")
    ]
    assert book.violations(killed, users=["bob"]) == []
    book.kick(clients["ann"].cid, "disconnected by an administrator")
    assert book.violations(killed) == []  # not asked twice


# ------------------------------------------------------------------ restart


def row(cid: int, name: str, address: str | None, ip: str = "198.51.100.7") -> StatusClient:
    return StatusClient(
        common_name=name,
        real_address=f"{ip}:{40000 + cid}",
        virtual_address=address,
        virtual_ipv6_address=None,
        bytes_received=10,
        bytes_sent=20,
        connected_since=dt.datetime(2026, 12, 2, 9, tzinfo=dt.UTC),
        username=None,
        client_id=cid,
        peer_id=cid,
        data_channel_cipher="AES-256-GCM",
    )


def test_adoption_keeps_the_journal_identity_and_flags_nothing_new(book: SessionBook) -> None:
    journal = Client(
        cid=9,
        user="alice",
        mode="nat",
        tunnel_ip="10.200.0.5",
        real_ip="x",
        real_port=1,
        uid="pod1-00000000000000aa",
        connected_at="2026-12-02T08:00:00",
        cert_serial="7",
        established=True,
    )
    book.seed_owners([journal])
    assert book.owner("10.200.0.5") == ("alice", journal.uid)
    result = book.reconcile(
        [row(1, "alice", "10.200.0.5"), row(2, "bob", "10.200.0.6")],
        {("alice", "10.200.0.5"): journal},
        listed_after=book.seq,
        new_uid=uids(),
        now=NOW,
    )
    adopted = {c.user: c for c in result.adopted}
    assert adopted["alice"].uid == journal.uid
    assert adopted["alice"].connected_at == journal.connected_at
    assert adopted["alice"].cert_serial == "7" and adopted["alice"].cid == 1
    assert adopted["bob"].uid == "pod1-0000000000000001" and adopted["bob"].cert_serial is None
    assert all(c.established for c in result.adopted)
    # Their addresses are taken: the next NAT client gets another one.
    out = book.connect(view(user("carl")), 3, env("carl"), reauth=False, uid="c", now=NOW)
    assert out.client is not None and out.client.tunnel_ip not in {"10.200.0.5", "10.200.0.6"}
    # A certificate replaced while the agent was down is still noticed (serial from the journal).
    later = view(user("alice", cert_serial="9"), user("bob"), user("carl"))
    assert [k.client.user for k in book.violations(later)] == ["alice"]


def test_seeded_owners_without_a_client_are_dropped(book: SessionBook) -> None:
    ghost = Client(
        cid=1,
        user="alice",
        mode="nat",
        tunnel_ip="10.200.0.5",
        real_ip=None,
        real_port=None,
        uid="u",
        connected_at=NOW,
        established=True,
    )
    book.seed_owners([ghost])
    book.reconcile([], {}, listed_after=0, new_uid=uids(), now=NOW)
    assert book.owner("10.200.0.5") is None


def test_a_client_gone_from_the_listing_vanishes_unless_admitted_after_it(
    book: SessionBook,
) -> None:
    v = view(user("alice", max_sessions=5))
    old = admit(book, v, 1, name="alice", ip="192.0.2.1")
    listed_after = book.seq
    new = admit(book, v, 2, name="alice", ip="192.0.2.2")  # CONNECT raced the listing
    result = book.reconcile([], {}, listed_after=listed_after, new_uid=uids(), now=NOW)
    assert [c.uid for c in result.vanished] == [old.uid]
    assert book.get(new.cid) is not None and book.get(old.cid) is None


def test_an_unanswered_connect_is_restarted_when_seen_twice(book: SessionBook) -> None:
    rows = [row(4, "alice", None)]
    first = book.reconcile(rows, {}, listed_after=0, new_uid=uids(), now=NOW)
    second = book.reconcile(rows, {}, listed_after=0, new_uid=uids(), now=NOW)
    assert first.restart == () and second.restart == (4,)


def test_clear_ends_every_live_session(book: SessionBook) -> None:
    v = view(user("alice", max_sessions=2))
    a = admit(book, v, 1, name="alice", ip="192.0.2.1")
    book.connect(v, 2, env("alice", ip="192.0.2.2"), reauth=False, uid="p", now=NOW)
    assert [c.uid for c in book.clear()] == [a.uid]
    assert len(book) == 0 and book.owner(a.tunnel_ip) is None


@pytest.mark.parametrize(
    "record",
    [
        {},
        {"cid": 1},
        {
            "cid": "x",
            "user": "a",
            "mode": "nat",
            "tunnel_ip": "10.0.0.1",
            "uid": "u",
            "connected_at": NOW,
        },
        {
            "cid": 1,
            "user": "a",
            "mode": "nat",
            "tunnel_ip": "nope",
            "uid": "u",
            "connected_at": NOW,
        },
    ],
)
def test_malformed_journal_records_are_refused(record: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Client.from_record(record)


def test_journal_records_round_trip() -> None:
    c = Client(
        cid=3,
        user="a",
        mode="gateway",
        tunnel_ip="10.201.0.4",
        real_ip="192.0.2.1",
        real_port=5,
        uid="pod-1",
        connected_at=NOW,
        cert_serial="12",
        established=True,
    )
    assert Client.from_record(c.to_record()) == c


# ------------------------------------------------------------------ edges mutation testing found


def test_an_allowed_reauth_changes_nothing(book: SessionBook) -> None:
    v = view(user("alice"))
    client = admit(book, v, 1)
    out = book.connect(v, 1, env("alice"), reauth=True, uid="ignored", now=NOW)
    assert out.decision.allow and out.ended is None and out.client is None
    assert book.get(1) == client and book.owner(client.tunnel_ip) == ("alice", client.uid)


def test_a_connect_for_a_cid_the_book_holds_replaces_the_old_record(book: SessionBook) -> None:
    v = view(user("alice", max_sessions=2))
    old = admit(book, v, 1, name="alice", ip="192.0.2.1")
    # OpenVPN reuses a client id only for a new instance: the old one is gone.
    again = book.connect(v, 1, env("alice", ip="192.0.2.1"), reauth=False, uid="new", now=NOW)
    assert again.client is not None and again.client.uid == "new"
    assert [c.uid for c in book] == ["new"] and book.owner(old.tunnel_ip) is None
    refused = book.connect(view(user("alice", enabled=False)), 1, env("alice"), reauth=False,
                           uid="x", now=NOW)  # fmt: skip
    assert not refused.decision.allow and book.get(1) is None


@pytest.mark.parametrize(
    ("port", "expected"), [("65535", 65535), ("65536", None), ("", None), ("x", None)]
)
def test_the_real_port_is_kept_only_when_it_is_a_port(
    book: SessionBook, port: str, expected: int | None
) -> None:
    e = {**env("alice"), "untrusted_port": port}
    out = book.connect(view(user("alice")), 1, e, reauth=False, uid="u", now=NOW)
    assert out.client is not None and out.client.real_port == expected


def test_every_client_is_judged_and_listed(book: SessionBook) -> None:
    v = view(user("ann", max_sessions=2), user("bob"))
    a1 = admit(book, v, 1, name="ann", ip="192.0.2.1")
    a2 = admit(book, v, 2, name="ann", ip="192.0.2.2")
    b = admit(book, v, 3, name="bob", ip="192.0.2.3")
    assert {c.cid for c in book.of_users(["ann", "bob"])} == {a1.cid, a2.cid, b.cid}
    book.kick(a1.cid, "x")  # judged before the others: must not stop the walk
    gone = view(user("bob"))
    assert [k.client.cid for k in book.violations(gone)] == [a2.cid]
    book.forget(a1.cid)
    assert [c.cid for c in book.of_users(["ann"])] == [a2.cid]


def test_kicking_a_client_that_never_came_up_ends_no_session(book: SessionBook) -> None:
    v = view(user("alice"))
    book.connect(v, 1, env("alice"), reauth=False, uid="u", now=NOW)
    assert book.kick(1, "x") is None and book.get(1) is not None


def test_reconcile_forgets_silently_what_never_came_up(book: SessionBook) -> None:
    v = view(user("alice"))
    book.connect(v, 1, env("alice"), reauth=False, uid="u", now=NOW)
    result = book.reconcile([], {}, listed_after=book.seq, new_uid=uids(), now=NOW)
    assert result.vanished == () and book.get(1) is None


def test_adoption_reads_each_row_and_reserves_its_address() -> None:
    tiny = SessionBook(BookConfig(ipaddress.IPv4Network("10.200.0.0/30"), GWPOOL))
    rows = [
        row(1, "alice", "10.200.0.2", ip="192.0.2.7"),
        row(7, "carl", None),  # never answered: skipped, the rest still adopted
        row(2, "gary", "10.201.0.9", ip="192.0.2.8"),
    ]
    result = tiny.reconcile(rows, {}, listed_after=0, new_uid=uids(), now=NOW)
    got = {c.user: c for c in result.adopted}
    assert set(got) == {"alice", "gary"}
    assert (got["alice"].mode, got["gary"].mode) == ("nat", "gateway")
    assert (got["alice"].real_ip, got["alice"].real_port) == ("192.0.2.7", 40001)
    assert got["alice"].connected_at == "2026-12-02T09:00:00+00:00"
    # alice holds the pool's only NAT address: nobody else gets it.
    out = tiny.connect(view(user("bob")), 3, env("bob"), reauth=False, uid="b", now=NOW)
    assert out.decision.client_reason == "server full"
    # A row without a start time is dated now.
    late = tiny.reconcile(
        [*rows, dataclasses.replace(row(4, "dan", "10.201.0.10"), connected_since=None)],
        {}, listed_after=tiny.seq, new_uid=uids(), now=NOW,
    )  # fmt: skip
    assert [c.connected_at for c in late.adopted] == [NOW]


def test_what_openvpn_may_leave_out_of_a_connect(book: SessionBook) -> None:
    e = {"common_name": "alice", "tls_serial_0": "7"}  # no address or port reported
    out = book.connect(view(user("alice")), 1, e, reauth=False, uid="u", now=NOW)
    assert out.client is not None and (out.client.real_ip, out.client.real_port) == (None, None)
    # A NAT user never takes a gateway address, whatever the view says about a lease.
    natty = user("bob", gateway_address="10.201.0.77")
    got = book.connect(view(natty), 2, env("bob", ip="192.0.2.9"), reauth=False, uid="b", now=NOW)
    assert got.client is not None and ipaddress.IPv4Address(got.client.tunnel_ip) in NAT
    tiny = SessionBook(BookConfig(ipaddress.IPv4Network("10.200.0.0/30")))
    full = tiny.connect(
        view(user("c", max_sessions=3)), 1, env("c"), reauth=False, uid="1", now=NOW
    )
    assert full.decision.allow
    again = tiny.connect(view(user("c", max_sessions=3)), 2, env("c", ip="192.0.2.2"),
                         reauth=False, uid="2", now=NOW)  # fmt: skip
    assert (again.decision.reason, again.decision.client_reason) == (
        "address pool exhausted", "server full")  # fmt: skip


def test_adopted_clients_are_judged_by_later_listings(book: SessionBook) -> None:
    v = view(user("alice", max_sessions=9))
    early = [admit(book, v, i, name="alice", ip=f"192.0.2.{i}") for i in (1, 2, 3)]
    book.reconcile(
        [*(row(c.cid, "alice", c.tunnel_ip) for c in early), row(8, "bob", "10.200.0.50")],
        {}, listed_after=book.seq, new_uid=uids(), now=NOW,
    )  # fmt: skip
    # Everyone left while nobody listened: the next listing finds them all gone.
    gone = book.reconcile([], {}, listed_after=book.seq, new_uid=uids(), now=NOW)
    assert {c.cid for c in gone.vanished} == {1, 2, 3, 8} and len(book) == 0


def test_a_cleared_book_admits_again(book: SessionBook) -> None:
    v = view(user("alice"))
    admit(book, v, 1)
    book.clear()
    assert admit(book, v, 2).tunnel_ip == "10.200.0.2"


def test_journal_records_keep_what_is_unknown_unknown() -> None:
    c = Client(cid=3, user="a", mode="nat", tunnel_ip="10.200.0.4", real_ip=None,
               real_port=None, uid="pod-1", connected_at=NOW)  # fmt: skip
    assert Client.from_record(c.to_record()) == c
    with pytest.raises(ValueError):
        Client.from_record({**c.to_record(), "uid": ""})
    with pytest.raises(ValueError):
        Client.from_record({k: v for k, v in c.to_record().items() if k != "established"})


def test_coming_up_and_being_kicked_keep_who_and_where(book: SessionBook) -> None:
    out = book.connect(view(user("alice")), 4, env("alice", port=40123), reauth=False,
                       uid="pod1-a", now=NOW)  # fmt: skip
    assert out.client is not None
    up = book.establish(4)
    assert up is not None and up.established and up.kicked is None
    same = ("cid", "user", "mode", "tunnel_ip", "real_ip", "real_port", "uid", "connected_at",
            "cert_serial", "seq")  # fmt: skip
    assert all(getattr(up, f) == getattr(out.client, f) for f in same)
    assert up.real_port == 40123
    kicked = book.kick(4, "removed from the fleet")
    assert kicked is not None
    after = book.get(4)
    assert after is not None and after.established is False
    assert after.kicked == "removed from the fleet"
    assert all(getattr(after, f) == getattr(out.client, f) for f in same)


# ------------------------------------------------------------------ UDP and TCP, one book


def two_servers() -> SessionBook:
    return SessionBook(BookConfig(nat_pool=NAT, gateway_pool=GWPOOL, servers=("udp", "tcp")))


def connect(
    book: SessionBook, v: FleetView, cid: int, server: str, name: str, ip: str = "198.51.100.7"
) -> ConnectOutcome:
    return book.connect(
        v, cid, env(name, ip), reauth=False, uid=f"pod1-{server}-{cid}", now=NOW, server=server
    )


def test_the_servers_split_the_nat_pool_and_never_share_an_address() -> None:
    with pytest.raises(ValueError, match="too small"):
        BookConfig(nat_pool=ipaddress.IPv4Network("10.0.0.0/30"), servers=("udp", "tcp"))
    assert ipam.server_pools(NAT, 1) == [NAT]
    book = two_servers()
    v = view(*(user(f"u{i}") for i in range(6)))
    out = [
        book.connect(
            v, 0, env(f"u{i}", ip=f"192.0.2.{i}"), reauth=False, uid=f"x{i}", now=NOW,
            server=("udp", "tcp")[i % 2],
        )
        for i in range(6)
    ]  # fmt: skip
    # The same OpenVPN client id on both servers is two clients.
    assert len(book) == 2
    udp = book.get(0, "udp")
    tcp = book.get(0, "tcp")
    assert udp is not None and tcp is not None and udp.user == "u4" and tcp.user == "u5"
    assert ipaddress.IPv4Address(udp.tunnel_ip) in ipaddress.IPv4Network("10.200.0.0/25")
    assert ipaddress.IPv4Address(tcp.tunnel_ip) in ipaddress.IPv4Network("10.200.0.128/25")
    # A TCP client's netmask is its half's; its gateway (.129) is what its server pushes.
    assert out[5].push[0] == f"ifconfig-push {tcp.tunnel_ip} 255.255.255.128"


def test_a_session_limit_counts_both_servers() -> None:
    book = two_servers()
    v = view(user("alice", max_sessions=2))
    assert connect(book, v, 1, "udp", name="alice", ip="192.0.2.1").decision.allow
    assert connect(book, v, 1, "tcp", name="alice", ip="192.0.2.2").decision.allow
    third = connect(book, v, 2, "tcp", name="alice", ip="192.0.2.3")
    assert not third.decision.allow and "session limit" in third.decision.reason
    # The same device falling back from UDP to TCP replaces its UDP client instead.
    again = connect(book, v, 3, "tcp", name="alice", ip="192.0.2.1")
    assert again.decision.allow
    assert [c.key for c in again.replaced] == [("udp", 1)]


def test_violations_and_kicks_reach_clients_of_both_servers() -> None:
    book = two_servers()
    v = view(user("alice", max_sessions=2))
    connect(book, v, 4, "udp", name="alice", ip="192.0.2.1")
    connect(book, v, 4, "tcp", name="alice", ip="192.0.2.2")
    book.establish(4, "udp")
    book.establish(4, "tcp")
    kicks = book.violations(view(user("alice", enabled=False)))
    assert sorted(k.client.key for k in kicks) == [("tcp", 4), ("udp", 4)]
    assert book.kick(4, "account disabled", "tcp") is not None
    udp = book.get(4, "udp")
    assert udp is not None and udp.kicked is None  # only the TCP one was kicked


def test_a_restarted_server_loses_only_its_own_clients() -> None:
    book = two_servers()
    v = view(user("alice", max_sessions=2), user("bob"))
    connect(book, v, 1, "udp", name="alice", ip="192.0.2.1")
    connect(book, v, 1, "tcp", name="bob", ip="192.0.2.2")
    book.establish(1, "udp")
    book.establish(1, "tcp")
    tcp = book.get(1, "tcp")
    assert tcp is not None
    assert [c.user for c in book.clear("tcp")] == ["bob"]
    assert [c.key for c in book] == [("udp", 1)]
    assert book.owner(tcp.tunnel_ip) is None
    # A reconcile of one server judges its clients only.
    result = book.reconcile(
        [row(9, "bob", "10.200.0.130")], {}, listed_after=book.seq, new_uid=uids(), now=NOW,
        server="tcp",
    )  # fmt: skip
    assert [c.key for c in result.adopted] == [("tcp", 9)] and not result.vanished
    assert sorted(c.key for c in book) == [("tcp", 9), ("udp", 1)]


def test_gateway_users_on_tcp_need_a_host_route() -> None:
    book = two_servers()
    gw = user("gw", mode="gateway", gateway_address="10.201.0.7", max_sessions=2)
    v = view(gw, user("n"))
    connect(book, v, 1, "udp", name="gw", ip="192.0.2.1")
    book.establish(1, "udp")
    connect(book, v, 2, "tcp", name="n", ip="192.0.2.2")
    book.establish(2, "tcp")
    assert book.gateway_routes() == {}  # the pool's route into the UDP device covers it
    connect(book, v, 3, "tcp", name="gw", ip="192.0.2.3")
    assert book.gateway_routes() == {}  # not established yet
    book.establish(3, "tcp")
    assert book.gateway_routes() == {"10.201.0.7": "tcp"}  # the newest session has it
    book.forget(3, "tcp")
    assert book.gateway_routes() == {}
    book.forget(1, "udp")
    connect(book, v, 5, "tcp", name="gw", ip="192.0.2.3")
    book.establish(5, "tcp")
    connect(book, v, 6, "udp", name="gw", ip="192.0.2.4")
    book.establish(6, "udp")
    # Live on both: the newer (UDP) one needs its route back into the UDP device explicitly.
    assert book.gateway_routes() == {"10.201.0.7": "udp"}


def test_journal_records_keep_their_server() -> None:
    book = two_servers()
    v = view(user("alice"))
    connect(book, v, 3, "tcp", name="alice")
    client = book.establish(3, "tcp")
    assert client is not None
    assert Client.from_record(client.to_record()) == dataclasses.replace(client, seq=0)
    old = {k: val for k, val in client.to_record().items() if k != "server"}
    assert Client.from_record(old).server == "udp"  # written before TCP existed
