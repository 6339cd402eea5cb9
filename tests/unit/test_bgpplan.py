"""The BGP announcement plan: which /32s a pod announces, the add/withdraw diff between two
plans, BIRD's configuration (parsed by the real ``bird -p``), the agent's BGP options, and the
sync loop against the fake speaker."""

from __future__ import annotations

import asyncio
import ipaddress
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vpnfleet.agent.bgp import BgpSync
from vpnfleet.agent.fakes import FakeBgpSpeaker
from vpnfleet.agent.settings import AgentSettings
from vpnfleet.core import bgpplan, birdconf
from vpnfleet.core.bgpplan import Announcement
from vpnfleet.core.fleet import FleetView
from vpnfleet.core.sessionbook import BookConfig, Client, SessionBook
from vpnfleet.wire import Snapshot, UserState

NAT = ipaddress.IPv4Network("10.200.0.0/24")
GWPOOL = ipaddress.IPv4Network("10.201.0.0/24")
T0 = "2026-12-02T10:00:00+00:00"
T1 = "2026-12-02T10:00:05+00:00"


def net(ip: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(f"{ip}/32")


def client(cid: int, ip: str, *, mode: str = "gateway", at: str = T0, **kw: object) -> Client:
    fields: dict[str, object] = {
        "cid": cid,
        "user": f"u{cid}",
        "mode": mode,
        "tunnel_ip": ip,
        "real_ip": "198.51.100.7",
        "real_port": 40000 + cid,
        "uid": f"pod1-{cid:016x}",
        "connected_at": at,
        "established": True,
    }
    fields.update(kw)
    return Client(**fields)  # type: ignore[arg-type]


# --- what is announced ----------------------------------------------------------------------


def test_only_live_gateway_sessions_inside_the_pool_are_announced() -> None:
    clients = [
        client(1, "10.201.0.5"),
        client(2, "10.200.0.2", mode="nat"),  # NAT users hide behind the pod
        client(3, "10.201.0.6", established=False),  # not up yet
        client(4, "10.201.0.7", kicked="disabled"),  # being disconnected
        client(5, "10.9.9.9"),  # outside the pool: never announced
        client(6, "10.201.0.8"),  # replaced elsewhere: the control plane marked it to end
    ]
    got = bgpplan.announcements(clients, GWPOOL, killed=["pod1-0000000000000006"])
    assert list(got) == [net("10.201.0.5")]
    assert bgpplan.announcements(clients, None) == {}


def test_a_newer_session_has_a_lower_med() -> None:
    old, new = bgpplan.recency_med(T0), bgpplan.recency_med(T1)
    assert new == old - 5
    assert bgpplan.recency_med("not a time") == bgpplan.MED_MAX
    assert bgpplan.recency_med("2026-12-02T10:00:00") == bgpplan.MED_MAX  # no zone
    assert bgpplan.recency_med("2300-01-01T00:00:00+00:00") == 0
    # Two records of one address on a pod: the newer session's route is the one announced.
    got = bgpplan.announcements([client(1, "10.201.0.5"), client(2, "10.201.0.5", at=T1)], GWPOOL)
    assert got == {net("10.201.0.5"): Announcement(net("10.201.0.5"), new)}


def test_the_plan_follows_the_session_book_through_connect_and_disconnect() -> None:
    book = SessionBook(BookConfig(NAT, GWPOOL))
    snap = Snapshot(
        revision=1,
        users=[
            UserState(
                id=1, name="gary", enabled=True, mode="gateway", max_sessions=1, groups=[],
                gateway_address="10.201.0.5", cert_serial="7", auth="cert",
            ),
            UserState(
                id=2, name="alice", enabled=True, mode="nat", max_sessions=1, groups=[],
                gateway_address=None, cert_serial="7", auth="cert",
            ),
        ],
        groups=[], rules=[], pools=[], sessions=[], pods=[],
    )  # fmt: skip
    view = FleetView.from_snapshot(snap)

    def connect(cid: int, name: str) -> None:
        env = {"common_name": name, "tls_serial_0": "7", "untrusted_ip": "198.51.100.7"}
        out = book.connect(view, cid, env, reauth=False, uid=f"s{cid}", now=T0)
        assert out.decision.allow

    announced: dict[ipaddress.IPv4Network, Announcement] = {}

    def step() -> bgpplan.AnnouncementDiff:
        nonlocal announced
        want = bgpplan.announcements(book, GWPOOL)
        diff = bgpplan.plan(announced, want)
        announced = bgpplan.apply(announced, diff)
        assert announced == want
        return diff

    connect(1, "gary")
    connect(2, "alice")
    assert not step()  # CONNECT answered, tunnel not up: nothing yet
    book.establish(1)
    book.establish(2)
    diff = step()
    assert [r.prefix for r in diff.add] == [net("10.201.0.5")] and diff.withdraw == ()
    assert not step()  # nothing changed: nothing sent
    book.kick(1, "pod draining")
    assert step() == bgpplan.AnnouncementDiff((), (net("10.201.0.5"),))
    book.forget(1)
    assert not step()


routes = st.dictionaries(
    st.integers(0, 40).map(lambda i: net(f"10.201.0.{i}")),
    st.integers(0, 3),
    max_size=12,
).map(lambda d: {p: Announcement(p, med) for p, med in d.items()})


@given(routes, routes)
def test_the_diff_takes_any_plan_to_any_other(
    old: dict[ipaddress.IPv4Network, Announcement], new: dict[ipaddress.IPv4Network, Announcement]
) -> None:
    diff = bgpplan.plan(old, new)
    assert bgpplan.apply(old, diff) == new
    assert set(diff.withdraw) == old.keys() - new.keys()
    # Only what changed is sent: a route announced unchanged is not announced again.
    assert all(old.get(r.prefix) != r for r in diff.add)
    assert bool(diff) == (old != new)


# --- options and BIRD's configuration -------------------------------------------------------


def settings(**kw: object) -> AgentSettings:
    base: dict[str, object] = {
        "server": "http://127.0.0.1:8000",
        "token": "t",
        "name": "pod1",
        "pod_ip": "10.0.0.11",
    }
    base.update(kw)
    s = AgentSettings(**base)  # type: ignore[arg-type]
    s.validate()
    return s


def test_bgp_options_default_the_router_id_to_the_pod_ip() -> None:
    s = settings(bgp=True, bgp_asn="64512", bgp_neighbors=["10.0.0.1:64600", "10.0.0.2:64600"])
    cfg = s.bgp_config
    assert cfg is not None
    assert (cfg.asn, str(cfg.router_id), cfg.hold_time, cfg.keepalive_time) == (
        64512, "10.0.0.11", 9, 3,
    )  # fmt: skip
    assert [(str(n.address), n.asn) for n in cfg.neighbors] == [
        ("10.0.0.1", 64600),
        ("10.0.0.2", 64600),
    ]
    assert settings().bgp_config is None


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"bgp_neighbors": ["10.0.0.1:64600"]}, "AS number: give --bgp-asn"),
        ({"bgp_asn": "64512"}, "at least one neighbor"),
        ({"bgp_asn": "x", "bgp_neighbors": ["10.0.0.1:1"]}, "--bgp-asn: AS number 'x'"),
        ({"bgp_asn": "0", "bgp_neighbors": ["10.0.0.1:1"]}, "out of range"),
        ({"bgp_asn": "23456", "bgp_neighbors": ["10.0.0.1:1"]}, "out of range"),
        ({"bgp_asn": "1", "bgp_neighbors": ["10.0.0.1"]}, "must be ADDRESS:ASN"),
        ({"bgp_asn": "1", "bgp_neighbors": ["router:1"]}, "not an IPv4 address"),
        ({"bgp_asn": "1", "bgp_neighbors": ["10.0.0.1:1", "10.0.0.1:2"]}, "given twice"),
        ({"bgp_asn": "1", "bgp_neighbors": ["10.0.0.1:1"], "bgp_hold_time": "2"}, "between 3"),
        ({"bgp_asn": "1", "bgp_neighbors": ["10.0.0.1:1"], "bgp_hold_time": "9s"}, "whole"),
        ({"bgp_asn": "1", "bgp_neighbors": ["10.0.0.1:1"], "pod_ip": None}, "router id"),
        ({"bgp_asn": "1", "bgp_neighbors": ["10.0.0.1:1"], "bgp_router_id": "r1"}, "router id"),
        ({"bgp_asn": "1", "bgp_neighbors": ["10.0.0.1:1"], "bird": "/nonexistent/bird"}, "bird2"),
    ],
)
def test_bad_bgp_options_are_refused_in_one_sentence(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        settings(bgp=True, **kw)


def test_bgp_options_without_bgp_are_refused() -> None:
    with pytest.raises(ValueError, match="--bgp-asn, --bgp-neighbor given but BGP is off"):
        settings(bgp_asn="64512", bgp_neighbors=["10.0.0.1:64600"])


def test_bgp_options_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for var, value in {
        "VPNFLEET_BGP": "true",
        "VPNFLEET_BGP_ASN": "64512",
        "VPNFLEET_BGP_NEIGHBORS": "10.0.0.1:64600, 10.0.0.2:64601",
        "VPNFLEET_BGP_HOLD_TIME": "3",
        "VPNFLEET_POD_IP": "10.0.0.11",
    }.items():
        monkeypatch.setenv(var, value)
    s = AgentSettings.from_env(server="http://127.0.0.1:8000", token="t", name="pod1")
    assert s.bgp_config is not None
    assert s.bgp_config.hold_time == 3 and len(s.bgp_config.neighbors) == 2


def test_bird_accepts_the_rendered_configuration(tmp_path: Path) -> None:
    cfg = birdconf.BgpConfig.build(
        asn=64512, router_id=None, pod_ip="10.0.0.11", neighbors=["10.0.0.1:64600"], hold_time=3
    )
    routes_file = tmp_path / "routes.conf"
    routes_file.write_text(
        birdconf.render_routes(
            [Announcement(net("10.201.0.5"), 7), Announcement(net("10.201.0.6"), 2**32 - 1)]
        )
    )
    conf = tmp_path / "bird.conf"
    conf.write_text(birdconf.render_config(cfg, routes_file))
    res = subprocess.run(["bird", "-p", "-c", str(conf)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    # And refuses a broken include, so a bad render could not pass unnoticed.
    routes_file.write_text("route 10.201.0.5/33 blackhole;\n")
    res = subprocess.run(["bird", "-p", "-c", str(conf)], capture_output=True, text=True)
    assert res.returncode != 0


# --- the sync loop (fake speaker) -----------------------------------------------------------


async def wait_for(check: object, seconds: float = 2.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not check():  # type: ignore[operator]
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_the_sync_announces_withdraws_restarts_and_drains() -> None:
    speaker = FakeBgpSpeaker()
    clients = [client(1, "10.201.0.5")]
    sync = BgpSync(speaker, lambda: bgpplan.announcements(clients, GWPOOL))
    task = asyncio.create_task(sync.run())
    try:
        # Nothing is started or announced until the book is complete.
        sync.poke()
        await asyncio.sleep(0.05)
        assert speaker.starts == 0 and speaker.routes is None
        sync.allow()
        await wait_for(lambda: speaker.routes is not None and net("10.201.0.5") in speaker.routes)
        assert speaker.starts == 1
        clients.append(client(2, "10.201.0.6"))
        sync.poke()
        await wait_for(lambda: speaker.routes is not None and len(speaker.routes) == 2)
        clients.pop(0)  # disconnect
        sync.poke()
        await wait_for(
            lambda: speaker.routes is not None and list(speaker.routes) == [net("10.201.0.6")]
        )
        # BIRD refusing: retried until it works again, nothing lost.
        speaker.fail = True
        clients.append(client(3, "10.201.0.7"))
        sync.poke()
        await asyncio.sleep(0.1)
        assert sync.failures >= 1
        speaker.fail = False
        await wait_for(lambda: speaker.routes is not None and len(speaker.routes) == 2, 3)
        # BIRD died: started again, announcing the current set.
        speaker.die()
        sync.poke()
        await wait_for(lambda: speaker.starts == 2)
        assert speaker.routes is not None and set(speaker.routes) == {
            net("10.201.0.6"), net("10.201.0.7"),
        }  # fmt: skip
        # Drain: everything withdrawn first, then the speaker stopped; never started again.
        await sync.finish()
        assert speaker.history[-1] == frozenset() and speaker.stopped
        sync.poke()
        await asyncio.sleep(0.05)
        assert speaker.starts == 2 and not speaker.alive()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
