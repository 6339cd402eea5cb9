"""End-to-end tests run as root with real tools; if that is not possible they fail loudly."""

from __future__ import annotations

import pytest

from tests.e2e.netns import netns_unavailable

BASE_TOOLS = ("openvpn", "iptables", "iptables-restore", "ipset", "conntrack", "sysctl")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("e2e"):
        reason = netns_unavailable(*BASE_TOOLS, *mark.kwargs.get("tools", ()))
        if reason:
            pytest.fail(
                f"end-to-end test cannot run ({reason}): run scripts/test.sh as root, "
                "which installs what is missing",
                pytrace=False,
            )
