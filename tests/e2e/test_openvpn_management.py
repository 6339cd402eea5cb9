"""The management client against a real OpenVPN 2.6 server and a real client.

Server config and client profile come from our renderers, certificates from our PKI; the
server runs in one namespace, the client in another, joined by a veth pair.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
from collections.abc import AsyncIterator

import pytest

from tests.e2e.netns import existing_namespaces, requires_netns
from tests.e2e.ovpn_fixtures import (
    CLIENT_IP,
    OpenVPNProcess,
    OvpnLab,
    drain_events,
    next_client_event,
)
from tests.polling import until
from vpnfleet.agent.management import (
    CommandError,
    CommandTimeout,
    ManagementClient,
    ManagementClosed,
)
from vpnfleet.core.mgmt_protocol import (
    ClientAddress,
    ClientEvent,
    ClientEventKind,
    Event,
    Hold,
    Notification,
)
from vpnfleet.core.ovpn_config import DATA_CIPHERS
from vpnfleet.core.webauth import announces_webauth, web_auth_extra

pytestmark = [pytest.mark.e2e, requires_netns("openvpn")]

ALICE_IP = "10.77.0.23"
PUSH_ALICE = [f"ifconfig-push {ALICE_IP} 255.255.255.0"]


@pytest.fixture
async def lab() -> AsyncIterator[OvpnLab]:
    lab = OvpnLab.create()
    try:
        yield lab
    finally:
        await lab.aclose()
    assert existing_namespaces(lab.pool.base) == []


async def start_pod(lab: OvpnLab, **kwargs: object) -> tuple[OpenVPNProcess, ManagementClient]:
    """Start openvpn on hold, attach the management client, release the hold."""
    server = lab.start_server(**kwargs)  # type: ignore[arg-type]
    mgmt = await lab.connect_mgmt()
    assert isinstance(await mgmt.next_event(timeout=10), Hold)
    await mgmt.hold_release()
    await server.wait_log(r"Initialization Sequence Completed", 15)
    return server, mgmt


async def connect_alice(lab: OvpnLab, mgmt: ManagementClient) -> tuple[OpenVPNProcess, ClientEvent]:
    """Start client 'alice', authorize her with ALICE_IP, return once she is established."""
    client = lab.start_client("alice")
    connect = await next_client_event(mgmt, ClientEventKind.CONNECT)
    assert connect.kid is not None
    await mgmt.client_auth(connect.cid, connect.kid, PUSH_ALICE)
    await next_client_event(mgmt, ClientEventKind.ESTABLISHED, cid=connect.cid)
    await client.wait_log(r"Initialization Sequence Completed", 15)
    return client, connect


async def test_management_session_basics(lab: OvpnLab) -> None:
    server = lab.start_server()
    mgmt = await lab.connect_mgmt()
    assert "Management Interface" in mgmt.greeting
    assert isinstance(await mgmt.next_event(timeout=10), Hold)

    # On hold the daemon is not in server mode yet: status is refused, not empty.
    with pytest.raises(CommandError, match="not supported"):
        await mgmt.status()
    version = await mgmt.version()
    assert version.openvpn.startswith("OpenVPN 2.")
    assert version.management is not None and version.management >= 5
    assert await mgmt.pid() == server.pid
    with pytest.raises(CommandError, match="unknown command"):
        await mgmt.command("no-such-command")

    await mgmt.hold_release()
    await server.wait_log(r"Initialization Sequence Completed", 15)
    assert await mgmt.status() == []

    # With real-time log on, openvpn writes >LOG lines while a listing is in flight; the
    # listing stays intact and the log line arrives as an event.
    await mgmt.command("log on")
    assert await mgmt.status() == []
    logs = [e for e in await drain_events(mgmt, 1.0) if isinstance(e, Notification)]
    assert any(e.kind == "LOG" and "CMD 'status 3'" in e.text for e in logs)


async def test_unanswered_command_times_out_and_closes_the_session(lab: OvpnLab) -> None:
    server = lab.start_server()
    mgmt = await lab.connect_mgmt()
    os.kill(server.pid, signal.SIGSTOP)  # a wedged openvpn: the socket stays, nobody answers
    try:
        with pytest.raises(CommandTimeout):
            await mgmt.pid(timeout=1.0)
        assert mgmt.closed  # a late reply must not be taken for the next command's
        with pytest.raises(ManagementClosed):
            await mgmt.pid()
    finally:
        os.kill(server.pid, signal.SIGCONT)
    mgmt2 = await lab.connect_mgmt()
    assert await mgmt2.pid() == server.pid

    # Cancelling a command from outside (asyncio.timeout, task cancel) is the same hazard.
    os.kill(server.pid, signal.SIGSTOP)
    try:
        task = asyncio.create_task(mgmt2.pid(timeout=30))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert mgmt2.closed
    finally:
        os.kill(server.pid, signal.SIGCONT)


async def test_client_auth_pushes_the_agents_address(lab: OvpnLab) -> None:
    _, mgmt = await start_pod(lab)
    client = lab.start_client("alice")

    seen: list[Event] = []
    connect = await next_client_event(mgmt, ClientEventKind.CONNECT, seen=seen)
    assert connect.common_name == "alice"
    assert connect.env["untrusted_ip"] == CLIENT_IP
    assert connect.cid == 0  # the first client of a fresh openvpn process
    assert connect.kid is not None
    # The client has no address until the agent gives one: there is no ifconfig-pool.
    assert await lab.client_tunnel_ipv4() is None

    await mgmt.client_auth(connect.cid, connect.kid, PUSH_ALICE)
    await next_client_event(mgmt, ClientEventKind.ESTABLISHED, cid=connect.cid, seen=seen)
    assert ClientAddress(connect.cid, ALICE_IP, True) in seen

    await client.wait_log(r"Initialization Sequence Completed", 15)
    assert await lab.client_tunnel_ipv4() == f"{ALICE_IP}/24"
    assert await lab.probe_through_tunnel() == f"pong {ALICE_IP}"


async def test_status_lists_pending_then_authorized_client(lab: OvpnLab) -> None:
    _, mgmt = await start_pod(lab)
    lab.start_client("alice")
    connect = await next_client_event(mgmt, ClientEventKind.CONNECT)

    (pending,) = await mgmt.status()
    assert pending.common_name == "alice"
    assert pending.client_id == connect.cid
    assert pending.virtual_address is None  # waiting for client-auth
    assert pending.real_ip == CLIENT_IP

    assert connect.kid is not None
    await mgmt.client_auth(connect.cid, connect.kid, PUSH_ALICE)
    await next_client_event(mgmt, ClientEventKind.ESTABLISHED, cid=connect.cid)
    (row,) = await mgmt.status()
    assert row.common_name == "alice"
    assert row.virtual_address == ALICE_IP
    assert row.client_id == connect.cid
    assert row.real_ip == CLIENT_IP and row.real_port
    assert row.data_channel_cipher in DATA_CIPHERS.split(":")
    assert row.bytes_received > 0 and row.bytes_sent > 0
    assert row.connected_since is not None
    assert abs(dt.datetime.now(dt.UTC) - row.connected_since) < dt.timedelta(minutes=2)
    assert row.username is None


async def test_client_deny_reason_is_shown_by_the_client(lab: OvpnLab) -> None:
    server, mgmt = await start_pod(lab)
    client = lab.start_client("alice")
    connect = await next_client_event(mgmt, ClientEventKind.CONNECT)
    assert connect.kid is not None

    # Quotes and a backslash check our escaping against OpenVPN's own lexer.
    client_reason = 'Your account is "disabled", call IT \\ helpdesk'
    await mgmt.client_deny(connect.cid, connect.kid, "account disabled", client_reason)

    # The stock client logs the reason and, with the default auth-retry none, exits.
    await client.wait_exit(20)
    assert f"AUTH_FAILED,{client_reason}" in client.log()
    assert "connection rejected: account disabled" in server.log()
    assert await lab.client_tunnel_ipv4() is None


async def test_pending_web_auth_reaches_a_client_that_announces_it(lab: OvpnLab) -> None:
    """The building blocks of SSO with a stock 2.6 client: it announces web auth (IV_SSO),
    gets the login URL while its connection waits, and is admitted when the answer comes."""
    _, mgmt = await start_pod(lab)
    client = lab.start_client("alice", extra="setenv IV_SSO webauth\n")
    connect = await next_client_event(mgmt, ClientEventKind.CONNECT)
    assert connect.kid is not None
    assert announces_webauth(connect.env)
    url = "https://vpn.example.test/sso/login/Zq8-x_4"
    await mgmt.client_pending_auth(connect.cid, connect.kid, web_auth_extra(url), 30)
    await until(lambda: f"WEB_AUTH::{url}" in client.log(), 20, "the URL in the client's log")
    assert "AUTH_PENDING" in client.log()
    await asyncio.sleep(2)  # still waiting for the login: no tunnel
    assert await lab.client_tunnel_ipv4() is None
    await mgmt.client_auth(connect.cid, connect.kid, PUSH_ALICE)
    await next_client_event(mgmt, ClientEventKind.ESTABLISHED, cid=connect.cid)
    assert await until(lab.client_tunnel_ipv4, 20, "the tunnel") == f"{ALICE_IP}/24"


async def test_a_client_without_web_auth_does_not_announce_it(lab: OvpnLab) -> None:
    _, mgmt = await start_pod(lab)
    client = lab.start_client("alice")
    connect = await next_client_event(mgmt, ClientEventKind.CONNECT)
    assert connect.kid is not None
    assert not announces_webauth(connect.env)
    await mgmt.client_deny(connect.cid, connect.kid, "sso", "single sign-on login required")
    await client.wait_exit(20)
    assert "AUTH_FAILED,single sign-on login required" in client.log()


async def test_client_kill_restart_makes_the_client_reconnect(lab: OvpnLab) -> None:
    _, mgmt = await start_pod(lab)
    client, first = await connect_alice(lab, mgmt)

    await mgmt.client_kill(first.cid)

    # The old instance lingers briefly after the kill, so the reconnect's CONNECT may come
    # before the DISCONNECT of the old CID: accept either order.
    seen: list[Event] = []
    await next_client_event(mgmt, ClientEventKind.DISCONNECT, cid=first.cid, seen=seen)
    early = [e for e in seen if isinstance(e, ClientEvent) and e.kind is ClientEventKind.CONNECT]
    again = early[0] if early else await next_client_event(mgmt, ClientEventKind.CONNECT)
    assert again.common_name == "alice"
    assert again.cid > first.cid  # a new instance, never a reused id
    assert "server-pushed-connection-reset" in client.log()
    assert client.running


async def test_client_kill_halt_stops_the_client(lab: OvpnLab) -> None:
    _, mgmt = await start_pod(lab)
    client, first = await connect_alice(lab, mgmt)

    await mgmt.client_kill(first.cid, "HALT,maintenance")

    await next_client_event(mgmt, ClientEventKind.DISCONNECT, cid=first.cid)
    await client.wait_exit(20)
    assert "Halt command was pushed by server ('maintenance')" in client.log()


async def test_client_refuses_a_server_certificate_that_is_not_a_fleet_servers(
    lab: OvpnLab,
) -> None:
    """A serverAuth certificate from the fleet's own CA, for a name that is not a pod's (the
    control plane's HTTPS name, say): the stock client with our profile refuses it."""
    from vpnfleet.controlplane import pki as pkimod

    lab.certs.server = pkimod.issue_server_cert(lab.certs.ca, "vpnfleet-control.vpnfleet.svc")
    server, mgmt = await start_pod(lab)
    client = lab.start_client("alice")
    await client.wait_log(r"VERIFY X509NAME ERROR: CN=vpnfleet-control\.vpnfleet\.svc", 20)
    leaked = [e for e in await drain_events(mgmt, 2.0) if isinstance(e, ClientEvent)]
    assert leaked == []  # never got as far as asking the pod to let it in
    assert await lab.client_tunnel_ipv4() is None
    assert server.running


async def test_revoked_certificate_is_refused_before_connect(lab: OvpnLab) -> None:
    mallory = lab.certs.client("mallory")
    server, mgmt = await start_pod(lab, revoked=[mallory])

    lab.start_client("mallory", mallory)
    await server.wait_log(r"VERIFY ERROR.*certificate revoked.*CN=mallory", 20)
    leaked = [e for e in await drain_events(mgmt, 2.0) if isinstance(e, ClientEvent)]
    assert leaked == []

    # The same server still lets a certificate that is not on the CRL through.
    lab.start_client("alice")
    connect = await next_client_event(mgmt, ClientEventKind.CONNECT)
    assert connect.common_name == "alice"


async def test_crl_update_applies_to_new_connections_without_restart(lab: OvpnLab) -> None:
    server, mgmt = await start_pod(lab)
    mallory = lab.certs.client("mallory")
    lab.write_crl([mallory])  # what the agent does when a certificate is revoked

    lab.start_client("mallory", mallory)
    await server.wait_log(r"VERIFY ERROR.*certificate revoked.*CN=mallory", 20)
    assert not [e for e in await drain_events(mgmt, 2.0) if isinstance(e, ClientEvent)]


async def test_openvpn_restart_closes_session_and_client_comes_back(lab: OvpnLab) -> None:
    server, mgmt = await start_pod(lab)
    client, first = await connect_alice(lab, mgmt)
    assert first.cid == 0

    server.stop()
    await asyncio.wait_for(mgmt.wait_closed(), 15)
    assert mgmt.closed
    assert "closed the management connection" in mgmt.close_reason
    with pytest.raises(ManagementClosed):
        await mgmt.status()
    remaining = [e async for e in mgmt.events()]  # ends instead of hanging
    assert all(not isinstance(e, ClientEvent) or e.cid == first.cid for e in remaining)

    server.start()
    mgmt2 = await lab.connect_mgmt()
    assert isinstance(await mgmt2.next_event(timeout=10), Hold)
    await mgmt2.hold_release()
    again = await next_client_event(mgmt2, ClientEventKind.CONNECT, time_limit=60)
    assert again.common_name == "alice"
    assert again.cid == 0  # client ids restart with the process
    assert again.kid is not None
    await mgmt2.client_auth(again.cid, again.kid, PUSH_ALICE)
    await next_client_event(mgmt2, ClientEventKind.ESTABLISHED, cid=again.cid)
    assert client.running
    assert await lab.probe_through_tunnel() == f"pong {ALICE_IP}"
