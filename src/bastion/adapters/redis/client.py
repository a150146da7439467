"""Redis clients for the cluster, and how to name a Redis without its password."""

from __future__ import annotations

from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from bastion.security.audit import redact

__all__ = ["COMMAND_TIMEOUT", "CONNECT_TIMEOUT", "describe_error", "describe_url", "make_client"]

#: Seconds to open a TCP (or TLS) connection to Redis before the attempt fails.
CONNECT_TIMEOUT = 5.0
#: Seconds one command (publish batch, subscribe, script) may take.
COMMAND_TIMEOUT = 5.0


def describe_url(url: str) -> str:
    """``host:port/db`` (or the socket path) of a Redis URL: never its password."""
    try:
        parts = urlsplit(url)
        if parts.scheme == "unix":
            return f"unix:{parts.path}"
        host = parts.hostname or "localhost"
        port = parts.port or 6379
    except ValueError:
        return "redis (unparsable url)"
    db = parts.path.lstrip("/") or "0"
    return f"{parts.scheme}://{host}:{port}/{db}"


def describe_error(error: BaseException) -> str:
    """An error's class and text, scrubbed and short (it may echo server replies)."""
    text = redact(str(error))[:200]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def make_client(url: str) -> aioredis.Redis:
    """A client whose reconnections are ours (back-off, resubscription), never redis-py's."""
    client: aioredis.Redis = aioredis.from_url(
        url,
        socket_connect_timeout=CONNECT_TIMEOUT,
        socket_timeout=COMMAND_TIMEOUT,
        socket_keepalive=True,
        health_check_interval=0,
        retry=Retry(NoBackoff(), 0),
    )
    return client
