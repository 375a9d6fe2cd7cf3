"""`personabot up`: Redis (embedded unless configured) plus every built part, on one machine."""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

from personabot.core.settings import Settings, env_for_children
from personabot.supervisor import ChildSpec, Supervisor

# Part name -> argv after the python executable
PARTS: dict[str, list[str]] = {
    "chat": ["-m", "personabot.cli", "worker", "chat"],
    "train": ["-m", "personabot.cli", "worker", "train"],
    "beat": ["-m", "personabot.cli", "beat"],
    "ui": ["-m", "personabot.cli", "ui"],
    "bot": ["-m", "personabot.cli", "bot"],
    "api": ["-m", "personabot.cli", "api"],
}


def describe_model(settings: Settings) -> str:
    """One paragraph on which model will be used and how to point at another."""
    model = settings.model
    if Path(model).expanduser().is_dir():
        return f"model: local directory {Path(model).expanduser().resolve()}"
    hub = "Hugging Face" if settings.use_hf or os.environ.get("USE_HF") == "1" else "ModelScope"
    gpu = shutil.which("nvidia-smi") is not None
    text = f"model: {model} (downloaded from {hub} by the chat worker on first use)"
    if not gpu:
        text += (
            "\n  no NVIDIA GPU found: a 7B model on CPU answers very slowly. Point at a local model with"
            "\n  `personabot up --model PATH` (or PERSONABOT_MODEL); to try it offline:"
            "\n  `personabot make-tiny-model data/tiny && personabot up --model data/tiny`"
        )
    return text


def plan(settings: Settings, *, skip: set[str]) -> tuple[list[str], list[str]]:
    """Which parts start, and which are skipped with why."""
    start, notes = [], []
    for name in PARTS:
        if name in skip:
            notes.append(f"{name}: skipped (--no-{name})")
        elif name == "bot" and settings.telegram_token is None:
            notes.append("bot: not started (set PERSONABOT_TELEGRAM_TOKEN to start it)")
        else:
            start.append(name)
    return start, notes


def run_up(settings: Settings, *, skip: frozenset[str] | set[str] = frozenset(), out: Any = None) -> int:
    from personabot.core.store import Store
    from personabot.redis_server import RedisServer

    out = out or sys.stdout
    os.umask(0o077)  # the database, Redis's AOF, logs and uploads are for the service's user only
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    settings.adapters_path.mkdir(parents=True, exist_ok=True)
    Store(settings.db_url).close()  # apply migrations once before the children start

    redis_server = None
    if not settings.redis_url:
        from personabot.redis_server import RedisServerError, free_port, load_or_create_password

        redis_dir = settings.data_dir / "redis"
        redis_server = RedisServer(redis_dir, port=settings.embedded_redis_port, persist=True,
                                   password=load_or_create_password(settings.data_dir / "redis-password"))
        try:
            redis_server.start()
        except RedisServerError as error:
            raise RedisServerError(
                f"{error}; is port {settings.embedded_redis_port} taken (another `personabot up`)? "
                f"Set PERSONABOT_EMBEDDED_REDIS_PORT (e.g. {free_port()}) or PERSONABOT_REDIS_URL"
            ) from None
        settings = settings.model_copy(update={"redis_url": redis_server.url})
        print(f"[up] embedded redis-server on {_mask_url(redis_server.url)} (password in "
              f"{settings.data_dir / 'redis-password'}; data in {settings.data_dir / 'redis'})",
              file=out, flush=True)
    else:
        print(f"[up] using Redis at {_mask_url(settings.redis_url)}", file=out, flush=True)
    print(f"[up] {describe_model(settings)}", file=out, flush=True)
    print(f"[up] database: {_mask_url(settings.db_url)}", file=out, flush=True)

    names, notes = plan(settings, skip=set(skip))
    for note in notes:
        print(f"[up] {note}", file=out, flush=True)
    env = env_for_children(settings)
    env["PYTHONUNBUFFERED"] = "1"
    specs = [ChildSpec(name, [sys.executable, *PARTS[name]], env=_without_secrets(env, name))
             for name in names]
    secrets = [s.get_secret_value() for s in (settings.telegram_token, settings.admin_password) if s]
    if redis_server is not None and redis_server.password:
        secrets.append(redis_server.password)
    supervisor = Supervisor(specs, out=out, secrets=secrets)

    def _on_signal(signum: int, _frame: Any) -> None:
        supervisor.request_stop()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"[up] starting: {', '.join(names) or 'nothing but Redis'}; Ctrl-C stops everything",
              file=out, flush=True)
        supervisor.run_forever()
    finally:
        supervisor.stop()
        if redis_server is not None:
            redis_server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print("[up] stopped", file=out, flush=True)
    return 0


# Each part gets only the secrets it uses.
_SECRETS_FOR = {"bot": {"PERSONABOT_TELEGRAM_TOKEN"}, "ui": {"PERSONABOT_ADMIN_PASSWORD"}}


def _without_secrets(env: dict[str, str], part: str) -> dict[str, str]:
    keep = _SECRETS_FOR.get(part, set())
    secrets = {"PERSONABOT_TELEGRAM_TOKEN", "PERSONABOT_ADMIN_PASSWORD"} - keep
    return {key: value for key, value in env.items() if key not in secrets}


def _mask_url(url: str) -> str:
    """Hide a password in a URL (redis://:secret@host -> redis://:***@host)."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"
