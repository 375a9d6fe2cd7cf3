"""compose.yaml: every part is there with health checks and GPU reservations; the CLI accepts it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_services_volumes_and_healthchecks() -> None:
    services = _compose()["services"]
    assert set(services) == {"redis", "postgres", "chat", "train", "beat", "ui", "bot", "api"}
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no healthcheck"
    assert "--appendonly" in services["redis"]["command"]
    for gpu_part in ("chat", "train"):
        devices = services[gpu_part]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    for part in ("chat", "train", "beat", "ui", "bot", "api"):
        assert {"data:/data", "models:/models"} <= set(services[part]["volumes"])
        assert services[part]["environment"]["PERSONABOT_REDIS_URL"] == "redis://redis:6379/0"
    assert set(_compose()["volumes"]) == {"data", "models", "redis", "postgres"}


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_docker_compose_config_accepts_it(tmp_path: Path) -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed; structure checked above")
    for name in ("compose.yaml", "Dockerfile"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copy(ROOT / ".env.example", tmp_path / ".env")
    result = subprocess.run([*cli, "-f", "compose.yaml", "config", "-q"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
