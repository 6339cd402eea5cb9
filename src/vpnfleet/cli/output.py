"""Printing: JSON for scripts, tables for people."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
    return str(value)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str | None = None) -> None:
    t = Table(title=title, show_lines=False)
    for col in columns:
        t.add_column(col.replace("_", " "))
    for row in rows:
        t.add_row(*(_cell(row.get(c)) for c in columns))
    console.print(t)


def record(data: dict[str, Any], skip: Sequence[str] = ()) -> None:
    t = Table(show_header=False, box=None)
    t.add_column(style="bold")
    t.add_column()
    for key, value in data.items():
        if key in skip:
            continue
        t.add_row(key.replace("_", " "), _cell(value))
    console.print(t)


def show(data: Any, as_json: bool, columns: Sequence[str] | None = None) -> None:
    """Print a list as a table (or a single object as key/value) unless JSON was asked for."""
    if as_json:
        emit_json(data)
    elif isinstance(data, list):
        table(data, columns or (list(data[0].keys()) if data else []))
    elif isinstance(data, dict):
        record(data)
    else:
        console.print(data)
