"""The `personabot` command: clear errors, `up` starts and stops cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import redis

from personabot.redis_server import free_port


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONABOT_")}
    env.update(PERSONABOT_DATA_DIR=str(tmp_path / "data"), PYTHONUNBUFFERED="1", **extra)
    return env


def _cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "personabot.cli", *args], cwd=tmp_path, env=_env(tmp_path, **env),
                          capture_output=True, text=True, timeout=120)


def test_core_imports_no_celery_gradio_ptb_or_torch() -> None:
    code = ("import sys, personabot.core.settings, personabot.core.store, personabot.core.pairs_io, "
            "personabot.core.schemas, personabot.core.streams, personabot.core.events, personabot.core.prompting, "
            "personabot.up, personabot.cli, personabot.supervisor\n"
            "bad = [m for m in ('celery', 'gradio', 'telegram', 'torch', 'transformers') if m in sys.modules]\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_bad_setting_stops_with_one_line(tmp_path: Path) -> None:
    result = _cli(tmp_path, "db", "status", PERSONABOT_REDIS_URL="localhost:6379")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "personabot: configuration error: PERSONABOT_REDIS_URL: Value error, must start with redis://, "
        "rediss:// or unix:// (or be empty)"]


def test_pairs_import_refuses_bad_file_and_keeps_store(tmp_path: Path) -> None:
    (tmp_path / "good.json").write_text('[{"instruction": "Who are you?", "output": "I am {name}."}]')
    (tmp_path / "bad.json").write_text('[{"instruction": "Hi", "output": "x"}, {"instruction": "", "output": "y"}]')
    assert _cli(tmp_path, "pairs", "import", "good.json").returncode == 0
    bad = _cli(tmp_path, "pairs", "import", "bad.json")
    assert bad.returncode == 1 and "row 2: instruction is missing or empty" in bad.stderr
    out = _cli(tmp_path, "pairs", "export", "out.csv", "--format", "csv")
    assert out.returncode == 0
    assert (tmp_path / "out.csv").read_text().splitlines()[1] == "Who are you?,,I am {name}.,identity,True"


def test_persona_set_refuses_over_long_system_prompt_and_keeps_store(tmp_path: Path) -> None:
    assert _cli(tmp_path, "persona", "set", "--name", "Ada", "--system-prompt", "short").returncode == 0
    refused = _cli(tmp_path, "persona", "set", "--system-prompt", "x" * 50, PERSONABOT_MAX_SYSTEM_PROMPT_CHARS="20")
    assert refused.returncode != 0
    assert "system prompt has 50 characters" in refused.stderr
    assert "PERSONABOT_MAX_SYSTEM_PROMPT_CHARS" in refused.stderr
    shown = _cli(tmp_path, "persona", "show")
    assert '"system_prompt": "short"' in shown.stdout and '"name": "Ada"' in shown.stdout
    long_name = _cli(tmp_path, "persona", "set", "--name", "n" * 201)
    assert long_name.returncode != 0 and "name has 201 characters" in long_name.stderr


def test_make_tiny_model_loads_with_transformers(tmp_path: Path) -> None:
    result = _cli(tmp_path, "make-tiny-model", "tiny")
    assert result.returncode == 0, result.stderr
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tiny")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny")
    assert model.config.model_type == "qwen2"
    prompt = tokenizer.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
                                           tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == model.config.eos_token_id


@pytest.mark.slow
def test_up_starts_every_built_part_and_stops_cleanly(tmp_path: Path, tiny_model: Path) -> None:
    port = free_port()
    env = _env(tmp_path, PERSONABOT_EMBEDDED_REDIS_PORT=str(port), PERSONABOT_UI_PORT=str(free_port()),
               PERSONABOT_API_PORT=str(free_port()), PERSONABOT_ADMIN_PASSWORD="test-admin-pw")
    log_path = tmp_path / "up.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "personabot.cli", "up", "--model", str(tiny_model)],
                                cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while "[up] starting:" not in log_path.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()
            time.sleep(0.2)
        password_file = tmp_path / "data" / "redis-password"
        assert password_file.stat().st_mode & 0o777 == 0o600
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()
        authed = redis.Redis(port=port, password=password_file.read_text().strip())
        assert authed.ping()
        with pytest.raises(redis.ResponseError):
            authed.config_get("dir")
        assert (tmp_path / "data" / "personabot.db").stat().st_mode & 0o077 == 0, "service files are private"
        started = log_path.read_text().split("[up] starting:")[1].split(";")[0]
        # Let every part come up (imports, model load) and make sure none died meanwhile.
        time.sleep(25)
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    text = log_path.read_text()
    assert "exited with code" not in text, text
    assert "[up] stopped" in text
    assert "test-admin-pw" not in text
    assert password_file.read_text().strip() not in text
    assert "Connection refused" not in text and "Error 111" not in text, "redis-server stops after the parts"
    gone, alive = psutil.wait_procs(tree, timeout=10)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], f"left behind: {alive}; parts {started}"


def test_pairs_import_of_an_empty_file_says_so(tmp_path: Path) -> None:
    (tmp_path / "empty.json").write_text("[]")
    result = _cli(tmp_path, "pairs", "import", "empty.json")
    assert result.returncode == 1 and "holds no pairs" in result.stderr, result.stderr


def test_pairs_import_caps_size_and_printed_problems(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text("{bad\n" * 5000)
    result = _cli(tmp_path, "pairs", "import", "bad.jsonl")
    assert result.returncode == 1 and len(result.stderr.splitlines()) < 60, result.stderr[-500:]
    result = _cli(tmp_path, "pairs", "import", "bad.jsonl", PERSONABOT_MAX_IMPORT_BYTES="100")
    assert result.returncode == 1 and "PERSONABOT_MAX_IMPORT_BYTES" in result.stderr
