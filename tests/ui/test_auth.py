"""The admin login: generated password shown once and stored only as a hash; settings password wins."""

from __future__ import annotations

import io
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from personabot.ui.auth import (
    PASSWORD_HASH_KEY,
    AdminAuth,
    AuthError,
    ensure_admin_auth,
    hash_password,
    verify_password,
)

REPO = Path(__file__).resolve().parents[2]


def test_hash_round_trip_and_salt() -> None:
    first, second = hash_password("s3cret"), hash_password("s3cret")
    assert first != second, "each hash gets its own salt"
    assert verify_password("s3cret", first) and verify_password("s3cret", second)
    assert not verify_password("s3cret ", first)


def test_unreadable_hash_says_how_to_reset() -> None:
    with pytest.raises(AuthError, match="PERSONABOT_ADMIN_PASSWORD"):
        verify_password("x", "md5$abc")


def test_first_start_generates_prints_once_and_stores_only_the_hash(
    settings_env, sqlite_store, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_env()
    out = io.StringIO()
    with caplog.at_level(logging.DEBUG):
        auth = ensure_admin_auth(settings, sqlite_store, out=out)
    printed = out.getvalue()
    password = printed.split("password: ", 1)[1].split()[0]
    assert len(password) >= 20
    stored = sqlite_store.get_config(PASSWORD_HASH_KEY)
    assert stored and password not in stored and stored.startswith("scrypt$")
    assert password not in caplog.text
    assert all(password not in str(entry.detail) for entry in sqlite_store.list_audit())
    assert auth.check("admin", password)
    assert not auth.check("admin", password + "x")
    assert not auth.check("root", password)

    again = io.StringIO()
    second = ensure_admin_auth(settings, sqlite_store, out=again)
    assert again.getvalue() == "", "the password is printed only on the first start"
    assert second.check("admin", password)


def test_password_from_settings_wins(settings_env, sqlite_store) -> None:
    settings = settings_env(admin_password="from-env-password", admin_user="boss")
    out = io.StringIO()
    auth = ensure_admin_auth(settings, sqlite_store, out=out)
    assert out.getvalue() == ""
    assert sqlite_store.get_config(PASSWORD_HASH_KEY) is None
    assert auth.check("boss", "from-env-password")
    assert not auth.check("admin", "from-env-password")
    assert "from-env-password" not in repr(auth)


def test_auth_needs_a_secret() -> None:
    with pytest.raises(AuthError):
        AdminAuth("admin")


def _start_ui(env: dict[str, str], port: int) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, "-m", "personabot.cli", "ui"], env=env, cwd=REPO, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"personabot ui exited: {process.stderr.read()[-2000:]}")  # type: ignore[union-attr]
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return process
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise TimeoutError("personabot ui did not listen within 90 s")


def _stop_ui(process: subprocess.Popen[str]) -> tuple[str, str]:
    process.send_signal(signal.SIGINT)
    try:
        return process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.communicate()


@pytest.mark.slow
def test_personabot_ui_prints_the_generated_password_once(tmp_path) -> None:
    from personabot.redis_server import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONABOT_")}
    env.update(PERSONABOT_DATA_DIR=str(tmp_path / "data"), PERSONABOT_UI_PORT=str(port),
               PERSONABOT_REDIS_URL="redis://127.0.0.1:1/0", PYTHONPATH=str(REPO))

    first = _start_ui(env, port)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            assert client.get("/config").status_code == 401
            lines = [first.stdout.readline() for _ in range(6)]  # type: ignore[union-attr]
            password = next(line for line in lines if "password: " in line).split("password: ", 1)[1].strip()
            assert client.post("/login", data={"username": "admin", "password": password}).status_code == 200
            assert client.get("/config").status_code == 200
    finally:
        out, err = _stop_ui(first)
    assert password not in err and password not in out

    second = _start_ui(env, port)
    out, err = _stop_ui(second)
    assert "password:" not in out and password not in err
