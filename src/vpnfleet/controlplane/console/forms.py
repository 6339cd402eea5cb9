"""Turning console form fields into the API's own request models (one set of rules)."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from vpnfleet.controlplane.errors import Problem

M = TypeVar("M", bound=BaseModel)


def validated(model: type[M], data: dict[str, Any]) -> M:
    """``data`` as ``model``, or a 422 naming each wrong field in one sentence."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        parts = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err.get("loc", ())) or "form"
            parts.append(f"{field}: {str(err.get('msg', 'invalid')).removeprefix('Value error, ')}")
        raise Problem(422, "Invalid input", "; ".join(parts)) from None


def number(form: dict[str, str], field: str, default: int) -> int:
    text = form.get(field, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise Problem(
            422, "Invalid input", f"{field}: {text[:40]!r} is not a whole number"
        ) from None


def names(text: str) -> list[str]:
    """A comma- or space-separated list of names, blanks dropped."""
    return [n for n in text.replace(",", " ").split() if n]
