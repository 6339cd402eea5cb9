"""The lab load balancer's endpoint follower: what kube-proxy does for a Service.

Runs in the load balancer's namespace. It probes every pod's `/readyz` twice a second; when
the set of ready pods changes, it rewrites the DNAT rules to spread new clients over the ready
pods only, and deletes the UDP conntrack entries that still point at a pod that stopped
serving, so its clients' next packets are balanced afresh instead of following a stale
translation.

As on Kubernetes (EndpointSlice conditions), a pod that is draining but still serving
(`/readyz` 200 with ``draining``: a terminating pod) gets no new clients but keeps its
translations, so the RESTART it sends its clients reaches them from the Service's address;
kube-proxy likewise deletes a UDP endpoint's conntrack entries only when it stops serving.

    python -m vpnfleet.lab.endpoints --prefix vfl --pods 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from ipaddress import IPv4Address

import httpx

from vpnfleet.lab.topology import VPN_PORT, LabPlan

log = logging.getLogger("vpnfleet.lab.endpoints")

AGENT_HTTP_PORT = 9176
DOWN_GRACE = 15.0


async def _run(*argv: str, stdin: str | None = None) -> int:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate(stdin.encode() if stdin is not None else None)
    if proc.returncode not in (0, 1):
        log.warning("%s: %s", argv[0], err.decode().strip())
    return proc.returncode or 0


async def pod_states(plan: LabPlan, http: httpx.AsyncClient) -> dict[IPv4Address, str]:
    """Each pod's state: `ready`, `terminating` (draining, still serving its clients),
    `draining` (shutting down on purpose, no longer serving) or `down`."""

    async def probe(ip: IPv4Address) -> str:
        try:
            resp = await http.get(f"http://{ip}:{AGENT_HTTP_PORT}/readyz")
        except httpx.HTTPError:
            return "down"
        try:
            draining = bool(resp.json().get("draining"))
        except ValueError:
            draining = False
        if resp.status_code == 200:
            return "terminating" if draining else "ready"
        return "draining" if draining else "down"

    results = await asyncio.gather(*(probe(ip) for ip in plan.pod_ips))
    return dict(zip(plan.pod_ips, results, strict=True))


async def follow(plan: LabPlan, stop: asyncio.Event, interval: float = 0.5) -> None:
    """Keep the DNAT rules on the ready pods.

    New clients go to ready pods only. Existing UDP translations to a terminating pod are kept
    (it is telling its clients to reconnect, through them); those to a pod that stopped
    serving after a drain are deleted at once (its clients' reconnects must land elsewhere);
    those to a pod that is merely unreachable are kept for DOWN_GRACE seconds, so an agent
    restart does not move users whose tunnels never stopped working.
    """
    current: list[IPv4Address] = list(plan.pod_ips)  # what build() installed
    down_since: dict[IPv4Address, float] = {}
    flushed: set[IPv4Address] = set()
    loop = asyncio.get_running_loop()
    async with httpx.AsyncClient(timeout=0.4) as http:
        while not stop.is_set():
            states = await pod_states(plan, http)
            now = loop.time()
            ready = [ip for ip, st in states.items() if st == "ready"]
            # No ready pod at all: keep every endpoint rather than drop every client.
            wanted = ready or list(plan.pod_ips)
            if wanted != current:
                await _run("iptables-restore", "-w", "5", stdin=plan.lb_nat_rules(wanted))
                log.info("endpoints: %s", ", ".join(map(str, wanted)))
                current = wanted
            for ip, st in states.items():
                if st in ("ready", "terminating"):
                    down_since.pop(ip, None)
                    flushed.discard(ip)
                    continue
                since = down_since.setdefault(ip, now)
                if ip not in flushed and (st == "draining" or now - since > DOWN_GRACE):
                    await _run(
                        "conntrack",
                        "-D",
                        "-p",
                        "udp",
                        "--dport",
                        str(VPN_PORT),
                        "--reply-src",
                        str(ip),
                    )
                    flushed.add(ip)
                    log.info("cleared translations to %s (%s)", ip, st)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)


def main() -> None:
    ap = argparse.ArgumentParser(description="Follow pod readiness on the lab load balancer.")
    ap.add_argument("--prefix", default="vfl")
    ap.add_argument("--pods", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    plan = LabPlan(prefix=args.prefix, pods=args.pods, clients=())

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await follow(plan, stop)

    asyncio.run(run())


if __name__ == "__main__":
    main()
