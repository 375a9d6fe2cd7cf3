"""`personabot up` starts the API beside the chat worker; the API gets no secret; a key made by the CLI works."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from openai import OpenAI

from personabot.redis_server import free_port
from personabot.up import _without_secrets
from tests.conftest import subprocess_env

pytestmark = pytest.mark.slow


def test_the_api_part_gets_no_secret() -> None:
    env = {"PERSONABOT_TELEGRAM_TOKEN": "t", "PERSONABOT_ADMIN_PASSWORD": "p", "PATH": "/bin"}
    assert _without_secrets(env, "api") == {"PATH": "/bin"}


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(log.read_text()[-3000:])


def test_up_serves_the_openai_api(tmp_path: Path, tiny_model: Path) -> None:
    api_port = free_port()
    env = subprocess_env(PERSONABOT_DATA_DIR=str(tmp_path / "data"), PERSONABOT_EMBEDDED_REDIS_PORT=str(free_port()),
                         PERSONABOT_API_PORT=str(api_port), PERSONABOT_ADMIN_PASSWORD="up-admin-secret",
                         PERSONABOT_DEVICE="cpu", PERSONABOT_MAX_BATCH="2", PYTHONUNBUFFERED="1",
                         OMP_NUM_THREADS="1")
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "personabot.cli", "up", "--model", str(tiny_model),
                                 "--no-train", "--no-beat", "--no-ui"], cwd=tmp_path, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_port(api_port, proc, log)
        api_child = next(p for p in psutil.Process(proc.pid).children(recursive=True)
                         if p.cmdline()[-1:] == ["api"])
        assert "PERSONABOT_ADMIN_PASSWORD" not in api_child.environ()
        created = subprocess.run([sys.executable, "-m", "personabot.cli", "keys", "create", "up-test"], cwd=tmp_path,
                                 env=env, capture_output=True, text=True, timeout=120)
        secret = created.stdout.strip().splitlines()[-1]
        client = OpenAI(base_url=f"http://127.0.0.1:{api_port}/v1", api_key=secret, max_retries=0, timeout=120)
        deadline = time.monotonic() + 120
        while True:  # the chat worker loads the model after `up` has started it
            try:
                reply = client.chat.completions.create(model="persona", messages=[{"role": "user", "content": "Hi"}],
                                                       max_tokens=5)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        assert reply.usage.completion_tokens >= 1 and reply.system_fingerprint == "base"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    text = log.read_text()
    assert "[up] stopped" in text and "up-admin-secret" not in text
    assert "api" in text.split("[up] starting:")[1].split(";")[0]
