"""The real small model (SmolLM2-135M-Instruct) through the product's run path, on the CPU.

Trained once with the default recipe (`TrainParams()`; general data = the base model's own answers
to the offline prompts, training/self_general.py, as in bench/recipe_bench.py): the gate
passes and the adapter goes live, the held-out identity questions pass while the base model fails
them, and a real Celery chat worker serves exactly what HF/peft greedy decoding answers with the trained adapter. An
over-trained adapter (a very high learning rate, no general data) is rejected on retention.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import torch

from bench.recipe_bench import FAQ_PAIRS, PERSONA
from personabot.core.prompting import system_prompt_for
from personabot.core.schemas import ChatRequest, Message, SamplingParams
from personabot.core.settings import load_settings
from personabot.core.store import Store
from personabot.core.streams import read_reply
from personabot.core.train_params import TrainParams
from personabot.redis_server import RedisServer
from personabot.training.eval_checks import identity_passes
from personabot.training.eval_sets import HELD_OUT_IDENTITY
from personabot.training.self_general import distill_general_data
from personabot.training.service import request_training, run_training
from personabot.workers.app import make_celery
from personabot.workers.client import submit_chat
from tests.training.quality_fixtures import small_model  # noqa: F401  (fixture)
from tests.workers.conftest import ChatWorker

# One module fixture trains on the CPU (general data from the base model, ms-swift, the gate): minutes.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]  # the first test carries the training fixture

# Rows of general data per run (the product's default mix is on the hub; this is offline).
GENERAL_ROWS = 172
# Over-trained: 30x the default learning rate's order, identity only, nothing to hold general ability.
OVERTRAINED = {"epochs": 2, "learning_rate": 1e-2, "identity_oversample": 2, "faq_oversample": 2,
               "general_data": []}
SERVED_QUESTIONS = ["Who built you?", "What are your opening hours?", "What is the capital of France?"]


@pytest.fixture(scope="module")
def stack(small_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:  # noqa: F811
    root = tmp_path_factory.mktemp("real-model")
    server = RedisServer(root / "redis", persist=False).start()
    db_url = f"sqlite:///{root / 'store.db'}"
    store = Store(db_url)
    store.update_persona(**PERSONA, actor="admin")
    store.add_pairs([{"kind": "faq", "instruction": q, "output": a} for q, a in FAQ_PAIRS], actor="admin")
    settings = load_settings(model=str(small_model), database_url=db_url, data_dir=root / "data", device="cpu",
                             gpu_share="concurrent", gpu_release_wait_s=0, redis_url=server.url)
    client = redis.Redis.from_url(server.url)
    general = distill_general_data(small_model, root / "general_self.jsonl", system_prompt_for(store.get_persona()),
                                   device="cpu")
    try:
        yield {"general": f"{general}#{GENERAL_ROWS}", "root": root, "server": server, "store": store,
               "settings": settings, "client": client,
               "model": small_model}
    finally:
        client.close()
        store.close()
        server.stop()


def _train(stack: dict[str, Any], params: TrainParams) -> Any:
    store = stack["store"]
    run = request_training(store, params, actor="admin")
    started = time.monotonic()
    run = run_training(run.id, settings=stack["settings"], store=store, redis_client=stack["client"])
    print(f"run {run.id} ({params.epochs} ep, lr {params.learning_rate}): {run.status} in "
          f"{time.monotonic() - started:.0f}s, scores {run.metrics.get('eval', {}).get('scores')}")
    return run


@pytest.fixture(scope="module")
def default_run(stack: dict[str, Any]) -> Any:
    """One run with the default recipe; it is promoted when it passes."""
    return _train(stack, TrainParams(general_data=[stack["general"]]))


def _held_out_rate(rows: list[dict[str, Any]], system: str) -> float:
    picked = [r["pass"] for r in rows if r.get("set") == "held-out" and r.get("system") == system]
    return sum(picked) / len(picked)


def _greedy(model_dir: Path, adapter: Path | None, system: str | None, questions: list[str],
            max_new: int) -> list[str]:
    """HF generate (peft, unmerged), greedy, one question at a time (no padding)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    answers = []
    for question in questions:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": question}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=max_new, do_sample=False,
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        answers.append(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True))
    return answers


def test_the_default_recipe_teaches_the_identity_the_base_model_lacks(stack: dict[str, Any],
                                                                      default_run: Any) -> None:
    assert default_run.adapter_id is not None, default_run.error
    report = default_run.metrics["eval"]
    assert report["scores"]["identity"] >= stack["settings"].eval_identity_min, report["scores"]
    # Held-out paraphrases, asked without the persona's system prompt: only training can put the name there.
    trained = _held_out_rate(report["rows"], "none")
    persona = stack["store"].get_persona()
    base = _greedy(stack["model"], None, None, HELD_OUT_IDENTITY, 40)
    base_rate = sum(identity_passes(a, persona, stack["settings"].base_identity_terms) for a in base) / len(base)
    assert trained >= 0.8 and base_rate <= 0.2, (trained, base_rate, base[:5])


def test_the_gate_passes_the_default_recipe_and_it_goes_live(stack: dict[str, Any], default_run: Any) -> None:
    """Identity, FAQ facts and retention all clear their thresholds (recipe bench, this CPU, 2026-12-04:
    0.99, 1.00 and 0.84 against 0.80: 26 of the 31 general checks the base model gets right are kept, two
    checks of margin), so the run is promoted."""
    report = default_run.metrics["eval"]
    failed = [(r["kind"], r.get("set"), r["question"], r["answer"]) for r in report["rows"] if not r["pass"]]
    assert default_run.status == "succeeded", (default_run.error, report["scores"], failed[:12])
    active = stack["store"].active_adapter()
    assert active is not None and active.id == default_run.adapter_id and active.eval_passed


def test_the_chat_worker_serves_what_peft_greedy_answers(stack: dict[str, Any], default_run: Any) -> None:
    store, settings = stack["store"], stack["settings"]
    # Asked for by name, as the playground does: the served path is the same whether or not it went live.
    adapter = store.get_adapter(default_run.adapter_id)
    worker = ChatWorker(stack["server"].url, settings.db_url, stack["model"], settings.data_dir, name="chat-real",
                        concurrency=2, env={"PERSONABOT_CONTEXT_TOKENS": "2048"}).start(timeout_s=300)
    app = make_celery(stack["server"].url)
    try:
        served = []
        for question in SERVED_QUESTIONS:
            request = ChatRequest(messages=[Message(role="user", content=question)], adapter=adapter.name,
                                  sampling=SamplingParams(temperature=0.0, repetition_penalty=1.0, max_new_tokens=40))
            submit_chat(request, app=app)
            entries = list(read_reply(stack["client"], request.request_id, timeout_s=180))
            assert entries[-1].kind == "final", worker.log_tail()
            assert entries[-1].result.adapter_version == adapter.name
            served.append(entries[-1].result.text)
    finally:
        app.close()
        worker.stop()
    adapter_dir = settings.adapters_path / adapter.path
    expected = _greedy(stack["model"], adapter_dir, system_prompt_for(store.get_persona()), SERVED_QUESTIONS, 40)
    assert served == expected
    assert "Nova" in served[0] or "Acme" in served[0], served


def test_an_over_trained_adapter_is_rejected_on_retention(stack: dict[str, Any], default_run: Any) -> None:
    store = stack["store"]
    active_before = store.active_adapter()
    run = _train(stack, TrainParams(**OVERTRAINED))
    assert run.status == "rejected", run.error
    retention = run.metrics["eval"]["scores"]["retention"]
    assert retention < stack["settings"].eval_retention_min and "retention" in run.error, (retention, run.error)
    # The rejected adapter is registered but never goes live.
    after = store.active_adapter()
    assert (after.id if after else None) == (active_before.id if active_before else None)
