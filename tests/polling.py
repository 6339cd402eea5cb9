"""Waiting for something a test expects to happen, with a bound (no bare sleeps)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest


async def until(check: Callable[[], Any], seconds: float, what: str, every: float = 0.1) -> Any:
    """Poll an (a)sync check until it returns something truthy; fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {seconds}s waiting for {what}")
        await asyncio.sleep(every)
