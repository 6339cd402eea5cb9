"""JSON log lines: one object per line, extra fields kept, exceptions with their stack."""

from __future__ import annotations

import json
import logging
import sys

from vpnfleet.logsetup import JSONFormatter


def test_an_exception_keeps_its_type_and_stack_in_one_line() -> None:
    log = logging.getLogger("t")
    try:
        raise RuntimeError("Lock is not acquired.")
    except RuntimeError:
        record = log.makeRecord("t", logging.ERROR, __file__, 1, "boom", (), sys.exc_info())
    line = JSONFormatter().format(record)
    assert "\n" not in line
    out = json.loads(line)
    assert out["error"] == "RuntimeError" and out["msg"] == "boom"
    assert "Lock is not acquired." in out["traceback"]
    assert "test_an_exception_keeps_its_type_and_stack_in_one_line" in out["traceback"]
