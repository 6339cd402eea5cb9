"""Names of our sets and chains: the prefix rules, and telling our sets from foreign ones."""

from __future__ import annotations

import pytest

from tests.unit.fw_examples import TUN
from vpnfleet.core import fwnames
from vpnfleet.core.fwstate import DesiredState


@pytest.mark.parametrize("prefix", ["", "VPNF", "vpn-f", "1vpn", "abcdefghijk", "vp nf", "vpnf."])
def test_bad_prefix_is_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match="invalid dataplane prefix"):
        fwnames.validate_prefix(prefix)
    with pytest.raises(ValueError, match="invalid dataplane prefix"):
        DesiredState(prefix, (TUN,), None, frozenset(), frozenset(), ())


def test_own_set_pattern_matches_our_sets_only() -> None:
    own = fwnames.own_set_pattern("vpnf")
    ours = ["vpnf-tun", "vpnf-clients", "vpnf-nat", "vpnf-g0-m", "vpnf-g2147483647-n"]
    ours += [name + fwnames.TEMP_SUFFIX for name in ours]
    assert all(own.match(name) for name in ours)
    foreign = [
        "vpnfx-nat",  # another prefix that starts with ours
        "other-set",
        "vpnf-g1-x",  # not one of the six kinds
        "vpnf-g12345678901-m",  # 11 digits: no group id of ours
        "vpnf-nat.old",
        "vpnf-tunnel",
    ]
    assert not any(own.match(name) for name in foreign)
    assert fwnames.group_set("vpnf", 7, "d") == "vpnf-g7-d" and own.match("vpnf-g7-d")
