"""API fixtures: a real Redis, a SQLite store with two adapter versions, a real chat worker on the tiny
model, and the API process itself (`python -m personabot.cli api`) on a free port."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from personabot.core.store import Store
from personabot.redis_server import RedisServer, free_port
from tests.conftest import REPO, subprocess_env
from tests.workers.conftest import ChatWorker, make_adapter

CONTEXT_TOKENS = 512


class ApiProcess:
    """`personabot api` as a subprocess; its log is data_dir/api.log."""

    def __init__(self, env: dict[str, str], data_dir: Path) -> None:
        self.env, self.port = env, int(env["PERSONABOT_API_PORT"])
        self.log_path = data_dir / "api.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout_s: float = 60.0) -> ApiProcess:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "personabot.cli", "api"], cwd=REPO, env=self.env,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the API exited: {self.log_path.read_text()[-3000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.5).close()
                return self
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"the API did not listen within {timeout_s}s: {self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def api_env(redis_url: str, db_url: str, model: Path, data_dir: Path, **extra: str) -> dict[str, str]:
    return subprocess_env(PERSONABOT_REDIS_URL=redis_url, PERSONABOT_DATABASE_URL=db_url,
                          PERSONABOT_MODEL=str(model), PERSONABOT_DATA_DIR=str(data_dir),
                          PERSONABOT_API_PORT=str(free_port()), PERSONABOT_CONTEXT_TOKENS=str(CONTEXT_TOKENS),
                          PERSONABOT_MAX_BATCH="4", **extra)


@pytest.fixture(scope="package")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Everything running: {"url", "key", "store", "redis", "worker", "api", "v1", "v2", ...}."""
    from personabot.training.tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("api")
    # Wider and deeper than the shared tiny model, so that a long reply takes long enough (seconds on a
    # CPU) for a disconnect to land in the middle of it.
    tiny_model = make_tiny_model(root / "model", hidden_size=384, layers=6, intermediate_size=1024)
    server = RedisServer(root / "redis", persist=False).start()
    db_url = f"sqlite:///{root / 'store.db'}"
    data_dir = root / "data"
    store = Store(db_url)
    adapter_store = data_dir / "adapters"
    make_adapter(tiny_model, adapter_store / "v1", seed=1)
    make_adapter(tiny_model, adapter_store / "v2", rank=8, seed=2, target_modules=["q_proj", "v_proj", "o_proj"])
    v1 = store.add_adapter(name="v1", path="v1", base_model=str(tiny_model), data_hash="", eval_scores={},
                           eval_passed=True)
    v2 = store.add_adapter(name="v2", path="v2", base_model=str(tiny_model), data_hash="", eval_scores={},
                           eval_passed=True)
    store.set_active(v1.id)
    store.update_persona(name="Nova", author="Acme", system_prompt="You are {name}, made by {author}.")
    key, secret = store.create_api_key("tests", rate_limit_per_minute=10_000)
    worker = ChatWorker(server.url, db_url, tiny_model, data_dir, name="apichat", concurrency=4,
                        env={"PERSONABOT_CONTEXT_TOKENS": str(CONTEXT_TOKENS)}).start()
    process = ApiProcess(api_env(server.url, db_url, tiny_model, data_dir), data_dir)
    client = redis.Redis.from_url(server.url)
    try:
        process.start()
        yield {"url": process.base_url, "key": secret, "key_row": key, "store": store, "redis": client,
               "worker": worker, "api": process, "v1": v1, "v2": v2, "model": tiny_model, "db_url": db_url,
               "redis_url": server.url, "data_dir": data_dir, "adapter_store": adapter_store}
    finally:
        process.stop()
        worker.stop()
        client.close()
        store.close()
        server.stop()


@pytest.fixture()
def openai_client(api: dict[str, Any]) -> Any:
    from openai import OpenAI

    client = OpenAI(base_url=api["url"], api_key=api["key"], max_retries=0, timeout=120)
    yield client
    client.close()
