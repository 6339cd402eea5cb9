"""Permission propagation: from the API call returning to enforcement on every pod.

    .venv/bin/python bench/propagation.py [--changes 50]      # as root

Builds a lab (2 pods), puts one user on each pod, both in a group that can reach the backend
on port 8080 only. A probe process in each user's namespace tries a TCP connection to the
backend's port 9090 every 10 ms and logs every change between "reachable" and "blocked" with
its wall-clock time. The benchmark then alternately grants and revokes tcp/9090 through the
API, and for each change measures the time from the API call returning to the probe on each
pod seeing the new state (real traffic through real OpenVPN, iptables and ipset). The
enforcement time of a change is the slower of the two pods.

Baseline in the same run: the time for the same probe to see a change the benchmark makes
directly in the pod's ipset (no control plane, no watch stream), i.e. the probe's own
resolution.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import string
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vpnfleet.lab import runner, topology
from vpnfleet.lab.runner import LabInfo, LabUser

SVC = str(topology.CLUSTER_NET.network_address + 100)

PROBE = r"""
import socket, sys, time
host, port, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
state = None
deadline = time.monotonic() + float(sys.argv[4])
with open(out, "a", buffering=1) as fh:
    while time.monotonic() < deadline:
        s = socket.socket(); s.settimeout(0.05)
        try:
            s.connect((host, port)); ok = True
        except OSError:
            ok = False
        finally:
            s.close()
        if ok != state:
            fh.write(f"{time.time():.4f} {'up' if ok else 'down'}\n"); state = ok
        time.sleep(0.01)
"""


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def transitions(path: Path) -> list[tuple[float, str]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        ts, state = line.split()
        out.append((float(ts), state))
    return out


async def wait_state(paths: list[Path], after: float, state: str, timeout: float) -> float:
    """Seconds from `after` until every probe logged `state` (after `after`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = []
        for p in paths:
            hits = [ts for ts, st in transitions(p) if ts >= after and st == state]
            if not hits:
                break
            seen.append(hits[0])
        else:
            return max(seen) - after
        await asyncio.sleep(0.005)
    raise TimeoutError(f"probes did not see {state} within {timeout}s")


def api(info: LabInfo, method: str, path: str, body: Any = None) -> Any:
    with info.client() as c:
        resp = c.request(method, path, json=body)
        resp.raise_for_status()
        return resp.json() if resp.content else None


async def place_users(info: LabInfo) -> None:
    """Reconnect until the two users sit on different pods (the LB picks at random)."""
    for _ in range(20):
        with info.client() as c:
            pods = {s["user"]: s["pod"] for s in c.get("/api/v1/sessions?active=true").json()}
        if len(pods) == 2 and len(set(pods.values())) == 2:
            return
        await runner.stop_client(info, "u2")
        await asyncio.sleep(1.0)
        await runner.start_client(info, "u2")
        await asyncio.sleep(0.5)
    raise RuntimeError("could not get the users onto different pods")


async def main_async(changes: int, keep: bool) -> dict[str, Any]:
    prefix = "vb" + "".join(secrets.choice(string.ascii_lowercase) for _ in range(3))
    root = Path(tempfile.mkdtemp(prefix="vpnfleet-bench-"))
    users = (LabUser("u1", "nat", lab_access=False), LabUser("u2", "nat", lab_access=False))
    info = await runner.up(prefix, pods=2, users=users, state_root=root, connect=False)
    probes: list[topology.LabProcess] = []
    try:
        api(info, "POST", "/api/v1/groups", {"name": "bench"})
        api(
            info,
            "POST",
            "/api/v1/rules",
            {"group": "bench", "destination": SVC, "proto": "tcp", "ports": "8080"},
        )
        for u in ("u1", "u2"):
            api(info, "POST", "/api/v1/groups/bench/members", {"user": u})
            await runner.start_client(info, u)
        await place_users(info)
        paths = [info.dir / f"probe-{u}.log" for u in ("u1", "u2")]
        duration = str(60 + changes * 4)
        for u, path in zip(("u1", "u2"), paths, strict=True):
            probes.append(
                topology.spawn_in(
                    info.plan.client_ns(u),
                    sys.executable,
                    "-c",
                    PROBE,
                    SVC,
                    "9090",
                    str(path),
                    duration,
                    log_path=info.dir / f"probe-{u}.err",
                )
            )
        await wait_state(paths, 0, "down", 10)
        grant, revoke = [], []
        rule_id = None
        for i in range(changes):
            if i % 2 == 0:
                rule = api(
                    info,
                    "POST",
                    "/api/v1/rules",
                    {"group": "bench", "destination": SVC, "proto": "tcp", "ports": "9090"},
                )
                rule_id, returned = rule["id"], time.time()
                grant.append(await wait_state(paths, returned, "up", 10))
            else:
                api(info, "DELETE", f"/api/v1/rules/{rule_id}")
                returned = time.time()
                revoke.append(await wait_state(paths, returned, "down", 10))
            await asyncio.sleep(0.2)
        # Baseline: flip the same grant by hand in one pod's kernel, no control plane involved.
        base = []
        gid = api(info, "GET", "/api/v1/groups/bench")["id"]
        with info.client() as c:
            pod = c.get("/api/v1/sessions?active=true&user=u1").json()[0]["pod"]
        ns = info.plan.ns(pod)
        for i in range(min(changes, 20)):
            cmd = "add" if i % 2 == 0 else "del"
            await topology.run_in(ns, "ipset", cmd, f"vpnf-g{gid}-d", f"{SVC},tcp:9090")
            done = time.time()
            base.append(await wait_state([paths[0]], done, "up" if cmd == "add" else "down", 10))
            await asyncio.sleep(0.2)
        every = [*grant, *revoke]
        return {
            "changes": len(every),
            "pods": 2,
            "grant_p50_ms": pct(grant, 50) * 1000,
            "grant_p99_ms": pct(grant, 99) * 1000,
            "revoke_p50_ms": pct(revoke, 50) * 1000,
            "revoke_p99_ms": pct(revoke, 99) * 1000,
            "all_p50_ms": pct(every, 50) * 1000,
            "all_p99_ms": pct(every, 99) * 1000,
            "all_max_ms": max(every) * 1000,
            "baseline_direct_ipset_p50_ms": pct(base, 50) * 1000,
            "baseline_direct_ipset_p99_ms": pct(base, 99) * 1000,
        }
    finally:
        for p in probes:
            await p.stop()
        if not keep:
            await runner.down(prefix, state_root=root)


def main() -> None:
    ap = argparse.ArgumentParser(description="Permission propagation benchmark (lab, 2 pods).")
    ap.add_argument("--changes", type=int, default=50)
    ap.add_argument("--keep", action="store_true", help="leave the lab up for inspection")
    args = ap.parse_args()
    if not 2 <= args.changes <= 1000:
        raise SystemExit("--changes must be between 2 and 1000")
    out = asyncio.run(main_async(args.changes, args.keep))
    print(json.dumps(out, indent=2))
    print(
        f"{out['changes']} changes on 2 pods: p50 {out['all_p50_ms']:.0f} ms, "
        f"p99 {out['all_p99_ms']:.0f} ms, max {out['all_max_ms']:.0f} ms "
        f"(probe resolution baseline p50 {out['baseline_direct_ipset_p50_ms']:.0f} ms)"
    )


if __name__ == "__main__":
    main()
