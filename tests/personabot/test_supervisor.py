"""The supervisor behind `personabot up`: prefixed logs, restarts with backoff, masked secrets."""

from __future__ import annotations

import io
import sys
import time

from personabot.supervisor import ChildSpec, Supervisor


def _wait_for(predicate, timeout: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_dead_child_is_restarted_and_reported() -> None:
    out = io.StringIO()
    crash = ChildSpec("crashy", [sys.executable, "-c", "print('hello'); raise SystemExit(3)"])
    sup = Supervisor([crash], out=out, max_backoff=1.0)
    sup.start()
    try:
        assert _wait_for(lambda: (sup.poll(), out.getvalue().count("started crashy") >= 2)[1])
    finally:
        sup.stop()
    log = out.getvalue()
    assert "[crashy] hello" in log
    assert "crashy exited with code 3; restarting in 1s" in log


def test_secrets_are_masked_and_stop_kills_the_group() -> None:
    out = io.StringIO()
    code = ("import subprocess, sys, time; print('token=123:ABC', flush=True); "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); time.sleep(600)")
    sup = Supervisor([ChildSpec("leaky", [sys.executable, "-c", code])], out=out, secrets=["123:ABC"])
    sup.start()
    assert _wait_for(lambda: "token=" in out.getvalue())
    import psutil

    parent = psutil.Process(sup.pids()[0])
    assert _wait_for(lambda: len(parent.children()) == 1)
    tree = [parent, *parent.children(recursive=True)]
    sup.stop(timeout=5)
    assert "token=***" in out.getvalue() and "123:ABC" not in out.getvalue()
    assert _wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree), 10)


def test_embedded_redis_refuses_a_port_someone_else_serves(redis_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import pytest

    from personabot.redis_server import RedisServer, RedisServerError

    second = RedisServer(tmp_path / "second", port=redis_server.port, persist=False)
    # Either ours fails to bind before the first ping, or the ping reaches the other server.
    with pytest.raises(RedisServerError, match=f"port {redis_server.port} (exited|is already served)"):
        second.start()
    second.stop()


def test_up_gives_each_part_only_its_secrets() -> None:
    from personabot.up import _without_secrets

    env = {"PERSONABOT_TELEGRAM_TOKEN": "t", "PERSONABOT_ADMIN_PASSWORD": "p", "PATH": "/bin"}
    assert _without_secrets(env, "chat") == {"PATH": "/bin"}
    assert _without_secrets(env, "bot") == {"PERSONABOT_TELEGRAM_TOKEN": "t", "PATH": "/bin"}
    assert _without_secrets(env, "ui") == {"PERSONABOT_ADMIN_PASSWORD": "p", "PATH": "/bin"}
