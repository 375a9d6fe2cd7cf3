"""The API process: a FastAPI app with /v1/models, /v1/chat/completions and /metrics, all behind API keys."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from personabot.api.auth import authenticate, check_rate
from personabot.api.completions import Completions
from personabot.api.errors import APIError, install_handlers
from personabot.api.metrics import ApiMetrics
from personabot.api.models import find_model, list_models
from personabot.api.schemas import parse_body
from personabot.core.redis_pool import async_client, sync_client
from personabot.core.settings import Settings, get_settings
from personabot.core.store import Store
from personabot.core.store_keys import ApiKey
from personabot.workers.app import make_celery
from personabot.workers.client import ChatClient

log = logging.getLogger(__name__)

STREAMS = 1024  # replies streamed at once before a new one waits for a Redis connection
MAX_BODY_BYTES = 4 * 2**20


class Service:
    """Connections of one API process, opened at start-up and closed at shutdown."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = Store.from_settings(settings)
        url = settings.effective_redis_url
        self.redis = sync_client(url, concurrency=64, socket_timeout=10, socket_connect_timeout=3)
        # Each streamed reply holds a connection while it waits for tokens: hundreds at once.
        self.aredis = async_client(url, concurrency=STREAMS, socket_connect_timeout=3)
        self.metrics = ApiMetrics()
        self.metrics.add_service_collector(self.redis, self.store, settings.max_batch)
        chat = ChatClient(self.redis, make_celery(url), aredis=self.aredis)
        self.completions = Completions(settings, self.store, chat, self.redis, self.metrics)

    async def close(self) -> None:
        await self.aredis.aclose()
        self.redis.close()
        self.store.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    service = Service(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if settings.metrics_enabled and settings.metrics_host:
            from prometheus_client import start_http_server

            start_http_server(settings.metrics_port, addr=settings.metrics_host, registry=service.metrics.registry)
            log.info("metrics on http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)
        yield
        await service.close()

    app = FastAPI(title="personabot OpenAI-compatible API", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.service = service
    install_handlers(app)

    async def api_key(request: Request) -> ApiKey:
        key = await authenticate(service.store, request.headers.get("authorization"))
        request.state.key = key
        return key

    async def limited_key(key: ApiKey = Depends(api_key)) -> ApiKey:  # noqa: B008 - FastAPI's idiom
        await check_rate(service.aredis, key, settings.api_rate_limit_per_minute)
        return key

    router = APIRouter(prefix="/v1")

    @router.get("/models")
    async def models(_key: ApiKey = Depends(limited_key)) -> dict[str, Any]:  # noqa: B008
        service.metrics.requests.labels("models", "", "200").inc()
        data = await anyio.to_thread.run_sync(list_models, service.store, settings.model)
        return {"object": "list", "data": data}

    @router.get("/models/{model_id:path}")
    async def model(model_id: str, _key: ApiKey = Depends(limited_key)) -> dict[str, Any]:  # noqa: B008
        return await anyio.to_thread.run_sync(find_model, service.store, settings.model, model_id)

    @router.post("/chat/completions")
    async def chat_completions(request: Request, key: ApiKey = Depends(limited_key)) -> Any:  # noqa: B008
        received = time.time()
        model_label = "?"
        status = 200
        try:
            if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
                raise APIError(413, f"the request body is larger than {MAX_BODY_BYTES // 2**20} MiB; send a shorter "
                               "conversation", param="messages", code="request_too_large")
            try:
                raw = await request.json()
            except ValueError:
                raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
            body = parse_body(raw)
            model_label = body.model if len(body.model) <= 100 else "?"
            return await service.completions.handle(body, key, request, received)
        except APIError as error:
            status = error.status
            raise
        finally:
            service.metrics.requests.labels("chat.completions", model_label, str(status)).inc()

    app.include_router(router)

    if settings.metrics_enabled and not settings.metrics_host:
        @app.get("/metrics")
        async def metrics(_key: ApiKey = Depends(api_key)) -> Response:  # noqa: B008
            text = await anyio.to_thread.run_sync(generate_latest, service.metrics.registry)
            return Response(text, media_type=CONTENT_TYPE_LATEST)

    return app


def run_api(settings: Settings | None = None) -> None:
    """Entry point of `personabot api`: serve on PERSONABOT_API_HOST:PERSONABOT_API_PORT."""
    import uvicorn

    settings = settings or get_settings()
    app = create_app(settings)
    log.info("OpenAI-compatible API on http://%s:%d/v1", settings.api_host, settings.api_port)
    uvicorn.run(app, host=settings.api_host, port=settings.api_port, log_level="warning")
