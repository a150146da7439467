"""The ``[alerts]`` settings: security alert thresholds and the operator's endpoint.

Models of their own beside :mod:`bastion.config` (which re-exports them and holds
the one ``Settings`` object). Strict and closed like every settings model; the
rules themselves (names, built-in thresholds) are :mod:`bastion.security.alert_rules`.
See docs/configuration.md and docs/observability.md.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from bastion.security.alert_rules import DEFAULT_RULES, AlertRule, AlertSeverity

__all__ = ["AlertRuleSettings", "AlertSettings"]

_STRICT = ConfigDict(extra="forbid", frozen=True, strict=True)
PositiveInt = Annotated[int, Field(gt=0)]


def _long_secret(value: SecretStr) -> SecretStr:
    # The rule of every key and token of the configuration (config.LongSecret).
    if len(value.get_secret_value()) < 32:
        raise ValueError("must be at least 32 characters")
    return value


LongSecret = Annotated[SecretStr, AfterValidator(_long_secret)]


class AlertRuleSettings(BaseModel):
    """One alert rule of ``[alerts]``; what is unset keeps the rule's built-in value."""

    model_config = _STRICT

    enabled: bool = True
    #: Events within the window that raise the alert.
    threshold: PositiveInt | None = None
    #: The sliding window, seconds; a raised alert stays open (damped) as long.
    window_seconds: Annotated[float, Field(gt=0, le=86_400)] | None = None
    severity: AlertSeverity | None = None


class AlertSettings(BaseModel):
    """Security alerts: thresholds over sliding windows (``[alerts]``)."""

    model_config = _STRICT

    enabled: bool = True
    #: Operator endpoint that receives each alert as a signed POST (through the
    #: durable webhook queue); unset: alerts are audited, logged and counted only.
    url: str | None = None
    #: Signs the alert POSTs (``X-Pusher-Signature``, HMAC-SHA256); required with ``url``.
    secret: LongSecret | None = None
    #: Refuse to deliver alerts to loopback, private or link-local addresses.
    refuse_private: bool = False
    #: Addresses and reasons an alert names at most.
    top: Annotated[int, Field(ge=1, le=50)] = 5
    auth_failures: AlertRuleSettings = AlertRuleSettings()
    rate_limit_hits: AlertRuleSettings = AlertRuleSettings()
    payload_refusals: AlertRuleSettings = AlertRuleSettings()
    origin_refusals: AlertRuleSettings = AlertRuleSettings()
    new_blocks: AlertRuleSettings = AlertRuleSettings()
    forged_bus_messages: AlertRuleSettings = AlertRuleSettings()
    webhook_dead_letters: AlertRuleSettings = AlertRuleSettings()

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^\s/]+", value):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _secret_with_url(self) -> AlertSettings:
        if self.url is not None and self.secret is None:
            raise ValueError("secret is required when url is set")
        return self

    def rules(self) -> list[AlertRule]:
        """The enabled rules, each setting left unset taking the rule's built-in value."""
        rules = []
        for default in DEFAULT_RULES:
            given: AlertRuleSettings = getattr(self, default.signal)
            if not given.enabled:
                continue
            rules.append(
                AlertRule(
                    default.signal,
                    given.threshold or default.threshold,
                    given.window_seconds or default.window_seconds,
                    given.severity or default.severity,
                )
            )
        return rules
