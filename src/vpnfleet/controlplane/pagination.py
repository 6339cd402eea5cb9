"""Keyset pagination of the list endpoints: `limit`, an opaque `cursor`, `Link: rel="next"`.

Each list is ordered by a key that is unique (a name, an id, or a time and the id breaking its
ties), and the cursor is the last key a page held. The next page is the rows strictly after that
key in the list's order, so rows inserted or deleted while a client walks the pages never make
it see a row twice or skip one that was there from the start (an offset would shift). The body
stays the plain JSON list it always was; the next page's URL is in the `Link` header (RFC 8288),
absent on the last page.

The cursor is base64url of ``[list name, key...]``: opaque to clients, refused with a 400
naming `cursor` when it is not one this list gave out.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from fastapi import Depends, Query, Request, Response
from sqlalchemy import ColumnElement, Select, and_, or_

from vpnfleet.controlplane.errors import Problem
from vpnfleet.wire import MAX_INT64

DEFAULT_LIMIT = 500
MAX_LIMIT = 10_000
MAX_CURSOR_CHARS = 1_000  # the longest key (a group name and a rule id) fits in ~200

KeyKind = Literal["str", "int", "time"]
Row = TypeVar("Row")
Q = TypeVar("Q", bound=Select[*tuple[Any, ...]])


@dataclass(frozen=True)
class Keyset:
    """How one list is ordered: columns that together are unique, all in one direction."""

    name: str  # cursors of one list are refused by another
    columns: tuple[Any, ...]  # SQL expressions, most significant first
    kinds: tuple[KeyKind, ...]
    descending: bool = False

    def order_by(self) -> list[Any]:
        return [c.desc() if self.descending else c.asc() for c in self.columns]

    def after(self, key: Sequence[Any]) -> ColumnElement[bool]:
        """Rows strictly after `key` in this order, spelt out (a > x or a = x and b > y) so that
        both databases use the index on the leading column."""
        terms = []
        for i, column in enumerate(self.columns):
            beyond = column < key[i] if self.descending else column > key[i]
            equal = [self.columns[j] == key[j] for j in range(i)]
            terms.append(and_(*equal, beyond) if equal else beyond)
        return or_(*terms)


def encode_cursor(keyset: Keyset, key: Sequence[Any]) -> str:
    values = [v.isoformat() if isinstance(v, dt.datetime) else v for v in key]
    raw = json.dumps([keyset.name, *values], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _bad_cursor(message: str) -> Problem:
    return Problem(
        400, "Bad request", f"cursor: {message}", errors=[{"field": "cursor", "message": message}]
    )


def _storable(text: str) -> bool:
    """Text both databases can compare (a decoded cursor may hold anything JSON can)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


def decode_cursor(keyset: Keyset, cursor: str) -> tuple[Any, ...]:
    """The key a cursor names; a 400 naming `cursor` for anything this list did not give out."""
    wrong = _bad_cursor("not a cursor of this list (use the Link header of the previous page)")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = json.loads(raw)
    except (binascii.Error, ValueError):
        raise wrong from None
    if not isinstance(data, list) or len(data) != len(keyset.kinds) + 1 or data[0] != keyset.name:
        raise wrong
    key: list[Any] = []
    for kind, value in zip(keyset.kinds, data[1:], strict=True):
        text = kind == "str" and isinstance(value, str) and _storable(value)
        number = kind == "int" and type(value) is int and -MAX_INT64 - 1 <= value <= MAX_INT64
        if text or number:
            key.append(value)
        elif kind == "time" and isinstance(value, str):
            try:
                when = dt.datetime.fromisoformat(value)
                if when.tzinfo is None:
                    raise wrong
                key.append(when.astimezone(dt.UTC))
            except (ValueError, OverflowError):
                raise wrong from None
        else:
            raise wrong
    return tuple(key)


@dataclass
class Page:
    """One request's page: apply it to the list's query, then let it trim the rows and link
    the next page."""

    limit: int
    cursor: str | None
    request: Request
    response: Response

    def query(self, keyset: Keyset, query: Q) -> Q:
        """`query` ordered by the keyset, after the cursor, one row more than the limit (that
        row only tells whether a next page exists)."""
        if self.cursor is not None:
            query = query.where(keyset.after(decode_cursor(keyset, self.cursor)))
        return query.order_by(*keyset.order_by()).limit(self.limit + 1)

    def rows(
        self, keyset: Keyset, rows: Sequence[Row], key: Callable[[Row], tuple[Any, ...]]
    ) -> list[Row]:
        """The page's rows; sets `Link: <...>; rel="next"` when more follow."""
        page = list(rows[: self.limit])
        if len(rows) > self.limit:
            after = encode_cursor(keyset, key(page[-1]))
            url = self.request.url.include_query_params(cursor=after)
            self.response.headers["Link"] = f'<{url.path}?{url.query}>; rel="next"'
        return page


def _page(
    request: Request,
    response: Response,
    limit: Annotated[
        int, Query(ge=1, le=MAX_LIMIT, description="rows per page (the next page is in `Link`)")
    ] = DEFAULT_LIMIT,
    cursor: Annotated[
        str | None,
        Query(
            max_length=MAX_CURSOR_CHARS,
            description="where to continue: taken from the previous page's `Link` header",
        ),
    ] = None,
) -> Page:
    return Page(limit=limit, cursor=cursor, request=request, response=response)


PageParams = Annotated[Page, Depends(_page)]

# What every paginated operation adds to its 200 response in the OpenAPI schema.
LINK_HEADER: dict[int | str, dict[str, Any]] = {
    200: {
        "headers": {
            "Link": {
                "description": 'The next page: `</api/v1/...?cursor=...>; rel="next"` '
                "(RFC 8288); absent on the last page.",
                "schema": {"type": "string"},
            }
        }
    }
}
