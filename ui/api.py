"""The small HTTP API served beside the admin (/api/v1): status, runs, adapters, one chat reply."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from personabot.core.schemas import ChatRequest, ChatResult, Message, SamplingParams
from personabot.core.store import isoformat
from personabot.ui.context import AdminContext
from personabot.ui.status_tab import collect_status
from personabot.workers.client import ChatClient

# Chats waiting at once on this route; more get 429 at once instead of tying up the admin process.
API_CHATS_AT_ONCE = 16


class ChatBody(BaseModel):
    messages: list[Message] = Field(min_length=1)
    adapter: str = "active"
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    timeout_s: float = Field(120.0, gt=0, le=600)


def _run_dict(run: Any) -> dict[str, Any]:
    return {"id": run.id, "status": run.status, "trigger": run.trigger, "params": run.params,
            "progress": run.progress, "metrics": run.metrics, "error": run.error, "adapter_id": run.adapter_id,
            "created_at": isoformat(run.created_at), "started_at": isoformat(run.started_at),
            "finished_at": isoformat(run.finished_at)}


def build_api(ctx: AdminContext) -> APIRouter:
    """Routes under /api/v1; the login guard in `ui.app` protects them like every page."""
    router = APIRouter(prefix="/api/v1")
    waiting = {"chats": 0}
    aredis: list[Any] = []

    @router.get("/status")
    def status() -> dict[str, Any]:
        return collect_status(ctx)

    @router.get("/runs")
    def runs(limit: int = 20) -> list[dict[str, Any]]:
        return [_run_dict(run) for run in ctx.store.list_runs(limit=min(max(limit, 1), 200))]

    @router.get("/adapters")
    def adapters() -> list[dict[str, Any]]:
        return [{"id": a.id, "name": a.name, "active": a.active, "eval_passed": a.eval_passed,
                 "eval_reason": a.eval_reason, "eval_scores": a.eval_scores, "data_hash": a.data_hash,
                 "size_bytes": a.size_bytes, "created_at": isoformat(a.created_at)}
                for a in ctx.store.list_adapters()]

    @router.post("/chat")
    async def chat(body: ChatBody) -> ChatResult:
        """Enqueue one chat request and wait for its final reply (read without holding a thread)."""
        if waiting["chats"] >= API_CHATS_AT_ONCE:
            raise HTTPException(status_code=429, detail=f"{API_CHATS_AT_ONCE} API chats are already waiting; "
                                "retry when one has finished", headers={"Retry-After": "5"})
        request = ChatRequest(messages=body.messages, adapter=body.adapter, sampling=body.sampling,
                              source="api")
        if not aredis:
            import redis.asyncio as aioredis

            aredis.append(aioredis.Redis.from_url(ctx.redis_url, socket_connect_timeout=3))
        waiting["chats"] += 1
        try:
            client = ChatClient(ctx.redis, ctx.celery, aredis=aredis[0])
            return await asyncio.wait_for(client.aask(request, timeout_s=body.timeout_s), body.timeout_s + 5)
        except TimeoutError as error:
            raise HTTPException(status_code=504, detail=str(error) or "no reply in time") from None
        finally:
            waiting["chats"] -= 1

    return router
