"""The Celery half of bench/serve_bench.py: the same model behind redis-server and a chat worker."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch


def prompt(n: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(10, 1000, (n,), generator=generator).tolist()


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def measure_celery_path(work: Path, model_dir: Path, log_path: Path, tiny: bool, scale: float) -> dict[str, Any]:
    """Serve the saved model through redis-server + a real Celery chat worker and measure from the client."""
    import redis

    from personabot.core.events import WorkerOnline, recent
    from personabot.core.processes import stop_process
    from personabot.core.schemas import ChatRequest, Message, SamplingParams
    from personabot.core.store import Store
    from personabot.redis_server import RedisServer
    from personabot.workers.app import make_celery
    from personabot.workers.client import ChatClient

    server = RedisServer(work / "redis", persist=False).start()
    db_url = f"sqlite:///{work / 'store.db'}"
    store = Store(db_url)
    adapter = store.find_adapter("a") or store.add_adapter(
        name="a", path=str(work / "adapter-a"), base_model=str(model_dir), data_hash="", eval_scores={},
        eval_passed=True)
    store.set_active(adapter.id)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONABOT_")}
    env.update({"PERSONABOT_REDIS_URL": server.url, "PERSONABOT_DATABASE_URL": db_url,
                "PERSONABOT_MODEL": str(model_dir), "PERSONABOT_DATA_DIR": str(work / "data"),
                "PERSONABOT_MAX_BATCH": "32", "PERSONABOT_CONTEXT_TOKENS": "2048",
                "PERSONABOT_DEVICE": "cpu" if tiny else "cuda", "PERSONABOT_RETRAIN_CRON": "",
                "PYTHONPATH": str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")})
    client = redis.Redis.from_url(server.url)
    with open(log_path, "wb") as log:
        worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "personabot.workers.chat_tasks:app",
                                   "worker", "-Q", "chat", "--pool", "threads", "--concurrency", "32",
                                   "--prefetch-multiplier", "1",
                                   "-n", "bench@gpu", "--without-gossip", "--without-mingle", "--without-heartbeat",
                                   "--loglevel", "WARNING"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                  cwd=Path(__file__).resolve().parents[1], start_new_session=True)
    chat = ChatClient(client, make_celery(server.url))

    def words(n: int, seed: int) -> str:
        return " ".join(f"t{t}" for t in prompt(n, seed))

    def ask(seed: int, prompt_words: int, new: int) -> dict[str, Any]:
        request = ChatRequest(messages=[Message(role="user", content=words(prompt_words, seed))],
                              sampling=SamplingParams(temperature=0, max_new_tokens=new, repetition_penalty=1.0,
                                                       min_new_tokens=new))
        sent = time.monotonic()
        chat.submit(request)
        first = None
        for update in chat.stream(request.request_id, timeout_s=300):
            if update.delta and first is None:
                first = time.monotonic()
            if update.result is not None:
                result = update.result
        return {"ttft": (first or time.monotonic()) - sent, "tokens": result.completion_tokens,
                "finish": result.finish_reason, "end": time.monotonic(), "start": sent, "error": result.error}

    def wave(streams: int, prompt_words: int, new: int, seed: int) -> dict[str, Any]:
        results: list[dict[str, Any]] = []
        threads = [threading.Thread(target=lambda i=i: results.append(ask(seed + i, prompt_words, new)))
                   for i in range(streams)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.monotonic() - started
        ttfts = [r["ttft"] for r in results]
        return {"streams": streams, "prompt_words": prompt_words, "new_tokens": new, "seconds": round(wall, 3),
                "tok_s": round(sum(r["tokens"] for r in results) / wall, 1),
                "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1), "ttft_p95_ms": round(1000 * p95(ttfts), 1),
                "failed": sum(1 for r in results if r["finish"] != "length" or r["error"]),
                "short": sum(1 for r in results if r["tokens"] != new)}

    def measure() -> dict[str, Any]:
        deadline = time.monotonic() + 240
        online = False
        while time.monotonic() < deadline and not online:
            online = any(e.type == WorkerOnline.TYPE for e in recent(client, 1000))
            if worker.poll() is not None:
                raise RuntimeError("celery worker exited: " + log_path.read_text()[-2000:])
            time.sleep(0.5)
        if not online:
            raise TimeoutError("celery worker not online")
        new = max(8, int(256 * scale))
        for streams in (1, 2, 4, 8, 16, 32):
            wave(streams, 100, 32 if not tiny else 4, seed=500 + streams)
        wave(32, 480, 16, seed=700)
        wave(1, 100, new, seed=900)  # the measured lengths' graphs, as the bare engine's warm-up does
        wave(32, 100, new, seed=901)
        return {"one_stream": wave(1, 100, new, seed=1), "32_streams": wave(32, 100, new, seed=100),
                "32_streams_500_prompt": wave(32, 480, max(8, int(128 * scale)), seed=300)}

    try:
        return measure()
    finally:
        stop_process(worker)
        client.close()
        server.stop()
        store.close()
