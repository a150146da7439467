"""Pusher's HTTP REST API, as the official server SDKs call it.

Order of checks for every route: the app named by the route's id must exist
(404), the request must be signed by that app (401: key bound to the route,
timestamp within ±600 s, ``body_md5`` of the raw bytes, constant-time digest
compare, any of the app's active secrets during rotation), its signature must
not have been accepted before anywhere in the cluster (401 ``replayed_request``;
the :class:`~bastion.adapters.base.ReplayClaims` of the node), the app's own
``rest_requests`` bucket must hold a token (429 ``app_rate_limited`` with
``Retry-After``; only after the signature and the replay check, so neither a
stranger nor a replayed request can spend the app's budget), the app must be
enabled (403), and only then is the body parsed. Once every event of a trigger or
a batch is valid, the app's ``rest_event_limits`` buckets of their names must
hold a token each (429 ``event_rate_limited`` with ``Retry-After``, nothing
delivered; cluster-wide with Redis). The per-address limits
(``ip_rate_limited``, ``auth_failure_limit``) are gates of the route table
(:mod:`bastion.api.routes`), passed before a request gets here.
A multi-event batch is validated whole before any event is delivered.
``GET …/channels/{name}/history`` is Bastion's history backfill (docs/recovery.md):
the same never-partial verdict as a WebSocket resume.
Errors are JSON: ``{"error": message, "reason": slug}``.

:meth:`RestApi.handle` is a coroutine: the queries read the cluster state, whose
reads are coroutines. On one node nothing in it ever waits, and the listener
runs it eagerly (:func:`bastion.eager.start`), so the answer is written in the
same call; with Redis it waits for the store, and a store that cannot answer
is a 503 ``cluster_unavailable``, never a partial answer.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from bastion.adapters.base import ChannelState, ClusterUnavailable, ReplayClaims
from bastion.api.http import (
    HttpRequest,
    HttpResponse,
    error_response,
    json_response,
    query_pairs,
    rate_limited_response,
)
from bastion.config import RateSettings, Settings
from bastion.core.history import Unrecovered
from bastion.core.hub import AppState, Hub
from bastion.errors import Refused
from bastion.metrics import Metrics
from bastion.protocol.messages import loads
from bastion.protocol.names import (
    SERVER_TO_USER_PREFIX,
    ChannelKind,
    classify_channel,
    is_valid_channel_name,
    is_valid_socket_id,
    is_valid_user_id,
)
from bastion.protocol.positions import parse_position
from bastion.protocol.refusals import Reason
from bastion.protocol.signing import verify_rest_request
from bastion.security.limits import LimiterFactory, RateLimiter, memory_limiters
from bastion.security.replay import Verdict
from bastion.server.refusals import RefusalPath

__all__ = ["RestApi"]

_ROUTE = re.compile(
    r"^/apps/(?P<app_id>[^/]+)/(?:"
    r"(?P<events>events)|(?P<batch>batch_events)|(?P<channels>channels)"
    r"|channels/(?P<channel>[^/]+)(?:(?P<users>/users)|(?P<history>/history))?"
    r"|users/(?P<user_id>[^/]+)/terminate_connections)$"
)
#: pusher (PyPI) 3.3 posts terminate_connections without the /apps/{id} prefix;
#: the app is then the one whose key signed the request.
_USER_ROUTE = re.compile(r"^/users/(?P<user_id>[^/]+)/terminate_connections$")
_INFO_ATTRIBUTES = frozenset({"user_count", "subscription_count"})


def _info_attributes(raw: Any) -> frozenset[str]:
    if raw is None:
        return frozenset()
    if not isinstance(raw, str):
        raise Refused(Reason.HTTP_INVALID_FIELD, "info must be a comma-separated string")
    attributes = frozenset(part.strip() for part in raw.split(",") if part.strip())
    return attributes


class RestApi:
    """Routes and answers REST requests against the hub and the cluster state.

    Args:
        hub: the node's hub (its cluster state answers the queries).
        refusals: the node's refusal path.
        metrics: the node's metrics.
        replay: the node's replay claims (cluster-wide or its own).
        limiters: builds the per-app REST buckets (cluster-wide with Redis).
    """

    def __init__(
        self,
        hub: Hub,
        refusals: RefusalPath,
        metrics: Metrics,
        replay: ReplayClaims,
        *,
        limiters: LimiterFactory | None = None,
    ) -> None:
        self.hub = hub
        self.refusals = refusals
        self.metrics = metrics
        self.replay = replay
        #: app id → its ``rest_requests`` settings and bucket (rebuilt if they change).
        self.app_limiters: dict[str, tuple[RateSettings, RateLimiter]] = {}
        #: Builds those buckets (cluster-wide ones with the redis adapter).
        self.limiters: LimiterFactory = limiters or memory_limiters
        #: (app id, rule) → its ``rest_event_limits`` settings and bucket.
        self.event_limiters: dict[tuple[str, str], tuple[RateSettings, RateLimiter]] = {}

    async def handle(self, request: HttpRequest, *, now: float) -> HttpResponse:
        """Answer one request; ``now`` is the Unix time used for the signature window."""
        app: AppState | None = None
        try:
            match = _ROUTE.match(request.path) or _USER_ROUTE.match(request.path)
            if match is None:
                raise Refused(Reason.HTTP_NOT_FOUND)
            pairs = query_pairs(request.query)
            params = dict(pairs)
            if "app_id" in match.re.groupindex:
                app = self.hub.apps_by_id.get(match["app_id"])
            else:
                app = self.hub.apps_by_key.get(params.get("auth_key", ""))
            if app is None:
                raise Refused(Reason.HTTP_UNKNOWN_APP)
            failure = verify_rest_request(
                method=request.method,
                path=request.path,
                params=pairs,
                body=request.body,
                app_key=app.settings.key,
                secrets=app.secret_set.active(now),
                now=now,
            )
            if failure is not None:
                raise Refused(failure)
            await self._check_replay(app, params, now)
            wait = self._app_rate(app, now)
            if wait > 0:
                self.refusals.record(Reason.HTTP_APP_RATE, app_id=app.id, ip=request.ip)
                return rate_limited_response(Reason.HTTP_APP_RATE, wait)
            if not app.settings.enabled:
                raise Refused(Reason.HTTP_APP_DISABLED)
            return await self._route(app, request, params, match)
        except Refused as refused:
            return self._refused(refused, app, request)
        except ClusterUnavailable as error:
            reason = Reason.HTTP_CLUSTER_UNAVAILABLE
            self.refusals.record(
                reason, app_id=app.id if app is not None else None, ip=request.ip, detail=str(error)
            )
            return error_response(reason)

    def apply_settings(self, settings: Settings) -> None:
        """A live reload: forget the buckets of apps that are gone.

        A changed app's bucket is rebuilt at its next request (its settings differ).
        """
        wanted = {app.id for app in settings.apps}
        for app_id in [app_id for app_id in self.app_limiters if app_id not in wanted]:
            del self.app_limiters[app_id]
        for key in [key for key in self.event_limiters if key[0] not in wanted]:
            del self.event_limiters[key]

    def _refused(
        self, refused: Refused, app: AppState | None, request: HttpRequest
    ) -> HttpResponse:
        self.refusals.record(
            refused.reason,
            app_id=app.id if app is not None else None,
            ip=request.ip,
            detail=refused.detail,
        )
        return error_response(refused.reason, refused.detail)

    def _app_rate(self, app: AppState, now: float) -> float:
        """Spend a token of the app's ``rest_requests`` bucket: 0.0, or the wait."""
        limit = app.settings.rest_requests
        if limit is None:
            return 0.0
        cached = self.app_limiters.get(app.id)
        if cached is None or cached[0] is not limit:
            cached = self.app_limiters[app.id] = (
                limit,
                # ``now`` is Unix time (the signature window's clock).
                self.limiters("rest_app", limit.rate, limit.burst, 1, time.time),
            )
        return cached[1].take(app.id, now)

    async def _check_replay(self, app: AppState, params: dict[str, str], now: float) -> None:
        # Only reached once the signature verified, so both parameters are present
        # and the timestamp parses; nothing unverified is ever remembered.
        verdict = await self.replay.claim(
            app.id,
            params["auth_signature"],
            int(params["auth_timestamp"]),
            now,
            max_entries=app.settings.replay_guard_max_entries,
        )
        if verdict is Verdict.REPLAYED:
            raise Refused(Reason.HTTP_REPLAYED)

    async def _route(
        self, app: AppState, request: HttpRequest, params: dict[str, str], match: re.Match[str]
    ) -> HttpResponse:
        method = request.method
        groups = match.groupdict()
        if groups.get("events") or groups.get("batch"):
            if method != "POST":
                raise Refused(Reason.HTTP_METHOD)
            body = self._json_object(request.body)
            if match["events"]:
                return await self._trigger(app, body, request.ip)
            return await self._trigger_batch(app, body, request.ip)
        if groups.get("user_id") is not None:
            if method != "POST":
                raise Refused(Reason.HTTP_METHOD)
            user_id = unquote(match["user_id"])
            if not is_valid_user_id(user_id):
                raise Refused(Reason.HTTP_INVALID_FIELD, "Invalid user id")
            self.hub.terminate_user(app, user_id)
            return json_response({})
        if method != "GET":
            raise Refused(Reason.HTTP_METHOD)
        if match["channels"]:
            return await self._channels(app, params)
        name = unquote(match["channel"])
        self._check_channel(app, name, allow_user_channel=False)
        if match["users"]:
            return await self._users(app, name)
        if match["history"]:
            return await self._history(app, name, params)
        return await self._channel(app, name, params)

    # --- publishing ----------------------------------------------------------------------

    @staticmethod
    def _json_object(body: bytes) -> dict[str, Any]:
        try:
            value = loads(body)
        except Refused:
            raise Refused(Reason.HTTP_INVALID_BODY, "Request body is not valid JSON") from None
        if not isinstance(value, dict):
            raise Refused(Reason.HTTP_INVALID_BODY)
        return value

    def _check_channel(self, app: AppState, name: Any, *, allow_user_channel: bool) -> str:
        if not isinstance(name, str) or not is_valid_channel_name(
            name, app.settings.max_channel_name_length
        ):
            raise Refused(Reason.HTTP_INVALID_CHANNEL)
        if name.startswith(SERVER_TO_USER_PREFIX) and not allow_user_channel:
            raise Refused(Reason.HTTP_INVALID_CHANNEL)
        return name

    def _event(self, app: AppState, item: dict[str, Any], *, batch: bool) -> _Event:
        settings = app.settings
        name = item.get("name")
        if not isinstance(name, str) or not self.hub.validate_event_name(app, name):
            raise Refused(Reason.HTTP_INVALID_EVENT)
        data = item.get("data")
        if not isinstance(data, str):
            raise Refused(Reason.HTTP_INVALID_FIELD, "data must be a string")
        if len(data.encode("utf-8", "surrogatepass")) > settings.max_event_payload_bytes:
            raise Refused(Reason.HTTP_PAYLOAD_TOO_LARGE)
        if batch:
            channels = [item.get("channel")]
        elif "channels" in item:
            channels = item["channels"]
            if not isinstance(channels, list) or not channels:
                raise Refused(Reason.HTTP_INVALID_FIELD, "channels must be a non-empty list")
        else:
            channels = [item.get("channel")]
        if len(channels) > settings.max_channels_per_event:
            raise Refused(Reason.HTTP_TOO_MANY_CHANNELS)
        names = [self._check_channel(app, c, allow_user_channel=True) for c in channels]
        names = list(dict.fromkeys(names))
        if len(names) > 1 and any(classify_channel(n).kind is ChannelKind.ENCRYPTED for n in names):
            raise Refused(Reason.HTTP_ENCRYPTED_MULTI)
        socket_id = item.get("socket_id")
        if socket_id is not None and (
            not isinstance(socket_id, str) or not is_valid_socket_id(socket_id)
        ):
            raise Refused(Reason.HTTP_INVALID_SOCKET_ID)
        info = _info_attributes(item.get("info"))
        if info - _INFO_ATTRIBUTES:
            raise Refused(Reason.HTTP_INVALID_INFO)
        return _Event(name, data, names, socket_id, info)

    def _publish(self, app: AppState, event: _Event) -> None:
        self.hub.publish(app, event.channels, event.name, event.data, event.socket_id)
        self.metrics.events_published[app.id] += 1

    def _event_info(self, event: _Event, states: dict[str, ChannelState]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for name in event.channels:
            state = states[name]
            attributes: dict[str, int] = {}
            presence = classify_channel(name).kind is ChannelKind.PRESENCE
            if "user_count" in event.info and presence:
                attributes["user_count"] = state.user_count
            if "subscription_count" in event.info:
                attributes["subscription_count"] = state.subscription_count
            result[name] = attributes
        return result

    def _event_rate(self, app: AppState, events: list[_Event], ip: str | None) -> float:
        """Take a token per event from its name's bucket; nothing when any lacks one.

        Returns 0.0, or the seconds to wait (the refusal is recorded).
        """
        rules = app.rest_event_limits
        if not rules.active:
            return 0.0
        wanted: Counter[str] = Counter()
        limits: dict[str, RateSettings] = {}
        for event in events:
            found = rules.match(event.name)
            if found is not None:
                wanted[found[0]] += 1
                limits[found[0]] = found[1]
        now = time.time()
        buckets = [
            (self._event_bucket(app, rule, limits[rule]), rule, n) for rule, n in wanted.items()
        ]
        wait = max(
            (bucket.peek(f"{app.id}\n{rule}", now, n) for bucket, rule, n in buckets), default=0.0
        )
        if wait > 0:
            self.refusals.record(Reason.HTTP_EVENT_RATE, app_id=app.id, ip=ip)
            return wait
        for bucket, rule, n in buckets:
            bucket.take(f"{app.id}\n{rule}", now, n)
        return 0.0

    def _event_bucket(self, app: AppState, rule: str, limit: RateSettings) -> RateLimiter:
        cached = self.event_limiters.get((app.id, rule))
        if cached is None or cached[0] is not limit:
            bucket = self.limiters("rest_event_app", limit.rate, limit.burst, 1, time.time)
            cached = self.event_limiters[(app.id, rule)] = (limit, bucket)
        return cached[1]

    async def _trigger(self, app: AppState, body: dict[str, Any], ip: str | None) -> HttpResponse:
        event = self._event(app, body, batch=False)
        wait = self._event_rate(app, [event], ip)
        if wait > 0:
            return rate_limited_response(Reason.HTTP_EVENT_RATE, wait)
        self._publish(app, event)
        if not event.info:
            return json_response({})
        states = await self.hub.state.channel_states(app.id, event.channels)
        return json_response({"channels": self._event_info(event, states)})

    async def _trigger_batch(
        self, app: AppState, body: dict[str, Any], ip: str | None
    ) -> HttpResponse:
        batch = body.get("batch")
        if not isinstance(batch, list) or not all(isinstance(item, dict) for item in batch):
            raise Refused(Reason.HTTP_INVALID_FIELD, "batch must be a list of event objects")
        if len(batch) > app.settings.max_event_batch_size:
            raise Refused(Reason.HTTP_BATCH_TOO_LARGE)
        events = [self._event(app, item, batch=True) for item in batch]
        wait = self._event_rate(app, events, ip)
        if wait > 0:
            return rate_limited_response(Reason.HTTP_EVENT_RATE, wait)
        for event in events:
            self._publish(app, event)
        if not any(event.info for event in events):
            return json_response({})
        names = list(dict.fromkeys(name for event in events for name in event.channels))
        states = await self.hub.state.channel_states(app.id, names)
        results = []
        for event in events:
            info = self._event_info(event, states) if event.info else {}
            results.append(info[event.channels[0]] if event.info else {})
        return json_response({"batch": results})

    # --- queries -------------------------------------------------------------------------

    async def _channels(self, app: AppState, params: dict[str, str]) -> HttpResponse:
        prefix = params.get("filter_by_prefix", "")
        info = _info_attributes(params.get("info"))
        if info - _INFO_ATTRIBUTES:
            raise Refused(Reason.HTTP_INVALID_INFO)
        if "user_count" in info and not prefix.startswith("presence-"):
            raise Refused(Reason.HTTP_INVALID_INFO, "user_count needs filter_by_prefix=presence-")
        limit = app.settings.max_channels_in_query
        states = await self.hub.state.channel_states(app.id, None, prefix, limit)
        channels: dict[str, dict[str, int]] = {}
        for name, state in sorted(states.items())[:limit]:
            attributes: dict[str, int] = {}
            if "user_count" in info:
                attributes["user_count"] = state.user_count
            if "subscription_count" in info:
                attributes["subscription_count"] = state.subscription_count
            channels[name] = attributes
        if len(states) > limit:
            # More channels than one answer lists: a narrower filter_by_prefix sees them.
            return json_response({"channels": channels, "truncated": True})
        return json_response({"channels": channels})

    async def _channel(self, app: AppState, name: str, params: dict[str, str]) -> HttpResponse:
        info = _info_attributes(params.get("info"))
        if info - (_INFO_ATTRIBUTES | {"cache"}):
            raise Refused(Reason.HTTP_INVALID_INFO)
        channel_type = classify_channel(name)
        presence = channel_type.kind is ChannelKind.PRESENCE
        if "user_count" in info and not presence:
            raise Refused(Reason.HTTP_INVALID_INFO, "user_count is only for presence channels")
        if "cache" in info and not channel_type.cached:
            raise Refused(Reason.HTTP_INVALID_INFO, "cache is only for cache channels")
        state = (await self.hub.state.channel_states(app.id, [name]))[name]
        result: dict[str, Any] = {"occupied": state.occupied}
        if "user_count" in info:
            result["user_count"] = state.user_count
        if "subscription_count" in info:
            result["subscription_count"] = state.subscription_count
        if "cache" in info:
            cached = await self.hub.state.cached(app.id, name)
            result["cache"] = (
                None
                if cached is None
                else {
                    "event": cached.event,
                    "data": cached.data,
                    "ttl": round(cached.ttl_ms / 1000),
                }
            )
        return json_response(result)

    async def _history(self, app: AppState, name: str, params: dict[str, str]) -> HttpResponse:
        """Backfill: the channel's events since ``since``, all of them or none.

        The same verdict as a resume (:mod:`bastion.core.history`): ``recovered``
        with every event after ``since`` (at most ``max_replay_events``), or not,
        with no event and the ``reason``; ``position`` is where the channel is. No
        ``since``: just the position. A store that cannot answer is a 503.
        """
        raw = params.get("since")
        asked = None
        if raw is not None:
            asked = parse_position(raw)
            if asked is None:
                raise Refused(Reason.HTTP_INVALID_POSITION)
        policy = app.history
        if policy is None or not policy.covers(name):
            return json_response(
                {"recovered": False, "reason": Unrecovered.HISTORY_OFF, "events": []}
            )
        found = await self.hub.history.since(app.id, name, asked, None, policy.limits)
        if found.reason == Unrecovered.FUTURE:
            raise Refused(
                Reason.HTTP_INVALID_POSITION, "since is past the channel's last recorded event"
            )
        epoch = found.position.epoch if found.position is not None else ""
        answer: dict[str, Any] = {"recovered": found.recovered}
        if found.reason is not None:
            answer["reason"] = found.reason
        if found.position is not None:
            answer["position"] = str(found.position)
        answer["events"] = [
            {"event": entry.event, "data": entry.data, "position": f"{epoch}:{entry.offset}"}
            for entry in found.entries
        ]
        return json_response(answer)

    async def _users(self, app: AppState, name: str) -> HttpResponse:
        if classify_channel(name).kind is not ChannelKind.PRESENCE:
            raise Refused(Reason.HTTP_NOT_PRESENCE)
        members = await self.hub.state.members(app.id, name)
        return json_response({"users": [{"id": user_id} for user_id in sorted(members)]})


@dataclass(frozen=True, slots=True)
class _Event:
    name: str
    data: str
    channels: list[str]
    socket_id: str | None
    info: frozenset[str]
