"""API-key checks (`Authorization: Bearer pb-...`) and the per-key request rate limit in Redis."""

from __future__ import annotations

import asyncio
import time

import anyio
import redis.asyncio as aioredis

from personabot.api.errors import APIError
from personabot.core import keys
from personabot.core.store import Store
from personabot.core.store_keys import ApiKey

FAILED_AUTH_DELAY_S = 0.5  # a wrong key costs the guesser this long


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def authenticate(store: Store, authorization: str | None) -> ApiKey:
    """The live key named by the header; 401 otherwise (the message never echoes the key)."""
    token = bearer_token(authorization)
    if token is None:
        raise APIError(401, "missing API key: send `Authorization: Bearer <key>`; an admin creates keys "
                       "in the admin's API keys tab or with `personabot keys create NAME`",
                       code="missing_api_key")
    key = await anyio.to_thread.run_sync(store.find_api_key, token)
    if key is None:
        await asyncio.sleep(FAILED_AUTH_DELAY_S)
        raise APIError(401, "invalid or revoked API key; ask an admin for a valid key",
                       code="invalid_api_key")
    return key


async def check_rate(client: aioredis.Redis, key: ApiKey, default_per_minute: int) -> None:
    """A fixed one-minute window per key; over the limit -> 429 with Retry-After."""
    limit = key.rate_limit_per_minute or default_per_minute
    now = time.time()
    window = int(now // 60)
    counter = f"{keys.API_RATE}{key.id}:{window}"
    pipe = client.pipeline()
    pipe.incr(counter)
    pipe.expire(counter, 120)
    count, _ = await pipe.execute()
    if int(count) > limit:
        retry = max(1, int(60 - now % 60) + 1)
        raise APIError(429, f"rate limit of {limit} requests per minute reached for key {key.prefix}…; "
                       f"retry in {retry}s or ask an admin for a higher limit", code="rate_limit_exceeded",
                       headers={"Retry-After": str(retry)})
