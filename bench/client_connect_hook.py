"""Baseline for bench/connect_storm.py: the classic `client-connect` script.

OpenVPN forks and execs a script like this for every connecting client and waits for it. It
makes the same decision as the agent (vpnfleet.core.authz.decide) from the same state (a
snapshot file, as such scripts usually read a file or a database), writes the client's
config file and exits 0 (allow) or 1 (deny). Invoked by the benchmark, never by vpnfleet.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from vpnfleet.core import authz
from vpnfleet.core.fleet import FleetView
from vpnfleet.wire import Snapshot


def main() -> int:
    snap = Snapshot.model_validate_json(Path(os.environ["VPNFLEET_BENCH_SNAPSHOT"]).read_text())
    view = FleetView.from_snapshot(snap)
    # OpenVPN passes these lower-case names to scripts.
    cn, serial = os.environ["common_name"], os.environ.get("tls_serial_0")  # noqa: SIM112
    decision = authz.decide(view, cn, serial, 0)
    if not decision.allow:
        return 1
    Path(sys.argv[1]).write_text("ifconfig-push 10.200.0.2 255.255.0.0\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
