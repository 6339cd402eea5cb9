"""The fleet's state on one screen: rows per pod, totals and the alert conditions that hold.

Pure: computed from what the API gives (pods, the head revision, the PKI), for `vpnfleet
status` and the console's overview. The conditions mirror deploy/prometheus/alerts.yml where
the API has the facts (docs/observability.md lists both).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from typing import Any

from vpnfleet.wire import CERT_EXPIRY_WARNING, POD_FORGET_AFTER

HEARTBEAT_STALE = dt.timedelta(seconds=30)
# The control plane signs CRLs valid for 30 days, so "within 30 days" would always hold for a
# fresh one: warn when a pod's copy has a week left (only pods that report it).
CRL_WARN = dt.timedelta(days=7)


@dataclass(frozen=True)
class Condition:
    """One alert condition that holds now."""

    name: str
    subject: str
    detail: str


def _time(value: Any) -> dt.datetime | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return dt.datetime.fromtimestamp(value, dt.UTC)
    if not isinstance(value, str) or not value:
        return None
    try:
        when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def assess(
    revision: int,
    pods: list[dict[str, Any]],
    pki: dict[str, Any] | None,
    now: dt.datetime,
    show_all: bool = False,
) -> dict[str, Any]:
    """The status report: rows per pod, totals and conditions. Pure, for tests and --json."""
    rows: list[dict[str, Any]] = []
    conditions: list[Condition] = []
    hidden = 0
    for p in sorted(pods, key=lambda p: str(p.get("name"))):
        name = str(p.get("name"))
        raw = p.get("status")
        status: dict[str, Any] = raw if isinstance(raw, dict) else {}
        beat = _time(p.get("last_heartbeat"))
        seen = beat or _time(p.get("registered_at"))
        age = (now - beat).total_seconds() if beat else None
        if not show_all and (seen is None or now - seen > POD_FORGET_AFTER):
            hidden += 1
            continue
        drained = bool(status.get("drained"))
        stale = age is None or age > HEARTBEAT_STALE.total_seconds()
        applied = _int(p.get("applied_revision")) or 0
        lag = max(0, revision - applied)
        spooled = _int(status.get("spooled"))
        ready = bool(p.get("ready")) and not stale
        state = "drained" if drained else "silent" if stale else "ready" if ready else "not ready"
        rows.append(
            {
                "name": name,
                "state": state,
                "ready": ready,
                "heartbeat_age_s": None if age is None else round(age, 1),
                "clients": _int(status.get("clients")),
                "applied_revision": applied,
                "lag": lag,
                "spooled": spooled,
                "openvpn": status.get("openvpn"),
            }
        )
        if drained:
            continue  # it said goodbye: nothing to alert on
        if stale:
            when = "never" if age is None else f"{age:.0f}s ago"
            conditions.append(Condition("PodHeartbeatStale", name, f"last heartbeat {when}"))
        elif not ready:
            conditions.append(Condition("PodNotReady", name, "the pod says it is not ready"))
        if lag > 0 and not stale:
            conditions.append(
                Condition("PodRevisionLag", name, f"enforces {applied}, head is {revision}")
            )
        if spooled:
            conditions.append(Condition("SpoolBacklog", name, f"{spooled} record(s) undelivered"))
        crl = _time(status.get("crl_next_update"))
        if crl is not None and crl - now < CRL_WARN:
            conditions.append(
                Condition("CRLExpiring", name, f"its CRL copy expires {crl.isoformat()}")
            )
    live = [r for r in rows if r["state"] != "drained"]
    if not any(r["ready"] for r in live):
        conditions.append(Condition("NoPodReady", "fleet", "no pod is ready for clients"))
    pki_out: dict[str, Any] = {}
    ca = pki.get("ca") if isinstance(pki, dict) else None
    ca_end = _time(ca.get("not_after")) if isinstance(ca, dict) else None
    if ca_end is not None:
        left = ca_end - now
        days = round(left.total_seconds() / 86400, 1)
        pki_out = {"ca_not_after": ca_end.isoformat(), "ca_days_left": days}
        if left < CERT_EXPIRY_WARNING:
            conditions.append(
                Condition("CAExpiring", "pki", f"the CA expires {ca_end.date()} ({days} d)")
            )
    totals = {
        "pods": len(live),
        "ready": sum(1 for r in live if r["ready"]),
        "clients": sum(r["clients"] or 0 for r in live),
        "spooled": sum(r["spooled"] or 0 for r in live),
    }
    return {
        "at": now.isoformat(),
        "revision": revision,
        "pods": rows,
        "hidden_pods": hidden,
        "totals": totals,
        "pki": pki_out,
        "conditions": [asdict(c) for c in conditions],
    }
