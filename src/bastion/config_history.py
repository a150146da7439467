"""The ``[apps.history]`` settings: channel history and recovery of missed events.

A model of its own beside :mod:`bastion.config` (which re-exports it and holds
the one ``Settings`` object): what a table of ``[[apps]]`` says about history.
Strict and closed like every settings model; see docs/configuration.md.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["HistorySettings"]


class HistorySettings(BaseModel):
    """Channel history and recovery of missed events (``[apps.history]``; absent: off).

    Server events published on a channel whose name starts with one of
    ``channel_prefixes`` are recorded with a position, so a client that reconnects
    can get what it missed (docs/recovery.md). Every bound holds per channel;
    ``max_channels`` bounds a node's memory per app.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    #: Channels that have history: names starting with one of these (``""``: every one).
    channel_prefixes: Annotated[list[str], Field(min_length=1)] = Field(
        default_factory=lambda: [""]
    )
    #: Events kept per channel.
    max_events: Annotated[int, Field(gt=0, le=10_000)] = 100
    #: Bytes of event names and data kept per channel.
    max_bytes: Annotated[int, Field(gt=0, le=16 * 1024 * 1024)] = 65_536
    #: Seconds an event is kept.
    max_age_seconds: Annotated[float, Field(gt=0, le=86_400)] = 300
    #: Channels with history per app on one node (in memory; the least recently
    #: published goes first). With Redis the bound is ``position_ttl_seconds``.
    max_channels: Annotated[int, Field(gt=0, le=1_000_000)] = 1000
    #: Events one resume or one backfill request replays at most (more missed: false).
    max_replay_events: Annotated[int, Field(gt=0, le=10_000)] = 100
    #: Seconds a quiet channel keeps its epoch and last offset after its last event.
    position_ttl_seconds: Annotated[int, Field(gt=0, le=30 * 86_400)] = 3600

    @field_validator("channel_prefixes")
    @classmethod
    def _channel_prefixes(cls, value: list[str]) -> list[str]:
        for prefix in value:
            if prefix.startswith("#"):
                raise ValueError("server-to-user channels never have history")
        return value

    @model_validator(mode="after")
    def _positions_outlive_events(self) -> HistorySettings:
        if self.position_ttl_seconds < self.max_age_seconds:
            raise ValueError("position_ttl_seconds must be at least max_age_seconds")
        return self
