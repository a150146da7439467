"""Limits by event name: which rule of a table applies to an event. Pure.

An app's ``client_event_limits`` (client events, per connection and optionally
per user across the cluster) and ``rest_event_limits`` (REST publishes, per app
across the cluster) map an event name, or a prefix ending in ``*``, to a token
bucket. :class:`EventLimits` picks the rule of an event: its exact name first,
else the longest matching prefix, else none (no limit of its own). The answer
for a name is remembered (at most :data:`MAX_REMEMBERED` names; past that it is
computed each time), so the hot path of a client event costs one dictionary
lookup. The buckets themselves are the caller's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Generic, TypeVar

__all__ = ["MAX_REMEMBERED", "EventLimits", "is_valid_pattern"]

#: Event names whose rule is remembered at most (names come from clients).
MAX_REMEMBERED = 4096

_L = TypeVar("_L")


def is_valid_pattern(pattern: str, prefix: str = "") -> bool:
    """Whether ``pattern`` is an exact event name or a prefix ending in ``*``.

    Either must start with ``prefix`` (``client-`` for client events); only the
    last character may be ``*``, and nothing may be a control character.
    """
    if not pattern.startswith(prefix) or len(pattern) > 200 or not pattern.isprintable():
        return False
    return "*" not in pattern[:-1] and (pattern != "*" or not prefix)


class EventLimits(Generic[_L]):
    """The rule that applies to each event name of one table.

    Args:
        rules: event name or prefix ending in ``*`` → its limit.
    """

    __slots__ = ("_exact", "_prefixes", "_remembered")

    def __init__(self, rules: Mapping[str, _L]) -> None:
        self._exact = {name: (name, limit) for name, limit in rules.items() if name[-1:] != "*"}
        # Longest first: "client-cursor-*" wins over "client-*".
        self._prefixes = sorted(
            ((name[:-1], name, limit) for name, limit in rules.items() if name[-1:] == "*"),
            key=lambda item: -len(item[0]),
        )
        self._remembered: dict[str, tuple[str, _L] | None] = {}

    @property
    def active(self) -> bool:
        """Whether the table has any rule."""
        return bool(self._exact) or bool(self._prefixes)

    def match(self, name: str) -> tuple[str, _L] | None:
        """``(rule, limit)`` for the event ``name``, or ``None`` when no rule applies."""
        remembered = self._remembered
        if name in remembered:
            return remembered[name]
        found = self._exact.get(name)
        if found is None:
            for prefix, rule, limit in self._prefixes:
                if name.startswith(prefix):
                    found = (rule, limit)
                    break
        if len(remembered) < MAX_REMEMBERED:
            remembered[name] = found
        return found
