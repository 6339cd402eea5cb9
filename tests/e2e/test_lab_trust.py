"""Trust boundaries in the lab, with real OpenVPN on 2 pods and a real control plane.

- Each pod enrolled on its own: pod1's credential (read from its state directory, as an
  attacker who took pod1 would) cannot register as pod2 nor obtain pod2's key, and the
  enrollment token cannot take pod2's name while pod2 lives.
- A pod killed with SIGKILL (agent and OpenVPN) and never restarted: once its lease runs out
  its sessions are closed, and its user, whose limit is one session, connects on the other pod.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from tests.e2e.labs import lab_up
from tests.e2e.test_lab_agent import agent_pid, alive, ns_processes, sessions, until
from vpnfleet.lab import runner
from vpnfleet.lab.runner import LabInfo, LabUser

pytestmark = [pytest.mark.e2e]

LEASE = 15  # seconds: the lab's control plane runs with a short pod lease
USERS = (LabUser("ka", "nat"),)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lab(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LabInfo]:
    old = os.environ.get("VPNFLEET_POD_LEASE_SECONDS")
    os.environ["VPNFLEET_POD_LEASE_SECONDS"] = str(LEASE)
    try:
        async with lab_up(tmp_path_factory.mktemp("lab"), USERS, letters="vk") as info:
            await runner.start_client(info, "ka")
            yield info
    finally:
        if old is None:
            os.environ.pop("VPNFLEET_POD_LEASE_SECONDS", None)
        else:
            os.environ["VPNFLEET_POD_LEASE_SECONDS"] = old


def test_a_pod_credential_cannot_act_as_another_pod(lab: LabInfo) -> None:
    pod1_credential = (lab.dir / "pod1" / "pod-credential").read_text().strip()
    assert (lab.dir / "pod1" / "pod-credential").stat().st_mode & 0o077 == 0
    enrollment = (lab.dir / "agent-token").read_text().strip()
    with lab.client(pod1_credential) as pod1:
        r = pod1.post("/api/v1/agent/register", json={"name": "pod2", "pod_ip": "192.0.2.1"})
        assert r.status_code == 403 and "cannot act as pod 'pod2'" in r.json()["detail"]
        assert "PRIVATE KEY" not in r.text
        beat = {"name": "pod2", "applied_revision": 0, "ready": False}
        assert pod1.post("/api/v1/agent/heartbeat", json=beat).status_code == 403
    with lab.client(enrollment) as enroller:
        r = enroller.post("/api/v1/agent/enroll", json={"name": "pod2"})
        assert r.status_code == 409, r.text
        assert enroller.get("/api/v1/agent/snapshot").status_code == 403
    with lab.client() as admin:
        pods = {p["name"]: p for p in admin.get("/api/v1/pods").json()}
    assert pods["pod2"]["ready"] and pods["pod2"]["pod_ip"] == str(lab.plan.pod_ip(2))


@pytest.mark.asyncio(loop_scope="module")
async def test_a_pod_killed_without_a_word_frees_its_users_after_the_lease(
    lab: LabInfo,
) -> None:
    (before,) = sessions(lab, user="ka")
    pod = before["pod"]
    agent = await agent_pid(lab, pod)
    servers = await ns_processes(lab, pod, b"openvpn")
    assert agent is not None and servers
    # The user's laptop is gone with it, as far as anyone can tell: stop the client first so
    # that its reconnect below is a fresh start, then kill the whole pod without a word.
    await runner.stop_client(lab, "ka")
    killed_at = time.monotonic()
    for pid in (agent, *servers):
        os.kill(pid, signal.SIGKILL)
    await until(lambda: not alive(agent), 5, "the agent to die")

    async def closed() -> bool:
        return not sessions(lab, user="ka", active="true")

    await until(closed, LEASE + 15, "the dead pod's session to be closed")
    waited = time.monotonic() - killed_at
    (ended,) = sessions(lab, user="ka", active="false")
    assert ended["id"] == before["id"]
    assert ended["end_reason"] == "pod lease expired (no heartbeat)"
    # Not before the lease ran out: a pod that was only slow would have kept it.
    assert waited >= LEASE - 2
    # ka (one session allowed) connects again: the load balancer's other pod takes it.
    await runner.start_client(lab, "ka")
    (now,) = await until(lambda: sessions(lab, user="ka", active="true"), 10, "ka's new session")
    assert now["pod"] != pod
    await asyncio.sleep(0)
