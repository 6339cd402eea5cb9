"""Conntrack flow listener throughput and cost per event, versus ulogd2 on the same load.

    sudo .venv/bin/python bench/flow_listener.py [--rates 10000,20000,30000,40000] [--seconds 4]
    .venv/bin/python bench/flow_listener.py --decode-only      # decoder only, no root

Event source: real traffic. A client namespace sends one UDP datagram from each of many
(source address, source port) pairs, paced at ``rate`` per second, to a server namespace
through a "pod" namespace that MASQUERADEs them. Every datagram is a new conntrack entry in
the pod: one NEW event now and one DESTROY event when it expires (UDP timeout 1 s there; the
kernel's garbage collector reaps in bursts). The server drops the datagrams (raw table), so
nothing else happens. Every trial uses its own destination port, so no tuple repeats.

Consumers, run one at a time on the same load, pinned to CPU 0 (the generator to CPU 1):

- ours: ConntrackListener -> FlowTracker (tunnel filter, attribution) -> one JSON line per
  record to a buffered file; the pipeline of the agent minus the control-plane delivery.
- ulogd2: NFCT input in event mode (hash off, NEW|DESTROY), IP2STR, JSON output to a file
  without sync: one JSON line per event, the same work.

Measured per trial: events received vs generated (NEW and DESTROY), overruns, and CPU time
(utime+stime from /proc/PID/stat) per event received. A rate passes when nothing is lost.
Every loop is bounded in count and time; only addresses inside the namespaces created here
are contacted; processes and namespaces are removed on every exit path.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import glob
import ipaddress
import json
import os
import platform
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.e2e.netns import NetnsPool, veth  # noqa: E402

PY = sys.executable
TUNNEL = "198.18.50.0/24"
SOURCES = [f"198.18.50.{i}" for i in range(10, 26)]  # 16 client addresses
CLIENT_GW, POD_OUT, SERVER = "198.18.50.1", "198.18.51.1", "198.18.51.2"
SPORTS = range(1024, 65024)  # 64000 source ports per address
LISTENER_CPU, GENERATOR_CPU = 0, 1
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- children -------------------------------------------------------------------------------


def rcvbuf() -> int:
    """The listener's default socket buffer; ulogd is configured with the same."""
    from vpnfleet.agent.conntrack import DEFAULT_RCVBUF

    return DEFAULT_RCVBUF


def child_generator(rate: int, seconds: float, dport: int) -> None:
    """Runs in the client namespace: ``rate*seconds`` datagrams, each a new flow."""
    os.sched_setaffinity(0, {GENERATOR_CPU})
    total = int(rate * seconds)
    if total > len(SOURCES) * len(SPORTS):
        raise SystemExit("too many flows for distinct tuples: lower --rates or --seconds")
    socks = []
    for src in SOURCES:
        # Raw UDP: we write the UDP header, so one socket serves every source port.
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
        s.bind((src, 0))
        socks.append(s)
    payload = b"flow-bench-12345"
    length = 8 + len(payload)
    n_src = len(socks)
    sent = 0
    start = time.monotonic()
    hard_stop = start + seconds * 3 + 5
    while sent < total:
        batch_end = min(total, sent + 256)
        for i in range(sent, batch_end):
            sport = SPORTS.start + (i // n_src) % len(SPORTS)
            # UDP checksum 0 = "none", valid for IPv4.
            socks[i % n_src].sendto(
                struct.pack("!HHHH", sport, dport, length, 0) + payload, (SERVER, 0)
            )
        sent = batch_end
        now = time.monotonic()
        if now > hard_stop:
            break
        ahead = start + sent / rate - now
        if ahead > 0:
            time.sleep(ahead)
    print(json.dumps({"sent": sent, "seconds": time.monotonic() - start}), flush=True)


def child_listener(out: str) -> None:
    """Runs in the pod namespace: the agent's own flow pipeline (listener, tracker, JSON line
    for the log, on-disk spool: FlowAudit's per-event path), the log lines going to ``out`` and
    the spool next to it. Only delivery to a control plane is left out."""
    os.sched_setaffinity(0, {LISTENER_CPU})
    from vpnfleet.agent.conntrack import ConntrackListener
    from vpnfleet.agent.cpclient import ControlPlane
    from vpnfleet.agent.flowaudit import FlowAudit
    from vpnfleet.agent.spool import Spool
    from vpnfleet.core.flowevents import FlowEvent, FlowEventKind, FlowItem

    state = Path(out).parent / "agent-state"
    shutil.rmtree(state, ignore_errors=True)  # a fresh spool per trial
    owners = {ip: (f"user{i}", f"session-{i}") for i, ip in enumerate(SOURCES)}
    fh = open(out, "w", encoding="utf-8", buffering=1 << 20)  # noqa: SIM115 - closed below
    audit = FlowAudit(
        ControlPlane("http://127.0.0.1:9", "-"),
        "bench-pod",
        Spool(state, "flows", max_bytes=8 << 30),
        [ipaddress.IPv4Network(TUNNEL)],
        owners.get,
        out=fh,
    )
    tracker = audit.tracker
    listener = ConntrackListener(initial_dump=False)
    to_agent = audit._on_item
    NEW = FlowEventKind.NEW
    # Live events only: entries listed by a resync dump must not hide lost events.
    counts = {FlowEventKind.NEW: 0, FlowEventKind.DESTROY: 0}
    peak = [0.0]  # busiest 100 ms seen by the reporter, in events/s

    def on_item(item: FlowItem) -> None:
        if isinstance(item, FlowEvent) and not item.from_dump:
            counts[NEW if item.kind is NEW else FlowEventKind.DESTROY] += 1
        to_agent(item)

    def status() -> str:
        c = listener.counters
        return json.dumps(
            {
                "new": counts[NEW],
                "destroy": counts[FlowEventKind.DESTROY],
                "overruns": c.overruns,
                "decode_errors": c.decode_errors,
                "resyncs": c.resyncs,
                "evicted": tracker.counters.evicted,
                "peak_per_s": int(peak[0]),
            }
        )

    async def main() -> None:
        listener.open()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, listener.close)
        print(json.dumps({"ready": True, "rcvbuf": listener.rcvbuf_effective}), flush=True)

        async def report() -> None:
            # Every 100 ms: the event rate since the last look. The kernel reaps expired
            # entries in batches, so DESTROY events come in waves far above the average rate.
            last_t, last_n, ticks = time.monotonic(), 0, 0
            while True:
                await asyncio.sleep(0.1)
                now, n = time.monotonic(), listener.counters.events
                peak[0] = max(peak[0], (n - last_n) / (now - last_t))
                last_t, last_n, ticks = now, n, ticks + 1
                if ticks % 5 == 0:
                    print(status(), flush=True)

        reporter = asyncio.create_task(report())
        try:
            await listener.run(on_item)
        finally:
            reporter.cancel()

    asyncio.run(main())
    fh.close()
    audit.spool.close()
    print(status(), flush=True)


# --- measurement helpers --------------------------------------------------------------------


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process in seconds, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


class Lines:
    """Last line and all lines of a child's stdout, read by a thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def last_json(self, key: str) -> dict[str, Any] | None:
        for line in reversed(self.lines):
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if isinstance(obj, dict) and key in obj:
                    return obj
        return None

    def wait_json(self, key: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            obj = self.last_json(key)
            if obj is not None:
                return obj
            if self.proc.poll() is not None and self.last_json(key) is None:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise RuntimeError(f"child exited {self.proc.returncode}: {err.strip()}")
            time.sleep(0.05)
        raise RuntimeError(f"no {key!r} line from the child within {timeout:.0f}s")


def audit_coverage(path: Path, sent: int) -> str:
    """What events lost in an overrun cost the audit trail, from the records written."""
    flows: dict[str, set[str]] = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            kind = "inferred" if rec["end_inferred"] else rec["kind"]
            flows.setdefault(rec["flow_id"], set()).add(kind)
    ended = sum(1 for kinds in flows.values() if "end" in kinds)
    inferred = sum(1 for kinds in flows.values() if kinds == {"start", "inferred"})
    return (
        f"[flows with a record {len(flows)}/{sent}, with a real end {ended}, "
        f"end inferred by resync {inferred}]"
    )


def ulogd_plugin_dir() -> str:
    found = glob.glob("/usr/lib/*/ulogd/ulogd_inpflow_NFCT.so") or glob.glob(
        "/usr/lib/ulogd/ulogd_inpflow_NFCT.so"
    )
    if not found:
        raise RuntimeError("ulogd2 NFCT plugin not found: apt-get install ulogd2 ulogd2-json")
    return str(Path(found[0]).parent)


def ulogd_config(tmp: Path) -> Path:
    plugins = ulogd_plugin_dir()
    conf = tmp / "ulogd.conf"
    # Event mode (no pollinterval), no hash: every NEW and DESTROY goes to the output, as
    # with our listener. ulogd only applies buffer_size when it is below buffer_maxsize; it
    # doubles the buffer on overrun up to the max, which we allow once.
    conf.write_text(
        f"""[global]
logfile="{tmp}/ulogd.log"
loglevel=3
plugin="{plugins}/ulogd_inpflow_NFCT.so"
plugin="{plugins}/ulogd_filter_IP2STR.so"
plugin="{plugins}/ulogd_output_JSON.so"
stack=ct1:NFCT,ip2str1:IP2STR,json1:JSON

[ct1]
hash_enable=0
event_mask=0x00000005
netlink_socket_buffer_size={rcvbuf()}
netlink_socket_buffer_maxsize={rcvbuf() * 2}

[json1]
file="{tmp}/ulogd.json"
sync=0
"""
    )
    return conf


@dataclass
class Trial:
    consumer: str
    rate: int
    sent: int = 0
    gen_seconds: float = 0.0
    new: int = 0
    destroy: int = 0
    overruns: int = 0
    user: float = 0.0
    sys: float = 0.0
    peak_per_s: int = 0
    kernel_drops: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return 2 * self.sent - self.new - self.destroy

    @property
    def cpu(self) -> float:
        return self.user + self.sys

    def us_per_event(self, seconds: float | None = None) -> float:
        events = self.new + self.destroy
        spent = self.cpu if seconds is None else seconds
        return spent / events * 1e6 if events else float("nan")

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.overruns == 0 and self.kernel_drops == 0


class Bench:
    def __init__(self, pool: NetnsPool, tmp: Path, seconds: float) -> None:
        self.tmp = tmp
        self.seconds = seconds
        self.cl, self.pod, self.srv = pool.create("cl"), pool.create("pod"), pool.create("srv")
        self.trial_no = 0
        self.out_path = tmp / "none"
        veth(self.cl, "c0", self.pod, "in0")
        veth(self.pod, "up0", self.srv, "s0")
        for ip in SOURCES:
            self.cl.add_addr("c0", f"{ip}/24")
        self.pod.add_addr("in0", f"{CLIENT_GW}/24")
        self.pod.add_addr("up0", f"{POD_OUT}/24")
        self.srv.add_addr("s0", f"{SERVER}/24")
        self.cl.add_route("default", CLIENT_GW)
        self.pod.sysctl("net.ipv4.ip_forward", "1")
        for key, value in (
            ("acct", "1"),
            ("timestamp", "1"),
            ("udp_timeout", "1"),
            ("udp_timeout_stream", "1"),
        ):
            self.pod.sysctl(f"net.netfilter.nf_conntrack_{key}", value)
        self.pod.run(
            "iptables",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-s",
            TUNNEL,
            "-o",
            "up0",
            "-j",
            "MASQUERADE",
        )
        # The server drops everything before it could answer (no ICMP, no conntrack there).
        self.srv.run("iptables", "-t", "raw", "-A", "PREROUTING", "-p", "udp", "-j", "DROP")

    def conntrack_count(self) -> int:
        return int(self.pod.run("conntrack", "-C").stdout.strip() or 0)

    def kernel_drops(self) -> int:
        """Entries the kernel refused or dropped in the pod (not the listener's fault)."""
        out = self.pod.run("conntrack", "-S").stdout
        total = 0
        for word in out.split():
            key, _, value = word.partition("=")
            if key in ("drop", "early_drop", "insert_failed") and value.isdigit():
                total += int(value)
        return total

    def wait_table_empty(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while self.conntrack_count() > 0:
            if time.monotonic() > deadline:
                raise RuntimeError("conntrack entries did not expire in time")
            time.sleep(0.5)

    def start_consumer(
        self, consumer: str
    ) -> tuple[subprocess.Popen[str], Lines, Callable[[], tuple[int, int, int]]]:
        """Start a consumer; returns it and a function giving (new, destroy, overruns)."""
        if consumer == "ours":
            self.out_path = self.tmp / f"ours-{self.trial_no}.jsonl"
            proc = self.pod.popen(PY, __file__, "--child-listener", str(self.out_path))
            lines = Lines(proc)
            lines.wait_json("ready", 20)

            def ours_counts() -> tuple[int, int, int]:
                s = lines.last_json("new") or {"new": 0, "destroy": 0, "overruns": 0}
                return int(s["new"]), int(s["destroy"]), int(s["overruns"])

            return proc, lines, ours_counts
        trial_dir = self.tmp / f"ulogd-{self.trial_no}"
        trial_dir.mkdir()
        conf = ulogd_config(trial_dir)
        proc = self.pod.popen("ulogd", "-c", str(conf))  # ip netns exec execs: same pid
        os.sched_setaffinity(proc.pid, {LISTENER_CPU})
        log = trial_dir / "ulogd.log"
        deadline = time.monotonic() + 20
        while "entering main loop" not in (log.read_text() if log.exists() else ""):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(
                    f"ulogd did not start: {log.read_text() if log.exists() else ''}"
                )
            time.sleep(0.05)
        lines = Lines(proc)
        json_path = trial_dir / "ulogd.json"

        def ulogd_counts() -> tuple[int, int, int]:
            # ulogd buffers its JSON file; counts are exact only after it exits.
            new = destroy = 0
            if json_path.exists():
                with open(json_path, encoding="utf-8", errors="replace") as fh:
                    for line in fh:
                        if '"ct.event": 1' in line:
                            new += 1
                        elif '"ct.event": 4' in line:
                            destroy += 1
            # ulogd says "losing events" when it grows its buffer, "has been reached" when
            # it is at the maximum and loses events anyway.
            text = log.read_text() if log.exists() else ""
            return new, destroy, text.count("losing events") + text.count("has been reached")

        return proc, lines, ulogd_counts

    def run(self, consumer: str, rate: int) -> Trial:
        self.trial_no += 1
        trial = Trial(consumer, rate)
        self.wait_table_empty()
        drops_before = self.kernel_drops()
        proc, lines, counts = self.start_consumer(consumer)
        try:
            cpu_before = cpu_seconds(proc.pid)
            dport = 20000 + self.trial_no
            gen = self.cl.run(
                PY,
                __file__,
                "--child-generator",
                str(rate),
                str(self.seconds),
                str(dport),
                timeout=self.seconds * 3 + 30,
            )
            result = json.loads(gen.stdout.strip().splitlines()[-1])
            trial.sent, trial.gen_seconds = int(result["sent"]), float(result["seconds"])
            # DESTROY events come when the kernel reaps the expired entries: wait for that.
            self.wait_table_empty()
            settle = time.monotonic() + 30
            while time.monotonic() < settle:
                new, destroy, _ = counts()
                if consumer != "ours" or new + destroy >= 2 * trial.sent:
                    break
                time.sleep(0.2)
            time.sleep(1.0)  # let the last reads happen
            cpu_after = cpu_seconds(proc.pid)
            trial.user = cpu_after[0] - cpu_before[0]
            trial.sys = cpu_after[1] - cpu_before[1]
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        time.sleep(0.3)  # the status thread reads the final line
        trial.new, trial.destroy, trial.overruns = counts()
        trial.kernel_drops = self.kernel_drops() - drops_before
        if consumer == "ours":
            final = lines.last_json("new") or {}
            trial.peak_per_s = int(final.get("peak_per_s", 0))
            if trial.lost:
                trial.notes.append(audit_coverage(self.out_path, trial.sent))
            if final.get("decode_errors"):
                trial.notes.append(f"decode errors {final['decode_errors']}")
        return trial


# --- decoder micro-benchmark ----------------------------------------------------------------


def decode_only(repeat: int = 7) -> dict[str, float]:
    """µs per message: our decoder vs pyroute2's nfct_msg, on real kernel messages."""
    from pyroute2.netlink.nfnetlink.nfctsocket import nfct_msg

    from tests.unit.ctnetlink_captures import UDP_DESTROY, UDP_NEW
    from vpnfleet.core.ctnetlink import CtnetlinkDecoder
    from vpnfleet.core.flowtracker import FlowTracker

    at = dt.datetime.now(dt.UTC)
    results: dict[str, float] = {}

    def best(fn: Callable[[], object], n: int) -> float:
        times = []
        for _ in range(repeat):
            t0 = time.process_time()
            for _ in range(n):
                fn()
            times.append((time.process_time() - t0) / n * 1e6)
        return min(times)

    decoder = CtnetlinkDecoder()  # as the listener keeps one: layouts learned on first use
    for name, data in (("new", UDP_NEW), ("destroy", UDP_DESTROY)):
        buf = bytearray(65536)
        buf[: len(data)] = data

        def pyroute2_decode(d: bytes = data) -> None:
            msg = nfct_msg(d)
            msg.decode()

        results[f"ours_{name}"] = best(lambda b=buf, d=data: decoder.decode(b, len(d), at), 20000)
        results[f"pyroute2_{name}"] = best(pyroute2_decode, 1000)
    tracker = FlowTracker("p", ["10.77.0.0/24"], lambda _: ("alice", "s"))
    new = decoder.decode(UDP_NEW, len(UDP_NEW), at).events[0]
    end = decoder.decode(UDP_DESTROY, len(UDP_DESTROY), at).events[0]

    def pair() -> None:
        for event in (new, end):
            for record in tracker.feed(event):
                record.to_json()

    results["tracker_json_per_event"] = best(pair, 20000) / 2
    # Events that make no record: the pod's own connections (neither end in the tunnel) and
    # connections from outside to a (gateway) user, which the tracker only indexes.
    others = (("own", "198.18.0.1", "192.0.2.10"), ("inbound", "192.0.2.9", "10.77.0.3"))
    for name, src, dst in others:
        events = [
            ev._replace(orig_src=src, orig_dst=dst, ct_id=i)
            for i in range(1000)
            for ev in (new, end)
        ]

        def feed_all(evs: list[Any] = events) -> None:
            for event in evs:
                tracker.feed(event)

        results[f"tracker_{name}_per_event"] = best(feed_all, 20) / len(events)
    return results


# --- main -----------------------------------------------------------------------------------


def machine() -> str:
    return (
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"Linux {platform.release()}, Python {platform.python_version()}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--rates",
        default="10000,20000,30000,40000",
        help="new flows per second to try (events/s are twice that)",
    )
    parser.add_argument("--seconds", type=float, default=4.0, help="generation time per trial")
    parser.add_argument("--decode-only", action="store_true")
    parser.add_argument("--no-ulogd", action="store_true", help="skip the ulogd2 baseline")
    parser.add_argument("--child-listener", metavar="OUT", help=argparse.SUPPRESS)
    parser.add_argument("--child-generator", nargs=3, metavar="X", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child_listener:
        child_listener(args.child_listener)
        return 0
    if args.child_generator:
        rate, seconds, dport = args.child_generator
        child_generator(int(rate), float(seconds), int(dport))
        return 0

    print(f"machine: {machine()}; {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC")
    dec = decode_only()
    print("decode, µs/message (CPU time, best of 7):")
    for kind in ("new", "destroy"):
        ours, ref = dec[f"ours_{kind}"], dec[f"pyroute2_{kind}"]
        print(f"  {kind:8s} ours {ours:6.2f}   pyroute2 nfct_msg {ref:6.1f}   ({ref / ours:.0f}x)")
    print(f"  tracker + JSON record: {dec['tracker_json_per_event']:.2f} µs/event")
    print(
        f"  tracker, no record: {dec['tracker_own_per_event']:.2f} µs/event (pod's own), "
        f"{dec['tracker_inbound_per_event']:.2f} µs/event (inbound, indexed)"
    )
    if args.decode_only:
        return 0

    if os.geteuid() != 0:
        print("the throughput part needs root (namespaces); use --decode-only", file=sys.stderr)
        return 1
    if len(os.sched_getaffinity(0)) < 2:
        print("needs 2 CPUs: one for the consumer, one for the generator", file=sys.stderr)
        return 1
    consumers = ["ours"]
    if not args.no_ulogd:
        if shutil.which("ulogd") is None:
            print(
                "ulogd not installed (apt-get install ulogd2 ulogd2-json); use --no-ulogd",
                file=sys.stderr,
            )
            return 1
        consumers.append("ulogd")
    rates = [int(r) for r in args.rates.split(",") if r]
    trials: list[Trial] = []
    with (
        tempfile.TemporaryDirectory(prefix="vpnfleet-flowbench-") as tmpdir,
        NetnsPool("vfb-fl-") as pool,
    ):
        bench = Bench(pool, Path(tmpdir), args.seconds)
        header = (
            f"{'consumer':8s} {'flows/s':>7s} {'events':>7s} {'got':>7s} {'lost':>6s} "
            f"{'ovrrun':>6s} {'user':>5s} {'sys':>5s} {'µs/ev':>6s} {'peak ev/s':>9s} ok"
        )
        print(f"\n{header}\n{'':8s} (CPU: µs per event received; peak: busiest 100 ms)")
        for rate in rates:
            for consumer in consumers:
                t = bench.run(consumer, rate)
                trials.append(t)
                peak = f"{t.peak_per_s:9d}" if t.peak_per_s else f"{'-':>9s}"
                print(
                    f"{t.consumer:8s} {t.rate:7d} {2 * t.sent:7d} {t.new + t.destroy:7d} "
                    f"{t.lost:6d} {t.overruns:6d} {t.us_per_event(t.user):5.1f} "
                    f"{t.us_per_event(t.sys):5.1f} {t.us_per_event():6.1f} {peak} "
                    f"{'yes' if t.ok else 'NO'} {' '.join(t.notes)}",
                    flush=True,
                )
                if t.kernel_drops:
                    print(f"  (kernel dropped {t.kernel_drops} entries: table full, not ours)")
    print()
    ours_ok = [t for t in trials if t.consumer == "ours" and t.ok]
    if ours_ok:
        best = max(ours_ok, key=lambda t: t.rate)
        print(
            f"ours: highest rate without loss: {best.rate} new flows/s = {2 * best.rate} "
            f"events/s (NEW+DESTROY); busiest 100 ms absorbed: {best.peak_per_s} events/s"
        )
    for rate in rates:
        pair = {t.consumer: t for t in trials if t.rate == rate}
        if "ours" in pair and "ulogd" in pair:
            ratio = pair["ours"].us_per_event() / pair["ulogd"].us_per_event()
            print(f"flows/s {rate}: CPU per event ours/ulogd = {ratio:.2f}")
    if len(consumers) == 2 and trials:
        totals = {
            c: sum(t.cpu for t in trials if t.consumer == c)
            / max(1, sum(t.new + t.destroy for t in trials if t.consumer == c))
            for c in consumers
        }
        print(
            f"all trials: ours {totals['ours'] * 1e6:.1f} µs/event, ulogd "
            f"{totals['ulogd'] * 1e6:.1f} µs/event, ratio {totals['ours'] / totals['ulogd']:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
