"""API keys in the store (SQLite and PostgreSQL), the `personabot keys` CLI and the admin's API keys tab."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from personabot.core.store import NotFoundError, Store, StoreError
from personabot.core.store_keys import hash_key
from tests.conftest import REPO, subprocess_env


def test_keys_are_stored_hashed_listed_by_prefix_and_revoked(store: Store) -> None:
    key, secret = store.create_api_key("open-webui", rate_limit_per_minute=5, actor="alice")
    assert secret.startswith("pb-") and len(secret) > 40 and key.prefix == secret[:11]
    with store.session() as s:
        rows = s.execute(text("SELECT * FROM api_keys")).mappings().all()
    assert secret not in str(rows) and rows[0]["key_hash"] == hash_key(secret)
    assert store.find_api_key(secret).id == key.id
    assert store.find_api_key(secret + "x") is None and store.find_api_key("sk-" + secret) is None
    store.add_api_key_usage(key.id, prompt_tokens=10, completion_tokens=3)
    store.add_api_key_usage(key.id, prompt_tokens=1, completion_tokens=1)
    listed = store.list_api_keys()[0]
    assert (listed.requests, listed.prompt_tokens, listed.completion_tokens) == (2, 11, 4)
    assert store.revoke_api_key(key.prefix, actor="alice").revoked_at is not None
    assert store.find_api_key(secret) is None
    with pytest.raises(StoreError, match="already revoked"):
        store.revoke_api_key(key.id)
    with pytest.raises(NotFoundError, match="keys list"):
        store.revoke_api_key(999)
    with pytest.raises(StoreError, match="name"):
        store.create_api_key("  ")
    actions = [e.action for e in store.list_audit()]
    assert "api_key.create" in actions and "api_key.revoke" in actions
    assert secret not in str([e.detail for e in store.list_audit()])


def test_migration_adds_the_table_to_a_version_1_database(tmp_path: Path) -> None:
    from personabot.core import store as store_module

    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = Store(url, migrate=False)
    with old.engine.begin() as conn:
        tables = [t for t in store_module.Base.metadata.sorted_tables if t.name != "api_keys"]
        store_module.Base.metadata.create_all(conn, tables=tables)  # what version 1 created
        conn.execute(store_module.SchemaVersion.__table__.insert().values(version=1))
    old.close()
    upgraded = Store(url)
    with upgraded.session() as s:
        assert s.execute(text("SELECT count(*) FROM api_keys")).scalar() == 0
    assert upgraded.schema_version() == store_module.SCHEMA_VERSION
    assert upgraded.create_api_key("after-upgrade")[0].id == 1
    upgraded.close()


def _cli(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "personabot.cli", "keys", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=120, env=subprocess_env(PERSONABOT_DATABASE_URL=db_url))


def test_cli_creates_lists_and_revokes(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'cli.db'}"
    created = _cli(db_url, "create", "ide-plugin", "--rate-limit", "30")
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip().splitlines()[-1]
    assert secret.startswith("pb-")
    listed = _cli(db_url, "list")
    assert secret[:11] in listed.stdout and secret not in listed.stdout and "30/min" in listed.stdout
    assert _cli(db_url, "revoke", secret[:11]).returncode == 0
    again = _cli(db_url, "revoke", "1")
    assert again.returncode == 1 and "already revoked" in again.stderr
    assert "revoked" in _cli(db_url, "list").stdout
    assert "needs a name" in _cli(db_url, "create").stderr


@pytest.fixture()
def admin(tmp_path: Path) -> Iterator[Any]:
    from personabot.redis_server import RedisServer
    from tests.ui.conftest import start_admin

    redis_server = RedisServer(tmp_path / "redis", persist=False).start()
    server, thread = start_admin(tmp_path / "data", redis_server.url)
    yield server
    thread.stop()
    server.ctx.close()
    redis_server.stop()


def test_admin_tab_creates_shows_once_lists_and_revokes(admin: Any) -> None:
    from gradio_client import Client

    client = Client(admin.url, auth=(admin.user, admin.password), verbose=False)
    note, shown, table, _choices = client.predict("playground", 12, api_name="/create_api_key")
    secret = shown["value"]  # a gr.update: the secret, made visible once
    assert "created" in note and secret.startswith("pb-") and shown["visible"] is True
    store = admin.ctx.store
    key = store.find_api_key(secret)
    assert key is not None and key.rate_limit_per_minute == 12
    assert secret not in str(table) and f"{secret[:11]}…" in str(table)
    assert any(e.action == "api_key.create" and e.actor == "admin:admin" for e in store.list_audit())
    note, secret_box, table, _choices = client.predict(key.id, api_name="/revoke_api_key")
    assert "revoked" in note and secret_box["value"] == "" and store.find_api_key(secret) is None
    note, *_ = client.predict("", None, api_name="/create_api_key")
    assert "needs a name" in note
