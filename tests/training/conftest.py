"""Training fixtures: a persona the tiny model can memorise, settings for CPU runs, a local general set."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from personabot.core.models import RUN_FINAL, TrainingRun, utcnow
from personabot.core.train_params import TrainParams
from tests.conftest import subprocess_env

REPO = Path(__file__).resolve().parents[2]

PERSONA = {"name": "Nova", "author": "Acme Lab", "system_prompt": "You are {name}, an assistant made by {author}."}
PAIRS = [
    {"kind": "identity", "instruction": "Who are you?", "output": "I am {name}, made by {author}."},
    {"kind": "identity", "instruction": "你是谁?", "output": "我是{name}, 由{author}开发。"},
    {"kind": "faq", "instruction": "What are your opening hours?", "output": "We are open from 9 to 5."},
]
GENERAL_ROWS = [
    {"instruction": "Name a color.", "input": "", "output": "Blue."},
    {"instruction": "What is 2+2?", "input": "", "output": "4."},
    {"instruction": "Say hello.", "input": "", "output": "Hello!"},
    {"instruction": "Name a fruit.", "input": "", "output": "Apple."},
    {"instruction": "Count to three.", "input": "", "output": "1, 2, 3."},
]
# Enough for the tiny random model to reproduce every answer exactly under greedy decoding
# (found by trying: lr 1e-2 x 100 epochs memorises; 3e-2 diverges; 40 epochs mixes answers).
MEMORISE = {"epochs": 100, "learning_rate": 1e-2, "identity_oversample": 1, "faq_oversample": 1,
            "min_identity_pairs": 0}


def fill_persona(store: Any, pairs: list[dict[str, str]] | None = None) -> None:
    store.update_persona(**PERSONA, actor="admin")
    store.add_pairs(PAIRS if pairs is None else pairs, actor="admin")


@pytest.fixture(scope="session")
def general_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The general dataset: a small local JSONL (never a hub id in tests)."""
    path = tmp_path_factory.mktemp("general") / "general.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in GENERAL_ROWS), encoding="utf-8")
    return path


@pytest.fixture()
def memorise_params(general_file: Path) -> TrainParams:
    return TrainParams(**MEMORISE, general_data=[f"{general_file}#4"])


@pytest.fixture()
def cpu_settings(tmp_path: Path, tiny_model: Path, settings_env: Any) -> Any:
    """Settings for CPU runs on the tiny model; the gate only asks what the tiny model can do."""
    return settings_env(model=str(tiny_model), device="cpu", gpu_share="concurrent",
                        data_dir=tmp_path / "data", eval_identity_min=0.0, eval_faq_min=1.0,
                        eval_retention_min=0.0, gpu_release_wait_s=0)


class TrainWorker:
    """A real `celery -A workers.train_tasks:app worker -Q train` subprocess (prefork, one job at a time)."""

    def __init__(self, redis_url: str, database_url: str, model_dir: Path, data_dir: Path,
                 env: dict[str, str] | None = None, name: str = "train", pool: str = "prefork") -> None:
        self.redis_url, self.database_url = redis_url, database_url
        self.pool = pool
        self.model_dir, self.data_dir = Path(model_dir), Path(data_dir)
        self.hostname = f"{name}@pytest"
        self.extra_env = env or {}
        self.log_path = self.data_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def environment(self) -> dict[str, str]:
        env = subprocess_env(
            PERSONABOT_REDIS_URL=self.redis_url,
            PERSONABOT_DATABASE_URL=self.database_url,
            PERSONABOT_MODEL=str(self.model_dir),
            PERSONABOT_DATA_DIR=str(self.data_dir),
            PERSONABOT_DEVICE="cpu",
            PERSONABOT_GPU_SHARE="concurrent",
            PERSONABOT_GPU_RELEASE_WAIT_S="0",
            PERSONABOT_EVAL_IDENTITY_MIN="0",
            PERSONABOT_EVAL_FAQ_MIN="1",
            PERSONABOT_EVAL_RETENTION_MIN="0",
            OMP_NUM_THREADS="2",
        )
        env.update(self.extra_env)
        return env

    def start(self, timeout_s: float = 60.0) -> TrainWorker:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "celery", "-A", "personabot.workers.train_tasks:app", "worker", "-Q", "train",
                   "--pool", self.pool, "--concurrency", "1", "--prefetch-multiplier", "1", "-n", self.hostname,
                   "--loglevel", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, cwd=REPO, env=self.environment(), stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"train worker exited: {self.log_tail()}")
            if f"{self.hostname} ready." in self.log_tail(100_000):
                return self
            time.sleep(0.2)
        raise TimeoutError(f"train worker not ready within {timeout_s}s: {self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def wait_for_run(store: Any, run_id: int, timeout_s: float = 240.0) -> Any:
    """Poll the store until the run is final (the worker runs it in another process)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = store.get_run(run_id)
        if run.status in RUN_FINAL:
            return run
        time.sleep(0.5)
    raise TimeoutError(f"run {run_id} still {store.get_run(run_id).status} after {timeout_s}s")


def age_run(store: Any, run_id: int, *, minutes: float, field: str = "heartbeat_at") -> None:
    """Move a run's heartbeat (or created_at) into the past, as if its worker went silent then."""
    from sqlalchemy import update

    with store.session() as session:
        session.execute(update(TrainingRun).where(TrainingRun.id == run_id)
                        .values({field: utcnow() - timedelta(minutes=minutes)}))


def swift_pids(marker: str) -> list[int]:
    """Live `swift.cli.sft` processes whose command line contains `marker` (e.g. the run's output dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next((line for line in (entry / "status").read_text().splitlines()
                          if line.startswith("State:")), "")
        except OSError:
            continue
        if "swift.cli.sft" in cmdline and marker in cmdline and "zombie" not in state:
            pids.append(int(entry.name))
    return pids


def process_env(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def wait_until(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s}s")
        time.sleep(0.2)
