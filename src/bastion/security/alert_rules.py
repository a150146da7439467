"""The alert rules of ``[alerts]``: which signals exist, and each one's built-in threshold.

Pure data, apart from :mod:`bastion.security.alerts` (the engine) so the
configuration can name the rules without importing the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["DEFAULT_RULES", "SIGNALS", "AlertRule", "AlertSeverity"]

AlertSeverity = Literal["info", "warning", "critical"]

#: Every signal a rule may watch, in the order the docs list them.
SIGNALS = (
    "auth_failures",
    "rate_limit_hits",
    "payload_refusals",
    "origin_refusals",
    "new_blocks",
    "forged_bus_messages",
    "webhook_dead_letters",
)


@dataclass(frozen=True, slots=True)
class AlertRule:
    """One threshold.

    Attributes:
        signal: what it counts (one of :data:`SIGNALS`).
        threshold: events within the window that raise it (>= 1).
        window_seconds: the sliding window, and how long a raised alert stays open.
        severity: how urgent it is.
    """

    signal: str
    threshold: int
    window_seconds: float
    severity: AlertSeverity

    def __post_init__(self) -> None:
        if self.signal not in SIGNALS:
            raise ValueError(f"unknown alert signal {self.signal!r}")
        if self.threshold < 1:
            raise ValueError("threshold must be >= 1")
        if not self.window_seconds > 0:
            raise ValueError("window_seconds must be > 0")


#: Each rule's built-in threshold, window and severity (``[alerts.<rule>]`` overrides
#: them). Per node: a cluster of N nodes sees up to N times the traffic.
DEFAULT_RULES = (
    AlertRule("auth_failures", 50, 60.0, "warning"),
    AlertRule("rate_limit_hits", 500, 60.0, "warning"),
    AlertRule("payload_refusals", 100, 60.0, "warning"),
    AlertRule("origin_refusals", 50, 60.0, "warning"),
    AlertRule("new_blocks", 5, 300.0, "warning"),
    AlertRule("forged_bus_messages", 1, 60.0, "critical"),
    AlertRule("webhook_dead_letters", 10, 300.0, "warning"),
)
