"""The agent's flow records are exactly what the control plane's ingest accepts."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from vpnfleet.core.flowtracker import FlowRecord as AgentRecord
from vpnfleet.wire import FlowBatch, FlowReport


def agent_record(**change: object) -> AgentRecord:
    base = AgentRecord(
        kind="end", flow_id="pod-a:3221225473:1795705445", pod="pod-a", user="alice",
        session_uid="pod-a-9f2c1e7a", proto="tcp", start_ms=1795705445123,
        end_ms=1795705505000, tunnel_ip="10.200.0.2", tunnel_port=51000, nat_ip="10.99.0.11",
        nat_port=40000, dst_ip="10.20.0.5", dst_port=443, packets_out=12, bytes_out=1830,
        packets_in=10, bytes_in=53120,
    )  # fmt: skip
    return base._replace(**change)


@pytest.mark.parametrize(
    "record",
    [
        agent_record(),
        agent_record(kind="start", end_ms=None, packets_out=None, bytes_out=None),
        agent_record(dst_ip=None, dst_port=None, user=None, session_uid=None),  # privacy
        agent_record(end_inferred=True, packets_in=None, bytes_in=None),
        agent_record(proto="47", tunnel_port=0, nat_port=0),  # GRE: no ports
    ],
)
def test_agent_records_validate_as_sent(record: AgentRecord) -> None:
    batch = FlowBatch.model_validate({"pod": "pod-a", "records": [record.as_dict()]})
    assert batch.records[0].model_dump(exclude={"event"}) == record.as_dict()
    # The agent spools and sends the line it prints: the same record, marked as a flow.
    line = FlowBatch.model_validate_json(f'{{"pod":"pod-a","records":[{record.to_log_line()}]}}')
    assert line.records[0] == batch.records[0].model_copy(update={"event": "flow"})


def test_records_that_would_be_misread_are_refused() -> None:
    good = agent_record().as_dict()
    for change, reason in [
        ({"nat_ip": "10.99.0"}, "is not an IPv4 address"),
        ({"tunnel_ip": "10.200.0.02"}, "is not an IPv4 address"),
        ({"kind": "end", "end_ms": None}, "an end record needs end_ms"),
        ({"start_ms": 1795705445123000}, "less than or equal to"),
        ({"extra": 1}, "Extra inputs are not permitted"),
    ]:
        with pytest.raises(ValidationError, match=reason):
            FlowReport.model_validate({**good, **change})
    with pytest.raises(ValidationError, match="from pod 'pod-a', the batch from 'pod-b'"):
        FlowBatch.model_validate({"pod": "pod-b", "records": [good]})
