"""Keyset pages of the console's lists (the API's cursors, controlplane/pagination.py): a page
is ``PAGE`` rows after the cursor, and the next page's link carries the last row's key."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import urlencode

from sqlalchemy import Select

from vpnfleet.controlplane.errors import Problem
from vpnfleet.controlplane.pagination import MAX_CURSOR_CHARS, Keyset, decode_cursor, encode_cursor

PAGE = 50
Row = TypeVar("Row")
Q = TypeVar("Q", bound=Select[Any])


@dataclass(frozen=True)
class Listing(Generic[Row]):
    rows: list[Row]
    next_url: str | None


def query(keyset: Keyset, select: Q, cursor: str | None) -> Q:
    """``select`` ordered by the keyset, after ``cursor``, one row more than a page."""
    if cursor:
        if len(cursor) > MAX_CURSOR_CHARS:
            raise Problem(400, "Bad request", "cursor: too long")
        select = select.where(keyset.after(decode_cursor(keyset, cursor)))
    return select.order_by(*keyset.order_by()).limit(PAGE + 1)


def listing(
    keyset: Keyset,
    rows: Sequence[Row],
    key: Callable[[Row], tuple[Any, ...]],
    path: str,
    filters: dict[str, str | None],
) -> Listing[Row]:
    """The page's rows and the link to the next page (None on the last)."""
    page = list(rows[:PAGE])
    if len(rows) <= PAGE:
        return Listing(page, None)
    params = {k: v for k, v in filters.items() if v}
    params["cursor"] = encode_cursor(keyset, key(page[-1]))
    return Listing(page, f"{path}?{urlencode(params)}")
