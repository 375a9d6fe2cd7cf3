"""Prometheus metrics of the whole service, exposed by the API process (one collector, prometheus-client).

The API process measures its own requests (counts, tokens in and out, time to first token, time
between tokens). On each scrape it also reads what the chat workers publish to Redis (queue depth,
running rows, engine counters, GPU memory) and the store's state (active adapter, runs by status),
so one scrape target covers the chat workers, the API and training; the bot exposes nothing of its own.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from personabot.core import keys
from personabot.core.models import RUN_STATUSES, TrainingRun
from personabot.core.store import Store

HOLDERS_PATTERN = keys.GPU_HOLDERS + "*"
CHAT_QUEUE = "chat"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ENGINE_COUNTERS = {"tokens": "generated tokens", "prefill_tokens": "prompt tokens prefilled",
                   "prefix_hit_tokens": "prompt tokens taken from the KV reuse pool instead of prefilled",
                   "finished": "finished generations", "swaps": "adapter swaps",
                   "adapter_loads": "adapters loaded", "merges": "adapter merges into weight copies"}


def live_chat_workers(client: redis.Redis) -> list[str]:
    """Chat workers whose GPU holder entry (refreshed every second, 15 s lease) has not lapsed."""
    now, live = time.time(), []
    for key in client.scan_iter(match=HOLDERS_PATTERN, count=100):
        for worker, raw in client.hgetall(key).items():
            try:
                if float(json.loads(raw)["until"]) > now:
                    live.append(worker.decode())
            except (ValueError, TypeError, KeyError):
                continue
    return live


class ApiMetrics:
    """The API's own instruments, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("personabot_api_requests", "API requests by route, model and HTTP status",
                                ["route", "model", "status"], registry=self.registry)
        self.prompt_tokens = Counter("personabot_api_prompt_tokens", "Prompt tokens of API completions",
                                     registry=self.registry)
        self.completion_tokens = Counter("personabot_api_completion_tokens",
                                         "Completion tokens of API completions", registry=self.registry)
        self.ttft = Histogram("personabot_api_time_to_first_token_seconds",
                              "From request received to the first token, as the API sees it",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.inter_token = Histogram("personabot_api_inter_token_seconds",
                                     "Time between two streamed pieces of a reply, divided by the tokens it carried",
                                     buckets=LATENCY_BUCKETS, registry=self.registry)
        self.cancelled = Counter("personabot_api_disconnects", "Streams cancelled because the client left",
                                 registry=self.registry)

    def add_service_collector(self, client: redis.Redis, store: Store, max_batch: int) -> None:
        self.registry.register(ServiceCollector(client, store, max_batch))


class ServiceCollector(Collector):
    """Read at scrape time: chat-worker state from Redis, adapter and run state from the store."""

    def __init__(self, client: redis.Redis, store: Store, max_batch: int) -> None:
        self.client, self.store, self.max_batch = client, store, max_batch

    def collect(self) -> Iterator[Any]:
        yield from self._workers()
        yield from self._store()

    def _workers(self) -> Iterator[Any]:
        queue = GaugeMetricFamily("personabot_chat_queue_depth", "Chat requests waiting in the Celery chat queue")
        queue.add_metric([], float(self.client.llen(CHAT_QUEUE)))
        yield queue
        live = GaugeMetricFamily("personabot_chat_workers_live", "Chat workers with a live heartbeat")
        live.add_metric([], float(len(live_chat_workers(self.client))))
        yield live
        running = GaugeMetricFamily("personabot_chat_running_rows", "Batch rows generating (at the last reply)",
                                    labels=["worker"])
        waiting = GaugeMetricFamily("personabot_chat_waiting", "Requests waiting for a batch row", labels=["worker"])
        kv = GaugeMetricFamily("personabot_chat_kv_rows_used_ratio",
                               "Share of the KV cache's batch rows in use (running / PERSONABOT_MAX_BATCH)",
                               labels=["worker"])
        gpu = GaugeMetricFamily("personabot_chat_gpu_memory_used_bytes", "GPU memory in use on the worker's device",
                                labels=["worker"])
        counters = {name: CounterMetricFamily(f"personabot_chat_{name}", f"Chat worker: {text}", labels=["worker"])
                    for name, text in ENGINE_COUNTERS.items()}
        for worker, raw in self.client.hgetall(keys.CHAT_WORKERS).items():
            try:
                stats = json.loads(raw)
            except ValueError:
                continue
            name = worker.decode()
            running.add_metric([name], float(stats.get("running", 0)))
            waiting.add_metric([name], float(stats.get("waiting", 0)))
            rows = stats.get("max_batch") or self.max_batch or 1  # the worker's own size (it may be sized from its GPU)
            kv.add_metric([name], float(stats.get("running", 0)) / rows)
            if "gpu_memory_used_mb" in stats:
                gpu.add_metric([name], float(stats["gpu_memory_used_mb"]) * 2**20)
            for key, family in counters.items():
                family.add_metric([name], float(stats.get(key, 0)))
        yield from (running, waiting, kv, gpu, *counters.values())

    def _store(self) -> Iterator[Any]:
        active = GaugeMetricFamily("personabot_adapter_active", "1 for the active adapter version (base = none)",
                                   labels=["version"])
        adapter = self.store.active_adapter()
        active.add_metric([adapter.name if adapter else "base"], 1.0)
        yield active
        runs = GaugeMetricFamily("personabot_training_runs", "Training runs by status", labels=["status"])
        counts = dict.fromkeys(RUN_STATUSES, 0)
        with self.store.session() as s:
            for status, count in s.execute(select(TrainingRun.status, func.count()).group_by(TrainingRun.status)):
                counts[status] = int(count)
        for status, count in sorted(counts.items()):
            runs.add_metric([status], float(count))
        yield runs
