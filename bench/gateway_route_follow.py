"""Gateway route follow: from a gateway user's new session to the network routing it there.

    .venv/bin/python bench/gateway_route_follow.py [--moves 10]      # as root (takes the lab)

Builds a lab (2 pods, one gateway user) and moves the user between the pods ``--moves`` times
(its stock openvpn client stopped and started again, pinned to the other pod). For each move it
measures the time from the new session's start on the new pod (the agent's ``connect`` log
line) to the route for the user's address pointing at that pod, polled every ~10 ms:

- **bgp**: the pods announce over BGP (their own BIRD) to the lab's BIRD router; measured in
  the router's kernel table.
- **static** (the baseline, same run, same moves): ``vpnfleet gateway-routes`` follows the
  control plane's watch stream and sets the route in the backend's namespace.

Prints p50/p99/max per mode and the ratio bgp/static of the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import secrets
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path

from vpnfleet.lab import bgprouter, runner, topology
from vpnfleet.lab.runner import LabInfo, LabUser

USER = "gary"


def connected_at(info: LabInfo, pod: int, tunnel_ip: str, after: float) -> float | None:
    """When pod ``pod``'s agent logged ``tunnel_ip``'s session as established (epoch s)."""
    for line in (info.dir / f"pod{pod}.log").read_text().splitlines():
        if "connect" not in line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == "connect" and rec.get("tunnel_ip") == tunnel_ip:
            ts = dt.datetime.fromisoformat(rec["ts"].replace("Z", "+00:00")).timestamp()
            if ts >= after:
                return ts
    return None


async def route_via(info: LabInfo, address: str) -> str | None:
    """Where the network sends ``address``: the router (bgp) or the backend (static)."""
    if info.routing == "bgp":
        return (await bgprouter.routes(info.plan)).get(address)
    res = await topology.run_in(
        info.plan.svc.ns, "ip", "-j", "route", "show", "proto", "241", check=False
    )
    rows = json.loads(res.stdout) if res.stdout.strip() else []
    return {r["dst"]: r.get("gateway") for r in rows}.get(address)


async def wait_via(info: LabInfo, address: str, via: str, seconds: float) -> float:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await route_via(info, address) == via:
            return time.time()
        await asyncio.sleep(0.01)
    raise RuntimeError(f"route of {address} not via {via} after {seconds}s")


async def run_mode(root: Path, routing: str, moves: int) -> list[float]:
    prefix = "vg" + "".join(secrets.choice(string.ascii_lowercase) for _ in range(3))
    info = await runner.up(
        prefix, pods=2, users=(LabUser(USER, "gateway"),), state_root=root, connect=False,
        routing=routing,
    )  # fmt: skip
    out: list[float] = []
    try:
        pod = 1
        await runner.pin_client(info, USER, pod)
        await runner.start_client(info, USER)
        address = await runner.wait_client_address(info, USER, 10)
        assert address is not None
        await wait_via(info, address, str(info.plan.pod_ip(pod)), 10)
        for _ in range(moves):
            pod = 3 - pod
            await runner.pin_client(info, USER, pod)
            started = time.time()
            await runner.stop_client(info, USER)
            await runner.start_client(info, USER)
            seen = await wait_via(info, address, str(info.plan.pod_ip(pod)), 15)
            session = None
            for _ in range(100):
                session = connected_at(info, pod, address, started)
                if session is not None:
                    break
                await asyncio.sleep(0.05)
            assert session is not None, "no connect line in the pod's log"
            out.append(seen - session)
    finally:
        await runner.down(prefix, state_root=root)
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--moves", type=int, default=10)
    args = ap.parse_args()
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for routing in ("bgp", "static"):
            results[routing] = await run_mode(Path(tmp), routing, args.moves)
    print(f"gateway route follow, {args.moves} moves per mode (ms from the new session)")
    for routing, values in results.items():
        ms = [v * 1000 for v in values]
        print(
            f"  {routing:6s} p50 {pct(ms, 0.5):6.0f}  p99 {pct(ms, 0.99):6.0f}  "
            f"max {max(ms):6.0f}  min {min(ms):6.0f}"
        )
    ratio = statistics.median(results["bgp"]) / statistics.median(results["static"])
    print(f"  bgp/static (medians): {ratio:.2f}")


if __name__ == "__main__":
    if sys.platform != "linux":
        raise SystemExit("Linux only (network namespaces)")
    asyncio.run(main())
