"""Shared fixtures: a private Redis, the tiny model, stores on SQLite and PostgreSQL, settings."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# Never reach a hub from tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MODELSCOPE_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def subprocess_env(**settings: str) -> dict[str, str]:
    """Environment for a worker subprocess: no PERSONABOT_* from outside, offline hubs, this repo
    importable, then `settings` (e.g. PERSONABOT_REDIS_URL=...)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONABOT_")}
    env.update({
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "MODELSCOPE_OFFLINE": "1",
        "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        **settings,
    })
    return env


PG_ADMIN_URL = os.environ.get("PERSONABOT_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    path = Path(__file__).resolve().parent.parent / "test-artifacts"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen2 model directory, built once per test session."""
    from personabot.training.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2")


@pytest.fixture()
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:  # noqa: F821
    """A real redis-server of our own on a free port; the test may stop and restart it."""
    from personabot.redis_server import RedisServer

    server = RedisServer(tmp_path / "redis", persist=False).start()
    yield server
    server.stop()


@pytest.fixture()
def redis_client(redis_server):  # type: ignore[no-untyped-def]
    import redis

    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def _pg_available() -> str | None:
    try:
        import sqlalchemy

        engine = sqlalchemy.create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("select 1"))
        engine.dispose()
        return None
    except Exception as error:  # noqa: BLE001 - any failure means "not available"
        return f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database for this session, dropped at the end."""
    import sqlalchemy

    reason = _pg_available()
    if reason:
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 not reachable ({reason}); store tests ran on SQLite only")
    name = f"pb_test_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each test using this runs twice: on a SQLite file and on a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    import sqlalchemy

    base = request.getfixturevalue("pg_database")
    schema = f"s_{uuid.uuid4().hex[:10]}"
    engine = sqlalchemy.create_engine(base, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE SCHEMA "{schema}"'))
    yield f"{base}?options=-csearch_path%3D{schema}"
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f'DROP SCHEMA "{schema}" CASCADE'))
    engine.dispose()


@pytest.fixture()
def store(db_url: str):  # type: ignore[no-untyped-def]
    from personabot.core.store import Store

    s = Store(db_url)
    yield s
    s.close()


@pytest.fixture()
def sqlite_store(tmp_path: Path):  # type: ignore[no-untyped-def]
    from personabot.core.store import Store

    s = Store(f"sqlite:///{tmp_path / 'store.db'}")
    yield s
    s.close()


@pytest.fixture()
def settings_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Point PERSONABOT_* at a temp data dir; returns a function to build Settings."""
    from personabot.core.settings import load_settings, reset_settings

    for key in list(os.environ):
        if key.startswith("PERSONABOT_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("PERSONABOT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    reset_settings()
    yield load_settings
    reset_settings()
