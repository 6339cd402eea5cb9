"""Printing: JSON for scripts, tables for people."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

console = Console()
err_console = Console(stderr=True)


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


# Control characters (C0, DEL, C1) and the invisible and bidirectional formatting characters
# that can make a terminal show something other than what is stored.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


def safe(text: str) -> str:
    """``text`` as it may reach a terminal: each control or invisible formatting character
    shown as its escape (``\\x1b``, ``\\n``, ``\\u202e``), so stored text cannot move the
    cursor, change colours or hide itself. Rich markup is not interpreted by the printers
    below either: they print :class:`rich.text.Text`."""
    return _UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def plain(text: str) -> Text:
    """Stored text for rich: escaped (:func:`safe`) and never read as markup."""
    return Text(safe(text))


def say(text: str, *, err: bool = False) -> None:
    """Print one line that may hold stored text (user descriptions, e-mails, messages)."""
    (err_console if err else console).print(plain(text), highlight=False, soft_wrap=True)


def _cell(value: Any) -> Text:
    if value is None:
        return Text("-")
    if isinstance(value, bool):
        return Text("yes" if value else "no")
    if isinstance(value, list):
        return plain(", ".join(str(v) for v in value) or "-")
    if isinstance(value, dict):
        return plain(", ".join(f"{k}={v}" for k, v in value.items()) or "-")
    return plain(str(value))


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str | None = None) -> None:
    t = Table(title=title, show_lines=False, highlight=False)
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
        t.add_row(plain(key.replace("_", " ")), _cell(value))
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
        say(str(data))
