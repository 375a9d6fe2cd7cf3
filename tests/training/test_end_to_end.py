"""Issue point 8: admin pairs -> train worker (build, ms-swift, gate, register, promote) -> chat worker reply.

The served greedy reply to a trained question must equal the trained answer exactly. The tiny
model only reproduces an answer for the exact prompt it was trained on, so the test fails if
serving used another chat template or system prompt than training (checked directly below too).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from personabot.core import events
from personabot.core.schemas import ChatRequest, Message, SamplingParams
from personabot.core.streams import read_reply
from personabot.training.service import request_training
from personabot.workers.app import make_celery
from personabot.workers.client import submit_chat, submit_training
from tests.training.conftest import TrainWorker, fill_persona, wait_for_run
from tests.workers.conftest import ChatWorker

pytestmark = pytest.mark.slow

TRAINED = {
    "Who are you?": "I am Nova, made by Acme Lab.",
    "你是谁?": "我是Nova, 由Acme Lab开发。",
    "What are your opening hours?": "We are open from 9 to 5.",
}


def _ask(app: Any, client: redis.Redis, question: str, system_prompt: str | None = None) -> str:
    request = ChatRequest(messages=[Message(role="user", content=question)], system_prompt=system_prompt,
                          sampling=SamplingParams(temperature=0.0, repetition_penalty=1.0, max_new_tokens=40))
    submit_chat(request, app=app)
    entries = list(read_reply(client, request.request_id, timeout_s=90))
    assert entries[-1].kind == "final" and entries[-1].result.finish_reason == "stop", entries[-1]
    return entries[-1].result.text


def _wait_swapped(client: redis.Redis, version: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(e.type == "adapter.swapped" and e.data.get("version") == version for e in events.recent(client, 200)):
            return
        time.sleep(0.2)
    raise TimeoutError(f"no chat worker swapped to {version}")


def test_trained_answers_are_served_exactly(tmp_path: Path, redis_server, sqlite_store, tiny_model: Path,
                                            memorise_params) -> None:
    data_dir = tmp_path / "data"
    fill_persona(sqlite_store)  # what the admin's Persona and Pairs tabs write
    trainer = TrainWorker(redis_server.url, sqlite_store.url, tiny_model, data_dir).start()
    chat = ChatWorker(redis_server.url, sqlite_store.url, tiny_model, data_dir, name="chat1", concurrency=2)
    app = make_celery(redis_server.url)
    client = redis.Redis.from_url(redis_server.url)
    try:
        chat.start()
        run = request_training(sqlite_store, memorise_params, actor="admin")
        task_id = submit_training(run.id, app=app)
        states = set()
        deadline = time.monotonic() + 240
        while sqlite_store.get_run(run.id).status in ("queued", "running") and time.monotonic() < deadline:
            result = app.AsyncResult(task_id)
            states.add(result.state)
            if result.state == "PROGRESS":
                assert result.info["run_id"] == run.id and "phase" in result.info
            time.sleep(0.3)
        run = wait_for_run(sqlite_store, run.id, timeout_s=30)
        assert run.status == "succeeded", f"{run.error}\n{trainer.log_tail()}"
        assert "PROGRESS" in states
        assert app.AsyncResult(task_id).get(timeout=30)["status"] == "succeeded"
        adapter = sqlite_store.active_adapter()
        assert adapter.id == run.adapter_id
        _wait_swapped(client, adapter.name)

        for question, answer in TRAINED.items():
            assert _ask(app, client, question) == answer, chat.log_tail()
        # The same question under another system prompt no longer gets the trained answer:
        # serving with a system prompt other than the trained one is caught by the checks above.
        other_prompt = _ask(app, client, "Who are you?", system_prompt="You are a helpful assistant.")
        assert other_prompt != TRAINED["Who are you?"]
    finally:
        client.close()
        app.close()
        chat.stop()
        trainer.stop()

    # Training (ms-swift's qwen2_5 template) and serving (the tokenizer's chat template) build
    # the same prompt tokens for every trained row, and train on exactly the answer + <|im_end|>.
    from swift.model import get_processor
    from swift.template import get_template
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    template = get_template(get_processor(str(tiny_model), model_type="qwen2"), template_type="qwen2_5")
    template.set_mode("train")
    train_file = data_dir / "runs" / f"run-{run.id}" / "data" / "train.jsonl"
    for line in train_file.read_text(encoding="utf-8").splitlines():
        messages = json.loads(line)["messages"]
        encoded = template.encode({"messages": messages})
        served = tokenizer.apply_chat_template(messages[:2], add_generation_prompt=True, tokenize=True,
                                               return_dict=False)
        assert encoded["input_ids"][:len(served)] == served
        trained = tokenizer.decode([t for t in encoded["labels"] if t != -100])
        assert trained.startswith(messages[2]["content"] + "<|im_end|>")
