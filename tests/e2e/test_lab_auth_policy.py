"""Auth policies with real OpenVPN clients: until the web-auth login exists, a user whose
policy is `cert+sso` is refused at connect with a reason their client shows, while the
certificate still admits everyone else (the group's exempted service account included).

A lab with 2 pods; the policy reaches the agents through the watch stream like any change.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from tests.e2e.labs import lab_up
from tests.polling import until
from vpnfleet.lab import runner
from vpnfleet.lab.runner import LabInfo, LabUser

pytestmark = [pytest.mark.e2e]

USERS = (LabUser("sam", "nat"), LabUser("svc", "nat"), LabUser("olga", "nat"))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lab(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LabInfo]:
    async with lab_up(tmp_path_factory.mktemp("lab"), USERS, letters="va") as info:
        yield info


def api(info: LabInfo, method: str, path: str, body: Any = None) -> Any:
    with info.client() as c:
        resp = c.request(method, path, json=body)
        assert resp.status_code < 400, resp.text
        return resp.json() if resp.content else None


def client_log(info: LabInfo, user: str) -> str:
    path = info.dir / "clients" / f"{user}.log"
    return path.read_text(errors="replace") if path.exists() else ""


@pytest.mark.asyncio(loop_scope="module")
async def test_a_cert_sso_user_is_refused_and_the_others_connect(lab: LabInfo) -> None:
    api(lab, "POST", "/api/v1/groups", {"name": "staff"})
    for user in ("sam", "svc"):
        api(lab, "POST", "/api/v1/groups/staff/members", {"user": user})
    api(lab, "PATCH", "/api/v1/users/svc", {"auth_policy": "cert"})
    api(lab, "PATCH", "/api/v1/groups/staff", {"auth_policy": "cert+sso"})
    assert api(lab, "GET", "/api/v1/users/sam")["auth"] == "cert+sso"
    await asyncio.sleep(2)  # the pods hear it from the watch stream
    await runner.start_client(lab, "sam", wait=False)
    try:
        await until(
            lambda: "AUTH_FAILED,single sign-on login required" in client_log(lab, "sam"),
            30,
            "the refusal in sam's client log",
        )
        assert await runner.client_address(lab, "sam") is None
        # Not a member of the group, and a member exempted by her own policy: both connect.
        await asyncio.gather(runner.start_client(lab, "olga"), runner.start_client(lab, "svc"))
        assert await runner.client_address(lab, "olga") is not None
        assert await runner.client_address(lab, "svc") is not None
    finally:
        for user in ("sam", "svc", "olga"):
            await runner.stop_client(lab, user)
