"""Config key declarations (``key``) and ``ConfigError``: shared by Config and by the registries that declare keys."""
from __future__ import annotations

import json
from dataclasses import field
from typing import Any, Iterable


class ConfigError(ValueError):
    """A config key, value or file that cannot be used; the message says which and how to fix it."""


def key(default: Any, doc: str, *, choices: Iterable[Any] | None = None, low: float | None = None,
        high: float | None = None, low_open: bool = False, high_open: bool = False,
        items: tuple[int | None, int | None] | None = None, nested: bool = False) -> Any:
    """Declare a config key: its default, a one-line meaning, and the allowed values or range.

    ``items`` = (low, high) makes a list key a list of integers in that range (None = unbounded);
    ``nested`` makes it a list of such lists.
    """
    metadata = {"doc": doc, "choices": None if choices is None else tuple(choices), "low": low,
                "high": high, "low_open": low_open, "high_open": high_open, "items": items, "nested": nested}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: json.loads(json.dumps(default)), metadata=metadata)
    return field(default=default, metadata=metadata)
