"""The admin app: Gradio tabs behind one login, mounted in FastAPI beside a small HTTP API."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
from collections.abc import Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

import anyio
import gradio as gr
from fastapi import FastAPI
from starlette.requests import cookie_parser
from starlette.routing import Mount
from starlette.types import ASGIApp, Receive, Scope, Send

from personabot.core.settings import Settings, get_settings
from personabot.core.store import Store
from personabot.ui import adapters_tab, keys_tab, persona_tab, playground_tab, status_tab, training_tab
from personabot.ui.api import build_api
from personabot.ui.auth import AdminAuth, ensure_admin_auth
from personabot.ui.context import AdminContext
from personabot.ui.guard import LoginThrottle, SessionClock, harden_headers

log = logging.getLogger(__name__)

CSS = """
.pb-note { padding: 6px 10px; border-radius: 6px; margin: 4px 0; }
.pb-ok { background: #e8f5e9; color: #1b5e20; }
.pb-error { background: #fdecea; color: #8a1c13; white-space: pre-wrap; }
.pb-progress { width: 100%; height: 18px; }
"""

LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>personabot admin · sign in</title>
<style>
body { font-family: system-ui, sans-serif; background: #f4f4f6; display: flex; height: 100vh;
       align-items: center; justify-content: center; margin: 0; }
form { background: white; padding: 32px; border-radius: 10px; box-shadow: 0 2px 12px #0002;
        display: flex; flex-direction: column; gap: 12px; width: 300px; }
input { padding: 8px; font-size: 15px; } button { padding: 9px; font-size: 15px; cursor: pointer; }
#error { color: #8a1c13; min-height: 1em; }
</style></head>
<body><form id="login">
<h2>personabot admin</h2>
<input name="username" id="username" placeholder="user" autocomplete="username" required>
<input name="password" id="password" type="password" placeholder="password"
       autocomplete="current-password" required>
<button type="submit" id="signin">Sign in</button><div id="error"></div>
</form>
<script>
document.getElementById("login").addEventListener("submit", async (event) => {
  event.preventDefault();
  const body = new URLSearchParams(new FormData(event.target));
  const response = await fetch("login", {method: "POST", body, credentials: "same-origin"});
  if (response.ok) { window.location.reload(); }
  else { document.getElementById("error").textContent = "Wrong user or password."; }
});
</script></body></html>
"""

# (label, id, tab class): one module per tab; each tab builds itself and reads the store on load.
TABS = [
    ("Persona", "persona", persona_tab.PersonaTab),
    ("Training", "training", training_tab.TrainingTab),
    ("Adapters", "adapters", adapters_tab.AdaptersTab),
    ("Playground", "playground", playground_tab.PlaygroundTab),
    ("Status", "status", status_tab.StatusTab),
    ("API keys", "keys", keys_tab.KeysTab),
]
SIGN_OUT_JS = ("() => { fetch('logout', {method: 'POST', credentials: 'same-origin'})"
               ".finally(() => window.location.reload()); }")
PUBLIC_POST = {"/login", "/login/"}
CACHE_CLEANUP = (3600, 86400)  # every hour, delete uploads and exports older than a day
FAILED_LOGIN_DELAY_S = 1.0
LOGIN_BODY_LIMIT = 16384
LOGOUT = {"/logout", "/logout/"}


class LoginGuard:
    """ASGI middleware: nothing but the sign-in form and the login POST answers without a session.

    A session is Gradio's login cookie; API clients may instead send HTTP Basic credentials.
    """

    def __init__(self, app: ASGIApp, *, gradio_app: Callable[[], Any], auth: AdminAuth,
                 session_ttl_s: float = 12 * 3600, throttle: LoginThrottle | None = None) -> None:
        self.app = app
        self.gradio_app = gradio_app
        self.auth = auth
        self.login_page = LOGIN_PAGE.encode("utf-8")
        self.throttle = throttle or LoginThrottle()
        self.sessions = SessionClock(session_ttl_s)

    def _session_user(self, scope: Scope) -> str | None:
        headers = dict(scope.get("headers") or [])
        cookies = cookie_parser(headers.get(b"cookie", b"").decode("latin-1"))
        gradio_app = self.gradio_app()
        for name in (f"access-token-{gradio_app.cookie_id}", f"access-token-unsecure-{gradio_app.cookie_id}"):
            token = cookies.get(name)
            if token is not None and token in gradio_app.tokens and self.sessions.valid(token, gradio_app.tokens):
                return str(gradio_app.tokens[token])
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        if authorization.lower().startswith("basic "):
            client = _client(scope)
            if self.throttle.retry_after(client) > 0:
                return None
            try:
                user, _, password = base64.b64decode(authorization[6:]).decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError):
                user, password = "", ""
            if user and self.auth.check(user, password):
                self.throttle.succeeded(client)
                return user
            self.throttle.failed(client)
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        method = scope.get("method", "GET")
        if scope["type"] == "http":
            send = _hardened(send)
            if path in LOGOUT:
                if method != "POST":
                    await _respond(send, 405, b'{"detail":"sign out with POST /logout"}', b"application/json")
                    return
                scope = dict(scope, method="GET")  # Gradio's logout route answers GET
            elif method == "POST" and path in PUBLIC_POST:
                await self._login(scope, receive, send)
                return
        user = await anyio.to_thread.run_sync(self._session_user, scope)
        if user is not None:
            await self.app(scope, receive, send)
            return
        if any(name == b"authorization" for name, _ in scope.get("headers") or []):
            await asyncio.sleep(FAILED_LOGIN_DELAY_S)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 4401})
            return
        if method in ("GET", "HEAD") and path in ("", "/"):
            await _respond(send, 200, self.login_page, b"text/html; charset=utf-8")
            return
        await _respond(send, 401, b'{"detail":"Not authenticated: sign in at / (API clients: HTTP Basic)"}',
                       b"application/json")

    async def _login(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The login POST: throttled per client and overall; a name with spaces around it is refused."""
        client = _client(scope)
        wait = self.throttle.retry_after(client)
        if wait > 0:
            await _respond(send, 429, b'{"detail":"too many failed sign-ins; wait and try again"}',
                           b"application/json", extra=[(b"retry-after", str(int(wait) + 1).encode())])
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > LOGIN_BODY_LIMIT:
                await _respond(send, 413, b'{"detail":"login form too large"}', b"application/json")
                return
        username = parse_qs(body.decode("latin-1")).get("username", [""])[0]
        if username != username.strip():
            self.throttle.failed(client)
            await asyncio.sleep(FAILED_LOGIN_DELAY_S)
            await _respond(send, 401, b'{"detail":"Incorrect credentials."}', b"application/json")
            return
        replayed = False

        async def replay() -> MutableMapping[str, Any]:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def record(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                if message["status"] >= 400:
                    self.throttle.failed(client)
                    await asyncio.sleep(FAILED_LOGIN_DELAY_S)
                else:
                    self.throttle.succeeded(client)
            await send(message)

        await self.app(scope, replay, record)


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def _hardened(send: Send) -> Send:
    async def wrapped(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message = dict(message, headers=harden_headers(list(message.get("headers") or [])))
        await send(message)

    return wrapped


async def _respond(send: Send, status: int, body: bytes, content_type: bytes,
                   extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
               (b"cache-control", b"no-store"), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def build_blocks(ctx: AdminContext) -> gr.Blocks:
    """The admin page: one tab per module; every tab reads its state from the store on load."""
    with gr.Blocks(title="personabot admin", analytics_enabled=False, delete_cache=CACHE_CLEANUP) as blocks:
        with gr.Row(equal_height=True):
            gr.Markdown("## personabot admin")
            sign_out = gr.Button("Sign out", size="sm", scale=0, min_width=100, elem_id="sign-out")
            sign_out.click(None, js=SIGN_OUT_JS)
        loaded = []
        with gr.Tabs():
            for label, tab_id, tab_class in TABS:
                with gr.Tab(label, id=tab_id):
                    tab = tab_class(ctx)
                    loaded.append((tab, tab.build()))
        for tab, outputs in loaded:
            blocks.load(tab.on_load, None, outputs, api_visibility="private")
    blocks.queue(default_concurrency_limit=8)
    return blocks


def _gradio_app(outer: FastAPI) -> Any:
    for route in outer.routes:
        if isinstance(route, Mount) and hasattr(route.app, "tokens"):
            return route.app
    raise RuntimeError("the Gradio app is not mounted")


def create_app(ctx: AdminContext, auth: AdminAuth) -> FastAPI:
    """FastAPI app: /api/v1/* (HTTP API) and the Gradio admin at /, all behind the login guard."""
    app = FastAPI(title="personabot admin", docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(build_api(ctx))

    async def check_login(user: str, password: str) -> bool:
        return await anyio.to_thread.run_sync(auth.check, user, password)

    blocks = build_blocks(ctx)
    gr.mount_gradio_app(app, blocks, path="/", auth=check_login, footer_links=[], run_history=False,
                        show_error=True, css=CSS, ssr_mode=False, mcp_server=False,
                        server_name=ctx.settings.ui_host, server_port=ctx.settings.ui_port,
                        max_file_size=ctx.settings.max_import_bytes)
    # Gradio checks that incoming files were uploaded only when it "has launched"; mounted, it never
    # does, so a client-supplied FileData path would be read from anywhere on the host.
    blocks.has_launched = True
    app.add_middleware(LoginGuard, gradio_app=lambda: _gradio_app(app), auth=auth,
                       session_ttl_s=ctx.settings.admin_session_hours * 3600)
    return app


def make_context(settings: Settings) -> AdminContext:
    return AdminContext(settings=settings, store=Store.from_settings(settings))


def run_ui(settings: Settings | None = None) -> None:
    """Entry point of `personabot ui`: serve the admin on PERSONABOT_UI_HOST:PERSONABOT_UI_PORT."""
    import uvicorn

    settings = settings or get_settings()
    os.umask(0o077)
    gradio_tmp = settings.data_dir / "gradio-tmp"
    gradio_tmp.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("GRADIO_TEMP_DIR", str(gradio_tmp))
    ctx = make_context(settings)
    auth = ensure_admin_auth(settings, ctx.store)
    app = create_app(ctx, auth)
    log.info("admin UI on http://%s:%d", settings.ui_host, settings.ui_port)
    try:
        uvicorn.run(app, host=settings.ui_host, port=settings.ui_port, log_level="warning")
    finally:
        ctx.close()
