"""Name → factory registries, so every variant is built by name from config (as in timm)."""
from __future__ import annotations

import difflib
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A named table of factories; unknown names fail with the allowed names and the closest one."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._factories[name] = factory
            return factory

        return decorator

    def get(self, name: str) -> Callable[..., T]:
        if name not in self._factories:
            raise ValueError(unknown_choice_message(self.kind, name, self.names()))
        return self._factories[name]

    def names(self) -> list[str]:
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories


def unknown_choice_message(what: str, value: object, allowed: list[str]) -> str:
    """The one wording for a bad choice: what, the value, the allowed values, the closest one."""
    message = f"unknown {what} {value!r}; allowed: {', '.join(map(str, allowed))}"
    close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
    if close:
        message += f" (did you mean {close[0]!r}?)"
    return message
