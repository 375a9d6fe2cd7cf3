"""Redis clients whose connection pool waits for a free connection instead of failing.

redis-py 8 caps a pool at 100 connections and raises MaxConnectionsError past that; a chat worker
with 256 reply threads, or an API streaming 300 replies at once, holds more than 100 at a moment.
These pools are sized for the process's concurrency and block (up to `wait_s`) when all are busy.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis

SPARE = 32  # listeners, heartbeats, metrics: connections beyond the request concurrency
WAIT_S = 30.0


def sync_client(url: str, *, concurrency: int, wait_s: float = WAIT_S, **options: Any) -> redis.Redis:
    """A client for up to `concurrency` threads at once (+ SPARE), each waiting `wait_s` for a connection."""
    pool = redis.BlockingConnectionPool.from_url(url, max_connections=concurrency + SPARE, timeout=wait_s, **options)
    return redis.Redis(connection_pool=pool)


def async_client(url: str, *, concurrency: int, wait_s: float = WAIT_S, **options: Any) -> aioredis.Redis:
    """The asyncio form of `sync_client`."""
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=concurrency + SPARE, timeout=wait_s,
                                                    **options)
    return aioredis.Redis(connection_pool=pool)
