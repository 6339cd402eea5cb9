"""Trust boundaries between pods: a credential per pod, checked agent facts, pod leases.

The attacker here holds one pod's credential (or the enrollment token every pod starts
with) and tries what a review did with the old shared agent token: take another pod's name
and key, speak for another pod, invent tunnel addresses, close other pods' sessions.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from cryptography import x509
from sqlalchemy import create_engine, update

from tests.api.test_users_groups_rules import problem
from tests.conftest import Server
from vpnfleet.agent.gwroutes import desired_routes
from vpnfleet.controlplane import state as state_module
from vpnfleet.controlplane.models import AdminToken, Pod
from vpnfleet.core.fleet import FleetView
from vpnfleet.wire import LiveSession, PodState, PoolState, Snapshot


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def _open(pod: httpx.Client, name: str, uid: str, user: str, ip: str, **kw: str) -> httpx.Response:
    body = {
        "uid": uid,
        "user": user,
        "pod": name,
        "mode": kw.get("mode", "nat"),
        "tunnel_ip": ip,
        "real_ip": kw.get("real_ip", "198.51.100.7"),
        "started_at": _now(),
    }
    return pod.post("/api/v1/agent/sessions/open", json=body)


@contextlib.contextmanager
def _registered(server: Server, name: str, pod_ip: str) -> Iterator[httpx.Client]:
    """A client of pod `name`, enrolled and registered."""
    with server.client(server.pod_token(name)) as c:
        r = c.post("/api/v1/agent/register", json={"name": name, "pod_ip": pod_ip})
        r.raise_for_status()
        yield c


def _age_pod(server: Server, name: str, seconds: float) -> None:
    """Make the pod's last word `seconds` old, as if it had died that long ago."""
    then = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds)
    engine = create_engine(server.database_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                update(Pod).where(Pod.name == name).values(last_heartbeat=then, registered_at=then)
            )
    finally:
        engine.dispose()


def test_one_pod_cannot_take_another_pods_name_or_key(server: Server, admin: httpx.Client) -> None:
    with (
        _registered(server, "pod-a", "192.0.2.10") as pod_a,
        _registered(server, "pod-b", "192.0.2.11") as pod_b,
    ):
        key_a = pod_a.post("/api/v1/agent/register", json={"name": "pod-a"}).json()["key_pem"]
        # B's credential: registering as A (which would hand out A's key) is refused.
        r = pod_b.post("/api/v1/agent/register", json={"name": "pod-a", "pod_ip": "192.0.2.66"})
        assert "cannot act as pod 'pod-a'" in problem(r, 403)
        assert key_a not in r.text
        # The enrollment token cannot take a live pod's name either.
        with server.client(server.make_token("agent")) as enroller:
            taken = enroller.post("/api/v1/agent/enroll", json={"name": "pod-a"})
            assert "enrolled and alive" in problem(taken, 409)
            assert "vpnfleet pod revoke pod-a" in taken.json()["detail"]
            assert problem(enroller.post("/api/v1/agent/register", json={"name": "pod-a"}), 403)
            assert problem(enroller.get("/api/v1/agent/snapshot"), 403)
        # Nor can B speak for A anywhere else.
        hb = {"name": "pod-a", "applied_revision": 1, "ready": False}
        assert problem(pod_b.post("/api/v1/agent/heartbeat", json=hb), 403)
        report = {"pod": "pod-a", "live": []}
        assert problem(pod_b.post("/api/v1/agent/sessions/report", json=report), 403)
        assert problem(pod_b.post("/api/v1/agent/flows", json={"pod": "pod-a", "records": []}), 403)
        assert problem(pod_b.post("/api/v1/agent/denied", json={"pod": "pod-a", "events": []}), 403)
        # Two live pods cannot claim one address (gateway routes point at it).
        r = pod_b.post("/api/v1/agent/register", json={"name": "pod-b", "pod_ip": "192.0.2.10"})
        assert "belongs to live pod 'pod-a'" in problem(r, 409)
        # Pod credentials are made by enrollment only.
        r = admin.post("/api/v1/tokens", json={"name": "fake", "role": "pod"})
        assert "enrollment" in problem(r, 422)
    pods = {p["name"]: p for p in admin.get("/api/v1/pods").json()}
    assert pods["pod-a"]["pod_ip"] == "192.0.2.10" and pods["pod-b"]["pod_ip"] == "192.0.2.11"
    # Every pod's server certificate names the pod under the prefix clients check.
    with server.client(server.pod_token("pod-c")) as pod_c:
        cert = pod_c.post("/api/v1/agent/register", json={"name": "pod-c"}).json()["cert_pem"]
    cn = x509.load_pem_x509_certificate(cert.encode()).subject.get_attributes_for_oid(
        x509.NameOID.COMMON_NAME
    )
    assert cn[0].value == "server.pod-c"
    admin.post("/api/v1/users", json={"name": "alice"}).raise_for_status()
    profile = admin.get("/api/v1/users/alice/profile").text
    assert "verify-x509-name server. name-prefix" in profile


def test_a_pod_whose_enrollment_answer_was_lost_enrolls_again_at_once(
    server: Server, admin: httpx.Client
) -> None:
    """The answer to an enrollment can be lost (a timeout, a reset connection): the pod then
    has no credential and asks again. It used to be refused its own name ("enrolled and
    alive") until the lease ran out: 90 s of a new pod doing nothing."""
    enroll = {"name": "pod-a"}
    with (
        server.client(server.make_token("agent")) as enroller,
        server.client(server.make_token("agent")) as other,
    ):
        lost = enroller.post("/api/v1/agent/enroll", json=enroll)
        assert lost.status_code == 201, lost.text
        # Another enrollment token may not take the name meanwhile.
        assert "enrolled and alive" in problem(other.post("/api/v1/agent/enroll", json=enroll), 409)
        again = enroller.post("/api/v1/agent/enroll", json=enroll)
        assert again.status_code == 201, again.text
        token = again.json()["token"]
        assert token != lost.json()["token"]
        with server.client(lost.json()["token"]) as stale:  # the lost one is revoked
            assert problem(stale.post("/api/v1/agent/register", json=enroll), 401)
        with server.client(token) as pod:
            pod.post("/api/v1/agent/register", json=enroll).raise_for_status()
        # Once the pod has used its credential, the name is its own until the lease ends.
        taken = enroller.post("/api/v1/agent/enroll", json=enroll)
        assert "enrolled and alive" in problem(taken, 409)
    audit = admin.get("/api/v1/audit/admin", params={"action": "pod.enroll"}).json()
    assert sorted(bool(a["after"].get("replaces_unused_credential")) for a in audit) == [
        False,
        True,
    ]


def test_a_registration_whose_credential_is_revoked_meanwhile_gets_no_key(
    server: Server, admin: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A never-used credential may be replaced by the lost-answer enrollment above while its
    pod's first request is under way: that request passed the token check just before the
    revocation. It must not get the pod's key with a credential revoked meanwhile. (Forced
    here: the revocation is committed between the token check and the registration.)"""
    token = server.pod_token("pod-r")
    real = state_module._admit_pod

    def revoked_right_after_the_check(*args: Any) -> Any:
        who = real(*args)
        engine = create_engine(server.database_url)
        try:
            with engine.begin() as conn:
                conn.execute(
                    update(AdminToken)
                    .where(AdminToken.id == who.token_id)
                    .values(revoked_at=dt.datetime.now(dt.UTC))
                )
        finally:
            engine.dispose()
        return who

    monkeypatch.setattr(state_module, "_admit_pod", revoked_right_after_the_check)
    with server.client(token) as pod:
        r = pod.post("/api/v1/agent/register", json={"name": "pod-r"})
        assert "revoked" in problem(r, 401)
        assert "key_pem" not in r.text


def test_session_facts_are_checked(server: Server, admin: httpx.Client) -> None:
    admin.post("/api/v1/users", json={"name": "gus", "mode": "gateway"}).raise_for_status()
    admin.post("/api/v1/users", json={"name": "nat", "max_sessions": 5}).raise_for_status()
    lease = admin.get("/api/v1/users/gus").json()["gateway_address"]
    assert lease
    with (
        _registered(server, "pod-a", "192.0.2.10") as pod_a,
        _registered(server, "pod-b", "192.0.2.11") as pod_b,
    ):
        # A gateway session must carry the user's leased address...
        r = _open(pod_a, "pod-a", "pod-a-gw000001", "gus", "10.1.2.3", mode="gateway")
        assert r.json()["allowed"] is False
        assert "not the gateway address leased to gus" in r.json()["reason"]
        # ...a NAT user cannot be given a gateway session at all...
        r = _open(pod_a, "pod-a", "pod-a-gw000002", "nat", lease, mode="gateway")
        assert r.json()["allowed"] is False
        # ...and a NAT session an address of the pod's own NAT pool.
        r = _open(pod_a, "pod-a", "pod-a-nat00001", "nat", "10.1.2.3")
        assert r.json()["allowed"] is False and "outside pod pod-a's NAT pool" in r.json()["reason"]
        # Opening a session on another pod is refused outright.
        r = _open(pod_b, "pod-a", "pod-a-nat00002", "nat", "10.200.0.9")
        assert problem(r, 403)
        ok = _open(pod_a, "pod-a", "pod-a-gw000003", "gus", lease, mode="gateway")
        assert ok.json()["allowed"] is True, ok.text
        assert _open(pod_a, "pod-a", "pod-a-nat00003", "nat", "10.200.0.9").json()["allowed"]
        # B cannot close A's session, and cannot re-open A's uid as its own.
        close = {"uid": "pod-a-gw000003", "ended_at": _now()}
        assert "cannot close it" in problem(
            pod_b.post("/api/v1/agent/sessions/close", json=close), 403
        )
        r = _open(pod_b, "pod-b", "pod-a-gw000003", "gus", lease, mode="gateway")
        assert problem(r, 409)
        snap = pod_a.get("/api/v1/agent/snapshot").json()
    live = admin.get("/api/v1/sessions", params={"active": "true"}).json()
    assert sorted((s["pod"], s["tunnel_ip"]) for s in live) == [
        ("pod-a", "10.200.0.9"),
        ("pod-a", lease),
    ]
    # The router follower installs exactly the one real gateway route.
    routes = desired_routes(FleetView.from_snapshot(Snapshot.model_validate(snap)))
    assert routes == {f"{lease}/32": "192.0.2.10"}


def test_gateway_routes_only_inside_the_gateway_pool() -> None:
    """Even a session row with a foreign address (written before these checks) gets no route."""
    view = FleetView()
    view.pools[1] = PoolState(id=1, name="gateway", kind="gateway", cidr="10.201.0.0/16")
    view.pools[2] = PoolState(id=2, name="default", kind="nat", cidr="10.200.0.0/16")
    view.pods["pod-a"] = PodState(id=1, name="pod-a", pod_ip="192.0.2.10")
    view.pods["pod-b"] = PodState(id=2, name="pod-b", pod_ip=None)

    def live(uid: str, pod: str, ip: str) -> LiveSession:
        return LiveSession(
            uid=uid, user="u", pod=pod, tunnel_ip=ip, mode="gateway", real_ip=None, kill=None
        )

    for s in (
        live("a1", "pod-a", "10.201.0.5"),
        live("a2", "pod-a", "10.1.2.3"),  # outside the gateway pool
        live("a3", "pod-a", "10.200.0.7"),  # a NAT address
        live("b1", "pod-b", "10.201.0.6"),  # pod without an address
        live("c1", "ghost", "10.201.0.8"),  # pod not registered
    ):
        view.sessions[s.uid] = s
    assert desired_routes(view) == {"10.201.0.5/32": "192.0.2.10"}


def test_revoked_pod_is_cut_off(server: Server, admin: httpx.Client) -> None:
    admin.post("/api/v1/users", json={"name": "ann"}).raise_for_status()
    token = server.pod_token("pod-a")
    with server.client(token) as pod_a:
        pod_a.post("/api/v1/agent/register", json={"name": "pod-a"}).raise_for_status()
        assert _open(pod_a, "pod-a", "pod-a-ann00001", "ann", "10.200.0.9").json()["allowed"]
        serial = str(
            x509.load_pem_x509_certificate(
                pod_a.post("/api/v1/agent/register", json={"name": "pod-a"})
                .json()["cert_pem"]
                .encode()
            ).serial_number
        )
        out = admin.post("/api/v1/pods/pod-a/revoke")
        assert out.status_code == 200, out.text
        assert out.json()["sessions_closed"] == 1 and out.json()["credentials"] == 1
        assert problem(pod_a.post("/api/v1/agent/register", json={"name": "pod-a"}), 401)
    ended = admin.get("/api/v1/sessions", params={"user": "ann"}).json()
    assert ended[0]["end_reason"] == "pod revoked by an administrator"
    # ann may connect elsewhere at once.
    with _registered(server, "pod-b", "192.0.2.11") as pod_b:
        assert _open(pod_b, "pod-b", "pod-b-ann00002", "ann", "10.200.0.10").json()["allowed"]
    # Its certificate is in the CRL; its name stays refused until forgotten.
    crl = x509.load_pem_x509_crl(admin.get("/api/v1/pki/crl").content)
    assert crl.get_revoked_certificate_by_serial_number(int(serial)) is not None
    with server.client(server.make_token("agent")) as enroller:
        again = enroller.post("/api/v1/agent/enroll", json={"name": "pod-a"})
        assert "vpnfleet pod forget pod-a" in problem(again, 403)
        assert admin.delete("/api/v1/pods/pod-a").status_code == 204
        assert enroller.post("/api/v1/agent/enroll", json={"name": "pod-a"}).status_code == 201
    assert problem(admin.post("/api/v1/pods/ghost/revoke"), 404)
    actions = [a["action"] for a in admin.get("/api/v1/audit/admin").json()]
    assert {"pod.revoke", "pod.forget", "pod.enroll"} <= set(actions)


def test_a_silent_pod_loses_its_sessions_after_its_lease(
    server: Server, admin: httpx.Client
) -> None:
    """A pod that died without a word: its users connect elsewhere once the lease (90 s)
    has run out, its sessions are closed by the sweep, `user kill` ends them, and a name
    whose lease ended may enroll again (its old credential and key revoked)."""
    for name in ("dan", "eva"):
        admin.post("/api/v1/users", json={"name": name}).raise_for_status()
    old_token = server.pod_token("pod-a")
    with server.client(old_token) as pod_a, _registered(server, "pod-b", "192.0.2.11") as pod_b:
        pod_a.post("/api/v1/agent/register", json={"name": "pod-a"}).raise_for_status()
        assert _open(pod_a, "pod-a", "pod-a-dan00001", "dan", "10.200.0.9").json()["allowed"]
        assert _open(pod_a, "pod-a", "pod-a-eva00001", "eva", "10.200.0.8").json()["allowed"]
        # Within the lease the limit (1) holds: another device of dan's is refused.
        r = _open(pod_b, "pod-b", "pod-b-dan00002", "dan", "10.200.0.10", real_ip="203.0.113.1")
        assert r.json()["allowed"] is False
        _age_pod(server, "pod-a", 60)
        r = _open(pod_b, "pod-b", "pod-b-dan00003", "dan", "10.200.0.10", real_ip="203.0.113.1")
        assert r.json()["allowed"] is False, "60 s of silence is within the 90 s lease"
        _age_pod(server, "pod-a", 100)
        # Past the lease: dan connects elsewhere at once (no sweep needed).
        r = _open(pod_b, "pod-b", "pod-b-dan00004", "dan", "10.200.0.10", real_ip="203.0.113.1")
        assert r.json()["allowed"] is True, r.text
        # The sweep closes eva's session too (every 5 s).
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            live = admin.get("/api/v1/sessions", params={"user": "eva", "active": "true"}).json()
            if not live:
                break
            time.sleep(0.5)
        eva = admin.get("/api/v1/sessions", params={"user": "eva"}).json()
        assert eva[0]["ended_at"] and eva[0]["end_reason"] == "pod lease expired (no heartbeat)"
        pods = {p["name"]: p for p in admin.get("/api/v1/pods").json()}
        assert pods["pod-a"]["ready"] is False
        # The name is free again: a new enrollment revokes the old credential.
        with server.client(server.make_token("agent")) as enroller:
            assert enroller.post("/api/v1/agent/enroll", json={"name": "pod-a"}).status_code == 201
        assert problem(pod_a.post("/api/v1/agent/register", json={"name": "pod-a"}), 401)
    audit = admin.get("/api/v1/audit/admin", params={"action": "pod.lease_expired"}).json()
    assert audit and audit[0]["target"] == "pod-a"


def test_user_kill_ends_sessions_of_a_dead_pod_and_a_returning_pod_is_told(
    server: Server, admin: httpx.Client
) -> None:
    admin.post("/api/v1/users", json={"name": "fay", "max_sessions": 3}).raise_for_status()
    with _registered(server, "pod-a", "192.0.2.10") as pod_a:
        assert _open(pod_a, "pod-a", "pod-a-fay00001", "fay", "10.200.0.9").json()["allowed"]
        r = _open(pod_a, "pod-a", "pod-a-fay00002", "fay", "10.200.0.8", real_ip="203.0.113.5")
        assert r.json()["allowed"]
        _age_pod(server, "pod-a", 100)
        out = admin.post("/api/v1/users/fay/kill").json()
        assert out["sessions"] == 2
        rows = admin.get("/api/v1/sessions", params={"user": "fay"}).json()
        assert all(r["ended_at"] for r in rows)
        assert {r["end_reason"] for r in rows} == {"disconnected by an administrator"}
        # The pod was only cut off: when it reports again, it learns which of its sessions
        # ended here, and disconnects them.
        pod_a.post(
            "/api/v1/agent/heartbeat", json={"name": "pod-a", "applied_revision": 0, "ready": True}
        ).raise_for_status()
        out = pod_a.post(
            "/api/v1/agent/sessions/report",
            json={"pod": "pod-a", "live": ["pod-a-fay00001", "pod-a-fay00002"]},
        ).json()
        assert out == {"closed": 0, "ended": ["pod-a-fay00001", "pod-a-fay00002"]}
