"""Chat-worker fixtures: real peft adapters on the tiny model and real `celery worker` subprocesses.

Reuse from other test folders (the bot, the end-to-end training test) by importing:

    from tests.workers.conftest import make_adapter, ChatWorker

`ChatWorker(redis_url, database_url, model_dir, data_dir, name="chat1").start()` runs
`celery -A workers.chat_tasks:app worker -Q chat --pool threads` against that Redis and database
with the tiny model, waits until the worker has loaded the model and the store's active adapter
(its `worker.online` event), and `stop()`/`kill()` end it (`kill()` is kill -9). Its log is
`data_dir/<name>.log`. Adapters it serves must lie in its store, `data_dir/adapters/<version>` (paths
outside the store are refused). The fixture `chat_worker` gives a factory that stops every worker it
started at the end of the test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import subprocess_env

REPO = Path(__file__).resolve().parents[2]


def make_adapter(model_dir: Path, out_dir: Path, *, rank: int = 4, alpha: int = 8, seed: int = 0,
                 std: float = 0.5, target_modules: Any = "all-linear") -> Path:
    """Save a real peft LoRA for `model_dir` with random B (so it changes outputs)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                                  target_modules=target_modules))
    with torch.no_grad():
        for name, tensor in peft_model.named_parameters():
            if "lora_B" in name:
                tensor.normal_(std=std)
    peft_model.save_pretrained(out_dir)
    return Path(out_dir)


class ChatWorker:
    """A real chat worker subprocess (Celery, threads pool) on the tiny model."""

    def __init__(self, redis_url: str, database_url: str, model_dir: Path, data_dir: Path, *,
                 name: str = "chat", concurrency: int = 4, env: dict[str, str] | None = None) -> None:
        self.redis_url, self.database_url = redis_url, database_url
        self.model_dir, self.data_dir = Path(model_dir), Path(data_dir)
        self.name, self.concurrency = name, concurrency
        self.extra_env = env or {}
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.data_dir / f"{name}.log"

    @property
    def hostname(self) -> str:
        return f"{self.name}@pytest"

    def environment(self) -> dict[str, str]:
        env = subprocess_env(
            PERSONABOT_REDIS_URL=self.redis_url,
            PERSONABOT_DATABASE_URL=self.database_url,
            PERSONABOT_MODEL=str(self.model_dir),
            PERSONABOT_DATA_DIR=str(self.data_dir),
            PERSONABOT_MAX_BATCH=str(self.concurrency),
            PERSONABOT_CONTEXT_TOKENS="512",
            PERSONABOT_DEVICE="cpu",
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
        )
        env.update(self.extra_env)
        return env

    def start(self, timeout_s: float = 120.0) -> ChatWorker:
        import redis

        self.data_dir.mkdir(parents=True, exist_ok=True)
        client = redis.Redis.from_url(self.redis_url)
        since = client.xrevrange("personabot:event-log", count=1)
        last_id = since[0][0] if since else b"0-0"
        command = [sys.executable, "-m", "celery", "-A", "personabot.workers.chat_tasks:app", "worker",
                   "-Q", "chat", "--pool", "threads", "--concurrency", str(self.concurrency),
                   "--prefetch-multiplier", "1", "-n", self.hostname, "--loglevel", "INFO",
                   "--without-gossip", "--without-mingle", "--without-heartbeat"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, cwd=REPO, env=self.environment(), stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"chat worker {self.name} exited: {self.log_tail()}")
                for entry_id, fields in client.xrange("personabot:event-log", min=b"(" + last_id):
                    last_id = entry_id
                    if b'"worker.online"' in fields[b"event"] and self.hostname.encode() in fields[b"event"]:
                        return self
                time.sleep(0.2)
            raise TimeoutError(f"chat worker {self.name} not online within {timeout_s}s: {self.log_tail()}")
        finally:
            client.close()

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def kill(self) -> None:
        """kill -9: the worker dies mid-reply, its unacked task stays in Redis."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()


@pytest.fixture(scope="session")
def tiny_adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rank-4 all-linear LoRA on the tiny model (random B)."""
    return make_adapter(tiny_model, tmp_path_factory.mktemp("adapters") / "v1", seed=1)


@pytest.fixture(scope="session")
def tiny_adapter_2(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, different LoRA on the tiny model (rank 8, attention only)."""
    return make_adapter(tiny_model, tmp_path_factory.mktemp("adapters") / "v2", rank=8, seed=2,
                        target_modules=["q_proj", "v_proj", "o_proj"])


@pytest.fixture()
def chat_worker() -> Iterator[Any]:
    """Factory: chat_worker(redis_url, database_url, model_dir, data_dir, **kw) -> started ChatWorker."""
    started: list[ChatWorker] = []

    def factory(*args: Any, **kwargs: Any) -> ChatWorker:
        worker = ChatWorker(*args, **kwargs)
        started.append(worker)
        return worker.start()

    yield factory
    for worker in started:
        worker.stop()
