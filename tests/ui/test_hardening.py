"""Issue 11 over real HTTP: uploads confined, login throttled and trimmed, headers, cookies, sessions."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from tests.ui.conftest import start_admin


def _call(client: httpx.Client, api: str, data: list) -> str:
    event = client.post(f"/gradio_api/call/{api}", json={"data": data})
    event.raise_for_status()
    stream = client.get(f"/gradio_api/call/{api}/{event.json()['event_id']}")
    return stream.text


def test_import_reads_only_files_uploaded_through_gradio(admin_server, tmp_path: Path) -> None:
    outside = tmp_path / "server-secret.json"
    outside.write_text(json.dumps([{"instruction": "leaked?", "output": "top secret value"}]))
    client = admin_server.login()
    try:
        text = _call(client, "check_import", [{"path": str(outside), "meta": {"_type": "gradio.FileData"}},
                                              "faq", False])
        assert "ready to import" not in text and "top secret" not in text, text
        assert "not uploaded" in text, text
        upload = client.post("/gradio_api/upload", files={"files": ("ok.json", outside.read_bytes())})
        uploaded = upload.json()[0]
        text = _call(client, "check_import", [{"path": uploaded, "meta": {"_type": "gradio.FileData"}},
                                              "faq", False])
        assert "1 pairs ready" in text, text
    finally:
        client.close()


def test_security_headers_cookie_and_no_cors(admin_server) -> None:
    with httpx.Client(base_url=admin_server.url, timeout=30) as client:
        response = client.post("/login", data={"username": admin_server.user, "password": admin_server.password},
                               headers={"Origin": "http://evil.example", "Host": "personabot.example"})
        cookies = response.headers.get_list("set-cookie")
        assert cookies and all("samesite=none" not in c.lower() for c in cookies), cookies
        assert all("samesite=lax" in c.lower() for c in cookies), cookies
        page = client.get("/", headers={"Origin": "http://evil.example", "Host": "personabot.example"})
        assert "access-control-allow-origin" not in page.headers
        assert "access-control-allow-credentials" not in page.headers
        csp = page.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "img-src 'self'" in csp
        assert page.headers["x-frame-options"] == "DENY"
        assert client.get("/logout").status_code == 405  # an <img src="/logout"> signs nobody out
        assert client.get("/config").status_code == 200


def test_login_refuses_a_name_with_spaces(admin_server) -> None:
    with httpx.Client(base_url=admin_server.url, timeout=30) as client:
        response = client.post("/login", data={"username": f"  {admin_server.user}  ",
                                                "password": admin_server.password})
        assert response.status_code == 401
        assert client.get("/config").status_code == 401
        basic = client.get("/api/v1/status", auth=(f" {admin_server.user} ", admin_server.password))
        assert basic.status_code == 401


@pytest.fixture
def fresh_admin(tmp_path: Path, module_redis: str):  # type: ignore[no-untyped-def]
    server, thread = start_admin(tmp_path / "data", module_redis, admin_session_hours=2 / 3600)
    yield server
    thread.stop()
    server.ctx.close()  # type: ignore[attr-defined]


def test_failed_logins_are_throttled_then_refused_with_retry_after(fresh_admin) -> None:
    with httpx.Client(base_url=fresh_admin.url, timeout=30) as client:
        statuses = [client.post("/login", data={"username": fresh_admin.user, "password": f"guess{i}"}).status_code
                    for i in range(6)]
        assert statuses[:5] == [400] * 5 and statuses[5] == 429, statuses
        blocked = client.post("/login", data={"username": fresh_admin.user, "password": fresh_admin.password})
        assert blocked.status_code == 429 and int(blocked.headers["retry-after"]) >= 1
        assert client.get("/api/v1/status", auth=(fresh_admin.user, fresh_admin.password)).status_code == 401


def test_sessions_expire_after_the_setting(fresh_admin) -> None:
    client = fresh_admin.login()
    try:
        assert client.get("/config").status_code == 200
        time.sleep(2.5)
        assert client.get("/config").status_code == 401
    finally:
        client.close()


def test_verified_credentials_are_cached_and_hashing_is_bounded() -> None:
    from personabot.ui.auth import HASHING_AT_ONCE, AdminAuth, hash_password

    auth = AdminAuth("admin", password_hash=hash_password("pw"))
    assert auth.check("admin", "pw")
    start = time.perf_counter()
    for _ in range(50):
        assert auth.check("admin", "pw")
    assert time.perf_counter() - start < 0.5
    assert HASHING_AT_ONCE <= 4
    assert not auth.check("admin", "nope")


def test_waiting_api_chats_do_not_starve_the_admin(admin_server) -> None:
    import asyncio

    from personabot.ui.api import API_CHATS_AT_ONCE

    async def scenario() -> tuple[list[int], float]:
        async with httpx.AsyncClient(base_url=admin_server.url, timeout=60) as client:
            login = await client.post("/login", data={"username": admin_server.user,
                                                      "password": admin_server.password})
            login.raise_for_status()
            body = {"messages": [{"role": "user", "content": "hi"}], "timeout_s": 6}
            chats = [asyncio.create_task(client.post("/api/v1/chat", json=body)) for _ in range(40)]
            await asyncio.sleep(1.5)
            start = time.perf_counter()
            config = await client.get("/config")
            took = time.perf_counter() - start
            assert config.status_code == 200
            statuses = [r.status_code for r in await asyncio.gather(*chats)]
            return statuses, took

    statuses, took = asyncio.run(scenario())
    assert took < 2.0, f"GET /config took {took:.1f} s while API chats waited"
    assert statuses.count(429) == 40 - API_CHATS_AT_ONCE and statuses.count(504) == API_CHATS_AT_ONCE, statuses


def test_old_exports_are_removed(tmp_path: Path) -> None:
    import os

    from personabot.ui.persona_tab import EXPORT_KEEP_S, remove_old_exports

    old, new = tmp_path / "export-old", tmp_path / "export-new"
    for folder in (old, new):
        folder.mkdir()
        (folder / "pairs.csv").write_text("x")
    past = time.time() - EXPORT_KEEP_S - 10
    os.utime(old, (past, past))
    remove_old_exports(tmp_path)
    assert not old.exists() and new.exists()


def test_global_failure_limit_slows_every_client_after_a_spread_out_attack() -> None:
    from personabot.ui.guard import LoginThrottle

    throttle = LoginThrottle(per_client=5, global_limit=10)
    for i in range(9):  # nine clients, one failure each: nobody is over their own limit
        throttle.failed(f"10.0.0.{i}")
    assert throttle.retry_after("10.0.0.99") == 0
    throttle.failed("10.0.0.9")
    assert 0 < throttle.retry_after("10.0.0.99") <= 1.0  # a client that never failed waits too
    assert throttle.retry_after("10.0.0.0") > 0


def test_personabot_ui_keeps_uploads_private_in_the_data_dir_and_caps_their_size(module_redis, tmp_path: Path) -> None:
    """`personabot ui` as started by `up`: Gradio's upload copies go under the data dir (not /tmp/gradio),
    readable by the service's user only, and an upload over PERSONABOT_MAX_IMPORT_BYTES is refused."""
    import os
    import subprocess
    import sys

    from personabot.core.processes import stop_process
    from personabot.redis_server import free_port
    from tests.ui.conftest import ADMIN_PASSWORD, ADMIN_USER

    port, data = free_port(), tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PERSONABOT_", "GRADIO_"))}
    env.update(PERSONABOT_DATA_DIR=str(data), PERSONABOT_REDIS_URL=module_redis, PERSONABOT_UI_PORT=str(port),
               PERSONABOT_ADMIN_USER=ADMIN_USER, PERSONABOT_ADMIN_PASSWORD=ADMIN_PASSWORD,
               PERSONABOT_MAX_IMPORT_BYTES="4000", PERSONABOT_RETRAIN_CRON="")
    log = tmp_path / "ui.log"
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "personabot.cli", "ui"], env=env, stdout=out,
                                   stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(url + "/login", timeout=2)
                break
            except httpx.HTTPError:
                assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.3)
        with httpx.Client(base_url=url, timeout=30) as client:
            client.post("/login", data={"username": ADMIN_USER, "password": ADMIN_PASSWORD}).raise_for_status()
            small = json.dumps([{"instruction": "hi", "output": "hello"}]).encode()
            upload = client.post("/gradio_api/upload", files={"files": ("pairs.json", small)})
            upload.raise_for_status()
            stored = Path(upload.json()[0]).resolve()
            assert stored.is_relative_to((data / "gradio-tmp").resolve()), stored
            assert stored.stat().st_mode & 0o077 == 0, oct(stored.stat().st_mode)
            big = client.post("/gradio_api/upload", files={"files": ("big.json", b"[" + b" " * 5000 + b"]")})
            assert big.status_code == 413, (big.status_code, big.text[:300])
    finally:
        stop_process(process)
