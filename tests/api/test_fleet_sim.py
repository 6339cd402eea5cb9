"""The fleet simulator (bench/fleet_sim.py) still speaks the agent protocol, end to end.

A small run of the benchmark itself: real `vpnfleet server` replicas (two, agents spread over
them) on a fresh PostgreSQL database, 5 simulated agents, 200 users, a few seconds of session
churn and 4 operator changes. What a reader of the benchmark relies on is checked: every agent
received every change on its watch stream, sessions were opened and closed without protocol
errors, flows were accepted, and the database and server processes are gone afterwards.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.conftest import _pg_admin_url

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import fleet_sim

pytestmark = pytest.mark.postgres


def test_every_agent_sees_every_change_under_churn() -> None:
    admin_url = _pg_admin_url()
    cfg = fleet_sim.Config(agents=5, users=200, rate=20, churn_seconds=3, changes=4,
                           extra_watchers=10, replicas=(2,), idle_seconds=1)  # fmt: skip
    res = fleet_sim.run(cfg, admin_url)
    r = res["r2"]
    for phase in ("changes_quiet", "changes_churn"):
        assert r[phase]["changes"] == 4
        assert r[phase]["missing"] == 0, r[phase]
        assert r[phase]["deliveries"] == 4 * 5
    churn = r["churn"]
    assert churn["opened"] >= 20, churn
    assert churn["closed"] == churn["opened"]
    assert churn["refused"] == 0
    # Session records are never lost or refused (a heartbeat meeting a closed keep-alive
    # connection is retried by its next tick, as in the agent: not checked here).
    assert not [e for e in churn["errors"] if e.startswith(("open", "close"))], churn["errors"]
    assert r["flows_sent"] == churn["closed"] * fleet_sim.FLOWS_PER_SESSION
    assert r["rss_per_1000_watchers_mb"] > 0
    engine = create_engine(admin_url)
    with engine.connect() as conn:
        left = conn.scalar(
            text("SELECT count(*) FROM pg_database WHERE datname = :n"), {"n": res["database"]}
        )
    engine.dispose()
    assert left == 0
