"""Fixtures for the admin UI: a real uvicorn server on 127.0.0.1 with its own Redis and store."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ADMIN_USER = "admin"
ADMIN_PASSWORD = "correct horse battery staple"


@dataclass
class AdminServer:
    url: str
    user: str
    password: str
    ctx: object
    settings: object
    redis_url: str

    def login(self) -> httpx.Client:
        client = httpx.Client(base_url=self.url, timeout=30)
        response = client.post("/login", data={"username": self.user, "password": self.password})
        response.raise_for_status()
        return client


class _Server(threading.Thread):
    def __init__(self, app: object, port: int) -> None:
        import uvicorn

        super().__init__(daemon=True)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                    lifespan="on"))

    def run(self) -> None:
        self.server.run()

    def wait_started(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.is_alive():
                raise RuntimeError("the admin server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.join(timeout=10)


def start_admin(data_dir: Path, redis_url: str, **overrides: object) -> tuple[AdminServer, _Server]:
    from personabot.core.settings import load_settings
    from personabot.redis_server import free_port
    from personabot.ui.app import create_app, make_context
    from personabot.ui.auth import ensure_admin_auth

    port = free_port()
    settings = load_settings(data_dir=data_dir, redis_url=redis_url, admin_user=ADMIN_USER,
                             admin_password=ADMIN_PASSWORD, ui_host="127.0.0.1", ui_port=port, **overrides)
    ctx = make_context(settings)
    app = create_app(ctx, ensure_admin_auth(settings, ctx.store))
    thread = _Server(app, port)
    thread.start()
    thread.wait_started()
    return AdminServer(f"http://127.0.0.1:{port}", ADMIN_USER, ADMIN_PASSWORD, ctx, settings, redis_url), thread


@pytest.fixture(scope="module")
def module_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from personabot.redis_server import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis"), persist=False).start()
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def admin_server(tmp_path_factory: pytest.TempPathFactory, module_redis: str) -> Iterator[AdminServer]:
    """The admin app served by uvicorn on a free port, password from settings."""
    server, thread = start_admin(tmp_path_factory.mktemp("ui-data"), module_redis)
    yield server
    thread.stop()
    server.ctx.close()  # type: ignore[attr-defined]
