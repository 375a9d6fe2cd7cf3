"""Status tab: workers online, queue lengths, the running job, GPU memory, bot status, recent errors."""

from __future__ import annotations

import datetime as dt
from typing import Any

import gradio as gr
import pandas as pd

from personabot.core.events import AdapterRefused, AdapterSwapped, WorkerOnline, recent
from personabot.core.store import isoformat
from personabot.ui.context import LIVE_ERRORS, AdminContext, notice
from personabot.workers.app import CHAT_QUEUE, TRAIN_QUEUE

WORKER_COLUMNS = ["worker", "queues", "last seen", "gpu memory", "details"]
ERROR_COLUMNS = ["when", "what", "error"]
PING_TIMEOUT_S = 1.0
EVENTS_SCANNED = 500


def _when(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _gpu_text(data: dict[str, Any]) -> str:
    """GPU memory from a worker's `worker.online` event (used/total MB, or GiB in use)."""
    used, total = data.get("gpu_memory_used_mb"), data.get("gpu_memory_total_mb")
    if used is not None and total is not None:
        reuse = f", KV reuse keeps {data['prefix_chats']} chats" if data.get("prefix_chats") else ""
        return f"{used / 1024:.1f} / {total / 1024:.1f} GiB{reuse}"
    if data.get("gpu_mem_gb") is not None:
        return f"{float(data['gpu_mem_gb']):.1f} GiB"
    return "no GPU reported"


def collect_status(ctx: AdminContext) -> dict[str, Any]:
    """One snapshot of the system for the Status tab and GET /api/v1/status (JSON-safe)."""
    status: dict[str, Any] = {"workers": [], "queues": {}, "running": None, "bot": None, "errors": [],
                              "problems": []}
    run = ctx.store.current_run()
    if run is not None:
        status["running"] = {"id": run.id, "status": run.status, "trigger": run.trigger,
                             "progress": run.progress, "started_at": isoformat(run.started_at),
                             "worker": run.worker}
    for failed in ctx.store.list_runs(limit=30):
        if failed.status in ("failed", "rejected") and failed.error:
            status["errors"].append({"when": isoformat(failed.finished_at or failed.created_at),
                                     "what": f"training run {failed.id} {failed.status}", "error": failed.error})
    try:
        _collect_live(ctx, status)
    except LIVE_ERRORS as error:
        status["problems"].append(f"Redis or the workers cannot be reached: {error}")
    status["errors"].sort(key=lambda item: item["when"], reverse=True)
    return status


def _collect_live(ctx: AdminContext, status: dict[str, Any]) -> None:
    client = ctx.redis
    status["queues"] = {CHAT_QUEUE: client.llen(CHAT_QUEUE), TRAIN_QUEUE: client.llen(TRAIN_QUEUE)}
    online: dict[str, dict[str, Any]] = {}
    serving: dict[str, str] = {}
    for event in recent(client, count=EVENTS_SCANNED):  # newest first
        name = str(event.data.get("worker") or event.data.get("hostname") or "")
        if event.type == WorkerOnline.TYPE and name and name not in online:
            online[name] = {"at": event.at, **event.data}
        elif event.type == AdapterSwapped.TYPE and name and name not in serving:
            serving[name] = str(event.data.get("version") or "base model")
        elif event.type == AdapterRefused.TYPE:
            status["errors"].append({"when": _when(event.at), "what": f"adapter refused by {name or 'a worker'}",
                                     "error": f"{event.data.get('version')}: {event.data.get('reason')}"})
    for name, version in serving.items():
        info = online.setdefault(name, {})
        info.pop("adapter", None)  # what it loaded at start; `serving` is what it serves now
        info["serving"] = version
    replies = ctx.celery.control.inspect(timeout=PING_TIMEOUT_S).active_queues() or {}
    for hostname, queues in sorted(replies.items()):
        info = online.pop(hostname, {})
        status["workers"].append({"worker": hostname, "online": True, "queues": sorted(q["name"] for q in queues),
                                  "last_seen": _when(info["at"]) if "at" in info else "",
                                  "gpu": _gpu_text(info) if info else "", "details": info})
    for name, info in online.items():
        if "bot" in (info.get("kind"), info.get("role")):
            status["bot"] = {"name": name, "last_seen": _when(info["at"]) if "at" in info else "", "details": info}
        elif "at" in info:
            status["workers"].append({"worker": name, "online": False, "queues": [],
                                      "last_seen": _when(info["at"]), "gpu": _gpu_text(info), "details": info})


class StatusTab:
    """The Status tab; refreshes itself every few seconds."""

    def __init__(self, ctx: AdminContext, refresh_s: float = 5.0) -> None:
        self.ctx = ctx
        self.refresh_s = refresh_s

    def refresh(self) -> tuple[str, pd.DataFrame, pd.DataFrame]:
        status = collect_status(self.ctx)
        lines = []
        if status["queues"]:
            lines.append(" · ".join(f"queue {name}: {length} waiting" for name, length in status["queues"].items()))
        running = status["running"]
        if running:
            progress = running["progress"] or {}
            step, total = progress.get("step"), progress.get("max_steps")
            where = f", step {step}/{total}" if step is not None and total else ""
            gpu = f", GPU {progress['gpu_mem_gb']:.1f} GiB" if progress.get("gpu_mem_gb") is not None else ""
            lines.append(f"training run {running['id']} {running['status']} on {running['worker'] or '—'}"
                         f" ({progress.get('phase', 'waiting')}{where}{gpu})")
        else:
            lines.append("no training run is queued or running")
        bot = status["bot"]
        lines.append(f"bot {bot['name']}: last seen {bot['last_seen']}" if bot else "bot: no heartbeat seen")
        lines.append(f"{sum(1 for w in status['workers'] if w['online'])} workers online")
        summary = "\n\n".join(lines) + "".join(notice(p, ok=False) for p in status["problems"])
        workers = pd.DataFrame(
            [[w["worker"] + ("" if w["online"] else " (offline)"), ", ".join(w["queues"]), w["last_seen"],
              w["gpu"], ", ".join(f"{k}={v}" for k, v in w["details"].items()
                                  if k not in ("at", "worker", "hostname"))]
             for w in status["workers"]], columns=WORKER_COLUMNS)
        errors = pd.DataFrame([[e["when"], e["what"], e["error"]] for e in status["errors"][:20]],
                              columns=ERROR_COLUMNS)
        return summary, workers, errors

    def on_load(self) -> tuple[str, pd.DataFrame, pd.DataFrame]:
        return self.refresh()

    def build(self) -> list[Any]:
        summary = gr.Markdown(elem_id="status-summary")
        workers = gr.Dataframe(headers=WORKER_COLUMNS, interactive=False, wrap=True, label="Workers",
                               column_widths=["20%", "10%", "17%", "13%", "40%"], elem_id="status-workers")
        errors = gr.Dataframe(headers=ERROR_COLUMNS, interactive=False, wrap=True, label="Recent errors",
                              elem_id="status-errors")
        refresh = gr.Button("Refresh", elem_id="status-refresh")
        timer = gr.Timer(self.refresh_s)
        outputs = [summary, workers, errors]
        refresh.click(self.refresh, None, outputs, api_name="status")
        timer.tick(self.refresh, None, outputs, api_visibility="private", show_progress="hidden")
        return outputs
