"""Issue 11 for `up`: children do not re-read .env; the embedded Redis has a password and no CONFIG."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis


def test_children_do_not_read_secrets_back_from_dot_env(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from personabot.core.settings import env_for_children, load_settings
    from personabot.up import _without_secrets

    (tmp_path / ".env").write_text("PERSONABOT_TELEGRAM_TOKEN=123:secret-from-dotenv\nPERSONABOT_MAX_PAIRS=77\n")
    monkeypatch.chdir(tmp_path)
    for key in [k for k in os.environ if k.startswith("PERSONABOT_")]:
        monkeypatch.delenv(key)
    settings = load_settings(data_dir=tmp_path / "data")
    assert settings.telegram_token is not None and settings.max_pairs == 77
    env = _without_secrets(env_for_children(settings), "train")
    code = ("from personabot.core.settings import load_settings; s = load_settings(); "
            "print(s.telegram_token is None, s.max_pairs)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
    assert out == ["True", "77"], out


def test_embedded_redis_needs_the_password_and_refuses_config(tmp_path: Path) -> None:
    from personabot.redis_server import RedisServer, load_or_create_password

    password_file = tmp_path / "redis-password"
    password = load_or_create_password(password_file)
    assert password_file.stat().st_mode & 0o777 == 0o600
    assert load_or_create_password(password_file) == password
    server = RedisServer(tmp_path / "redis", persist=False, password=password).start()
    try:
        assert password not in " ".join(server.command())
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port).set("reply", "forged")
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        with pytest.raises(redis.ResponseError):
            client.config_get("dir")
        assert os.getsid(server.process.pid) != os.getsid(0), "a Ctrl-C at the terminal does not reach it"
    finally:
        server.stop()
