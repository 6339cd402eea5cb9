"""What one Prometheus scrape of an agent costs with 2,000 connected users.

    .venv/bin/python bench/scrape_cost.py [--users 2000] [--runs 50]

No OpenVPN needed: the agent's session book adopts 2,000 established sessions from OpenVPN's
`status` rows (the agent's own reconcile path), the collector reads them as ``PodAgent.readings()``
presents them, and the registry is rendered with prometheus_client's `generate_latest`, as
`/metrics` does:

- per-user series on (cap raised above the user count),
- default settings (cap 1,000: over it, only per-pod totals),
- per-user series off (VPNFLEET_METRICS_PER_CLIENT=0),
- the probes port's view (every series but the per-user ones, which only the user-metrics
  listener serves), with per-user series on.

Baseline in the same run, the openvpn_exporter approach: OpenVPN writes its status file
(`--status-version 2`, written here with the same 2,000 clients), and every scrape reads and
parses that file and builds the same openvpn_* series (server, common_name), rendered by the
same library. The parser is ours (the exporter is Go; this keeps language and rendering equal
so the difference is the approach: parsing text at every scrape versus reading live state).

Prints wall time per scrape (median, p90) and the response size (raw and gzip, as Prometheus
asks for it).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gzip
import ipaddress
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from vpnfleet.agent.exporter import ExporterConfig, Readings  # noqa: E402
from vpnfleet.agent.metrics import AgentMetrics  # noqa: E402
from vpnfleet.agent.netcommands import DataplaneStats  # noqa: E402
from vpnfleet.agent.spool import Spool  # noqa: E402
from vpnfleet.core.mgmt_protocol import StatusClient  # noqa: E402
from vpnfleet.core.sessionbook import BookConfig, SessionBook  # noqa: E402

POD = "pod-bench"
START = dt.datetime(2026, 11, 26, 8, 0, tzinfo=dt.UTC)


class BenchAgent:
    """The agent's state as /metrics reads it: a session book and OpenVPN's last listing."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.book = SessionBook(
            BookConfig(
                nat_pool=ipaddress.IPv4Network("10.200.0.0/16"),
                gateway_pool=ipaddress.IPv4Network("10.201.0.0/16"),
            )
        )
        self.last_status: list[StatusClient] = []
        self.last_status_at = 0.0
        self.spool = Spool(state_dir, "sessions")

    def readings(self) -> Readings:
        return Readings(
            pod=POD, state_dir=self.state_dir, crl_verify=False, clients=list(self.book),
            last_status=self.last_status, last_status_at=self.last_status_at,
            view_revision=1, applied_revision=1, applied_state=None,
            dataplane_stats=DataplaneStats(), spools={"sessions": self.spool},
            openvpn_ready=True, openvpn_version="OpenVPN 2.6.14 x86_64-pc-linux-gnu",
            draining=False, ready=True,
        )  # fmt: skip


def fill(agent: BenchAgent, users: int) -> None:
    """`users` established sessions, one per user, adopted from OpenVPN's status rows."""
    net = ipaddress.IPv4Network("10.200.0.0/16")
    gw = ipaddress.IPv4Network("10.201.0.0/16")
    for i in range(1, users + 1):
        tunnel = str((gw if i % 10 == 0 else net).network_address + 1 + i)
        started = START + dt.timedelta(seconds=i)
        agent.last_status.append(
            StatusClient(
                common_name=f"user{i:05d}",
                real_address=f"198.51.{i // 250}.{i % 250 + 1}:{30000 + i}",
                virtual_address=tunnel,
                virtual_ipv6_address=None,
                bytes_received=1_000_003 * i,
                bytes_sent=7_000_001 * i,
                connected_since=started,
                username=None,
                client_id=i,
                peer_id=i,
                data_channel_cipher="AES-256-GCM",
            )
        )
    uids = (f"{POD}-{i:016x}" for i in range(1, users + 1))
    agent.book.reconcile(agent.last_status, {}, listed_after=0, new_uid=uids, now=START.isoformat())
    agent.last_status_at = time.time()


def write_status_v2(agent: BenchAgent, path: Path) -> None:
    """The same clients as OpenVPN 2.6 writes them with `--status-version 2`."""
    now = int(time.time())
    lines = [
        "TITLE,OpenVPN 2.6.14 x86_64-pc-linux-gnu [SSL (OpenSSL)] [LZO] [LZ4] [EPOLL] [MH/PKTINFO]",
        f"TIME,{dt.datetime.fromtimestamp(now, dt.UTC):%Y-%m-%d %H:%M:%S},{now}",
        "HEADER,CLIENT_LIST,Common Name,Real Address,Virtual Address,Virtual IPv6 Address,"
        "Bytes Received,Bytes Sent,Connected Since,Connected Since (time_t),Username,"
        "Client ID,Peer ID,Data Channel Cipher",
    ]
    for row in agent.last_status:
        assert row.connected_since is not None
        since = row.connected_since
        lines.append(
            f"CLIENT_LIST,{row.common_name},{row.real_address},{row.virtual_address},,"
            f"{row.bytes_received},{row.bytes_sent},{since:%Y-%m-%d %H:%M:%S},"
            f"{int(since.timestamp())},UNDEF,{row.client_id},{row.peer_id},AES-256-GCM"
        )
    lines.append(
        "HEADER,ROUTING_TABLE,Virtual Address,Common Name,Real Address,Last Ref,Last Ref (time_t)"
    )
    for row in agent.last_status:
        lines.append(
            f"ROUTING_TABLE,{row.virtual_address},{row.common_name},{row.real_address},"
            f"{dt.datetime.fromtimestamp(now, dt.UTC):%Y-%m-%d %H:%M:%S},{now}"
        )
    lines += ["GLOBAL_STATS,Max bcast/mcast queue length,0", "END"]
    path.write_text("\n".join(lines) + "\n")


class StatusFileCollector(Collector):
    """The baseline: parse OpenVPN's status file (version 2) at every scrape."""

    def __init__(self, path: Path, server: str) -> None:
        self.path = path
        self.server = server

    def collect(self) -> Iterator[Metric]:
        received = GaugeMetricFamily("openvpn_bytes_received", "", labels=["server", "common_name"])
        sent = GaugeMetricFamily("openvpn_bytes_sent", "", labels=["server", "common_name"])
        since = GaugeMetricFamily("openvpn_connected_since", "", labels=["server", "common_name"])
        connections = GaugeMetricFamily("openvpn_connections", "", labels=["server"])
        updated = GaugeMetricFamily("openvpn_last_updated", "", labels=["server"])
        columns: dict[str, int] = {}
        count = 0
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                fields = line.rstrip("\n").split(",")
                kind = fields[0]
                if kind == "CLIENT_LIST":
                    count += 1
                    labels = [self.server, fields[columns["Common Name"]]]
                    received.add_metric(labels, float(fields[columns["Bytes Received"]]))
                    sent.add_metric(labels, float(fields[columns["Bytes Sent"]]))
                    since.add_metric(labels, float(fields[columns["Connected Since (time_t)"]]))
                elif kind == "HEADER" and len(fields) > 2 and fields[1] == "CLIENT_LIST":
                    columns = {name: i for i, name in enumerate(fields[2:], start=1)}
                elif kind == "TIME":
                    updated.add_metric([self.server], float(fields[2]))
        connections.add_metric([self.server], count)
        yield from (updated, connections, received, sent, since)


def measure(render: Callable[[], bytes], runs: int) -> tuple[float, float, int, int]:
    """Median and p90 milliseconds per scrape, response bytes, gzip bytes."""
    body = render()  # warm-up (and the size)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        render()
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    p90 = times[min(len(times) - 1, int(len(times) * 0.9))]
    return statistics.median(times), p90, len(body), len(gzip.compress(body, 6))


async def stall(render: Callable[[], bytes], off_loop: bool, scrapes: int) -> tuple[float, float]:
    """How long the agent's event loop stops turning during one scrape.

    The agent answers CONNECTs on this loop, so a scrape rendered on it delays any decision
    that arrives meanwhile by up to the whole render. With asyncio.to_thread the loop keeps
    turning (the GIL is handed over every few milliseconds). A 1 ms ticker runs on the loop;
    per scrape, its worst lateness is kept. Returns (median, max) over the scrapes, in ms.
    """
    late: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        while not done.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            late.append((time.perf_counter() - before - 0.001) * 1000)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    worst: list[float] = []
    for _ in range(scrapes):
        late.clear()
        if off_loop:
            await asyncio.to_thread(render)
        else:
            render()
        await asyncio.sleep(0.005)  # let the ticker report the stall
        worst.append(max(late, default=0.0))
    done.set()
    await task
    return statistics.median(worst), max(worst)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        agent = BenchAgent(d)
        fill(agent, args.users)
        status = d / "openvpn-status.log"
        write_status_v2(agent, status)

        runs: list[tuple[str, Callable[[], bytes]]] = []
        for label, cfg in (
            ("agent, per-user series on", ExporterConfig(True, args.users * 2)),
            ("agent, default (cap 1,000)", ExporterConfig()),
            ("agent, per-user series off", ExporterConfig(False)),
        ):
            metrics = AgentMetrics(POD, agent)
            assert metrics.collector is not None
            metrics.collector.config = cfg
            runs.append((label, lambda m=metrics: generate_latest(m.registry)))  # type: ignore[misc]
        # What the probes port serves (no user names), with per-user series on for the other
        # listener: the collector still computes them, WithoutUsers drops them before rendering.
        fleet = AgentMetrics(POD, agent)
        assert fleet.collector is not None
        fleet.collector.config = ExporterConfig(True, args.users * 2)
        probes_view = fleet.fleet_registry
        runs.append(("agent, probes port (no names)", lambda: generate_latest(probes_view)))
        baseline = CollectorRegistry()
        baseline.register(StatusFileCollector(status, POD))
        runs.append(("status file parsed per scrape", lambda: generate_latest(baseline)))

        print(
            f"scrape cost, {args.users} users, {args.runs} runs each; "
            f"{platform.node()} {platform.machine()} {os.cpu_count()} CPU, "
            f"Python {platform.python_version()}, {dt.date.today()}"
        )
        print(f"status file: {status.stat().st_size:,} bytes")
        print(f"{'run':<32} {'p50 ms':>8} {'p90 ms':>8} {'bytes':>10} {'gzip':>9}")
        results = {}
        for label, render in runs:
            p50, p90, size, gz = measure(render, args.runs)
            results[label] = p50
            print(f"{label:<32} {p50:8.2f} {p90:8.2f} {size:10,} {gz:9,}")
        on = results["agent, per-user series on"]
        base = results["status file parsed per scrape"]
        print(f"per-user on vs status file: {base / on:.2f}x the baseline's speed")
        probes = results["agent, probes port (no names)"]
        print(f"probes port vs per-user on: {probes / on:.2f}x the per-user scrape's time")
        print("event-loop stall per scrape (1 ms ticker), median / max ms over 20 scrapes:")
        for label, render in runs[:3]:
            for off_loop in (False, True):
                typical, worst = asyncio.run(stall(render, off_loop, 20))
                where = "asyncio.to_thread" if off_loop else "on the loop"
                print(f"  {label:<30} {where:<18} {typical:7.2f} {worst:7.2f}")
        agent.spool.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
