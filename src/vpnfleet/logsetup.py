"""Logging: JSON lines for machines, readable text for a terminal."""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Any

_STD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()) | {"message", "asctime"}


class JSONFormatter(logging.Formatter):
    """One JSON object per line; `extra=` fields are kept as top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STD and not key.startswith("_"):
                out[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            out["error"] = record.exc_info[0].__name__
            # The stack, or the cause of a rare failure is lost (it was, once: the message
            # alone said "RuntimeError" and nothing else).
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


def setup(fmt: str = "text", level: str = "INFO") -> None:
    """Configure the root logger once for the process."""
    if fmt not in ("text", "json"):
        raise ValueError("log format must be 'text' or 'json'")
    handler = logging.StreamHandler(sys.stderr if fmt == "text" else sys.stdout)
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's access log would print every request line; ours are enough.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    # httpx logs every request at INFO; the agent makes several a second.
    logging.getLogger("httpx").setLevel(logging.WARNING)
