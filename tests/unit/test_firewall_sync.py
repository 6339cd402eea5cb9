"""The firewall sync against the fake firewall runner: what it reports is what the kernel holds,
revocations survive restarts and failures, drift is judged against the applied state."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import AsyncIterator, Sequence

import pytest

from vpnfleet.agent.fakes import FakeFirewall
from vpnfleet.agent.firewall import FirewallSync
from vpnfleet.core import fwstate, grants, revocation

NAT = ipaddress.IPv4Network("10.200.0.0/24")
A = ipaddress.IPv4Address("10.200.0.2")
B = ipaddress.IPv4Address("10.200.0.3")
SVC = ipaddress.IPv4Address("10.20.0.5")
TCP_80 = grants.Grant(ipaddress.IPv4Network("10.20.0.0/24"), "tcp", 80)


def state(
    members: set[ipaddress.IPv4Address],
    grants: tuple[grants.Grant, ...] = (TCP_80,),
    clients: set[ipaddress.IPv4Address] | None = None,
) -> fwstate.DesiredState:
    everyone = frozenset(clients if clients is not None else {A, B})
    return fwstate.DesiredState(
        prefix="vpnf",
        tunnel_networks=(NAT,),
        uplink=None,
        nat_members=everyone,
        all_clients=everyone,
        groups=(fwstate.GroupAccess(group_id=1, members=frozenset(members), grants=grants),),
    )


def flow(src: ipaddress.IPv4Address, dport: int) -> revocation.Flow:
    return revocation.Flow("tcp", 6, src, SVC, 40000, dport)


class Source:
    """The view's revision and desired state, as the agent's wiring provides them."""

    def __init__(self, revision: int, s: fwstate.DesiredState) -> None:
        self.revision, self.state = revision, s

    def __call__(self) -> tuple[int, fwstate.DesiredState]:
        return self.revision, self.state


@contextlib.asynccontextmanager
async def running(sync: FirewallSync) -> AsyncIterator[None]:
    task = asyncio.create_task(sync.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def settle(sync: FirewallSync) -> None:
    assert await sync.wait_idle(5), "the firewall sync did not settle"


async def test_nothing_is_applied_before_the_session_book_is_complete() -> None:
    fake = FakeFirewall()
    sync = FirewallSync(fake, Source(5, state({A})))
    async with running(sync):
        sync.poke()
        await asyncio.sleep(0.05)
        assert fake.applies == [] and not sync.ready
        sync.start()
        await sync.wait_ready()
        await settle(sync)
    assert fake.applies == ["full"] and sync.applied_revision == 5


async def test_the_reported_revision_never_runs_ahead_of_the_kernel() -> None:
    fake = FakeFirewall()
    src = Source(5, state({A}))
    sync = FirewallSync(fake, src)
    sync.start()
    async with running(sync):
        sync.poke()
        await sync.wait_ready()
        await settle(sync)
        assert sync.applied_revision == 5
        # Revision 6 removes B... and the apply blocks halfway.
        fake.gate = asyncio.Event()
        src.revision, src.state = 6, state({A}, clients={A})
        sync.poke()
        sync.note_revision(6)
        await asyncio.wait_for(fake.entered.wait(), 5)
        sync.note_revision(7)  # a change that does not concern the firewall
        assert sync.applied_revision == 5
        assert fake.kernel is not None and B in fake.kernel.all_clients
        fake.gate.set()
        await settle(sync)
        assert sync.applied_revision == 7  # 7 changed nothing the firewall depends on
        assert fake.kernel is src.state
        # Idle: an unrelated revision is enforced at once.
        sync.note_revision(8)
        assert sync.applied_revision == 8


async def test_a_change_during_an_apply_is_not_reported_until_applied() -> None:
    fake = FakeFirewall()
    src = Source(5, state({A}))
    sync = FirewallSync(fake, src)
    sync.start()
    async with running(sync):
        sync.poke()
        await settle(sync)
        fake.gate = asyncio.Event()
        src.revision, src.state = 6, state({A, B})
        sync.poke()
        sync.note_revision(6)
        await asyncio.wait_for(fake.entered.wait(), 5)
        six = src.state
        src.revision, src.state = 7, state({B})
        sync.poke()  # 7 matters: it must not ride on 6's apply
        sync.note_revision(7)
        # 6's apply finishes; 7's blocks in turn.
        first, fake.gate = fake.gate, asyncio.Event()
        fake.entered.clear()
        first.set()
        await asyncio.wait_for(fake.entered.wait(), 5)
        assert sync.applied_revision == 6 and fake.kernel is six
        fake.gate.set()
        fake.gate = None
        await settle(sync)
        assert sync.applied_revision == 7 and fake.kernel is src.state


async def test_a_restart_cuts_what_was_revoked_while_the_agent_was_down() -> None:
    fake = FakeFirewall()
    fake.flows = [flow(A, 80), flow(B, 80), flow(B, 22)]
    # A left group 1 while no agent ran: its stream to port 80 must go, B's stays.
    sync = FirewallSync(fake, Source(9, state({B})))
    sync.start()
    async with running(sync):
        sync.poke()
        await settle(sync)
    assert fake.cuts == ["walk"]
    assert fake.flows == [flow(B, 80)]


async def test_the_restart_cut_uses_the_flow_index_when_it_is_complete() -> None:
    fake = FakeFirewall()
    fake.flows = [flow(A, 80), flow(B, 80)]
    index: list[revocation.Flow] | None = None

    def open_flows() -> Sequence[revocation.Flow] | None:
        return index

    sync = FirewallSync(fake, Source(9, state({B})), open_flows=open_flows)
    index = list(fake.flows)
    sync.start()
    async with running(sync):
        sync.poke()
        await settle(sync)
    assert fake.cuts == ["index"] and fake.flows == [flow(B, 80)]


async def test_a_failed_apply_loses_no_revocation() -> None:
    fake = FakeFirewall()
    src = Source(1, state({A, B}))
    sync = FirewallSync(fake, src)
    sync.start()
    async with running(sync):
        sync.poke()
        await settle(sync)
        fake.flows = [flow(A, 80), flow(B, 80)]
        fake.cuts.clear()
        # A is removed from the group, and the apply fails once: the diff's revocations are
        # lost with it; the retry is a full apply, which must still cut A's stream.
        fake.fail_next = 1
        src.revision, src.state = 2, state({B})
        sync.poke()
        sync.note_revision(2)
        await settle(sync)
        assert sync.failures == 1
        assert sync.applied_revision == 2
    assert fake.flows == [flow(B, 80)]
    assert fake.cuts[-1] == "walk"


async def test_a_failed_cut_is_retried() -> None:
    fake = FakeFirewall()
    fake.flows = [flow(A, 80)]
    fake.fail_cuts = 1
    sync = FirewallSync(fake, Source(3, state(set())))
    sync.start()
    async with running(sync):
        sync.poke()
        await settle(sync)
        for _ in range(100):
            if not fake.flows:
                break
            await asyncio.sleep(0.05)
    assert fake.flows == [] and fake.cuts == ["walk"]


async def test_drift_is_judged_against_the_applied_state_and_repaired() -> None:
    fake = FakeFirewall()
    src = Source(1, state({A}))
    sync = FirewallSync(fake, src)
    sync.start()
    async with running(sync):
        sync.poke()
        await settle(sync)
        # Pending changes are not drift: with an apply queued, the check waits.
        fake.gate = asyncio.Event()
        src.revision, src.state = 2, state({A, B})
        sync.poke()
        await asyncio.wait_for(fake.entered.wait(), 5)
        sync.check_drift_soon()
        fake.gate.set()
        fake.gate = None
        await settle(sync)
        assert sync.drift_repairs == 0
        # Someone adds B to group 1's members by hand... no: someone flushes A out.
        fake.tamper(state(set()))
        fake.flows = [flow(B, 80)]
        sync.check_drift_soon()
        await settle(sync)
        assert sync.drift_repairs > 0
        assert fake.kernel is src.state and fake.applies[-1] == "full"
        assert fake.flows == [flow(B, 80)]  # B is allowed under the repaired state


@pytest.mark.parametrize("burst", [20])
async def test_no_false_drift_under_a_burst_of_changes(burst: int) -> None:
    fake = FakeFirewall()
    src = Source(1, state({A}))
    sync = FirewallSync(fake, src)
    sync.start()
    async with running(sync):
        sync.poke()
        await settle(sync)
        for i in range(burst):
            src.revision, src.state = 2 + i, state({A} if i % 2 else {A, B})
            sync.poke()
            sync.note_revision(src.revision)
            sync.check_drift_soon()
            await asyncio.sleep(0)
        await settle(sync)
    assert sync.drift_repairs == 0 and sync.applied_revision == 1 + burst


async def test_an_over_limit_group_does_not_freeze_the_firewall() -> None:
    # The reproducer: a group stored with 17 x "tcp 2-65535" (more elements than the
    # firewall may hold). Before: building the state raised, the sync retried forever, never
    # became ready and applied no later change. Now that group grants nothing, the rest applies.
    from tests.unit.test_fwdesired import OPS_ALL, _over_limit_fleet, builder
    from vpnfleet.core.fleet import FleetView
    from vpnfleet.core.sessionbook import BookConfig, SessionBook
    from vpnfleet.wire import RuleState

    gw = ipaddress.IPv4Network("10.201.0.0/24")
    book = SessionBook(BookConfig(NAT, gw))
    b = builder()
    view: list[FleetView] = [_over_limit_fleet()]

    def source() -> tuple[int, fwstate.DesiredState]:
        return view[0].revision, b.build(view[0], book)

    fw = FakeFirewall()
    sync = FirewallSync(fw, source)
    async with running(sync):
        sync.start()
        await asyncio.wait_for(sync.wait_ready(), 5)
        assert await sync.wait_idle(5)
        assert sync.failures == 0 and sync.applied_revision == 3
        assert fw.kernel is not None
        by_id = {g.group_id: g for g in fw.kernel.groups}
        assert by_id[1].grants == () and by_id[2].grants != ()
        # A later change (a new ops rule) is applied.
        extra = RuleState(id=12, group_id=2, destination="10.30.0.0/24", proto="udp", ports="53")
        assert extra != OPS_ALL
        view[0] = _over_limit_fleet(revision=4, extra=[extra])
        sync.poke()
        sync.note_revision(4)
        assert await sync.wait_idle(5)
        assert sync.applied_revision == 4
        by_id = {g.group_id: g for g in fw.kernel.groups}
        assert len(by_id[2].grants) == 2 and by_id[1].grants == ()
