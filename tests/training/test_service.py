"""Training runs with real ms-swift on the tiny model: success, gate rejection, cancel and failures."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from personabot.core import events
from personabot.core.train_params import TrainParams
from personabot.training.registry import AdapterRegistry
from personabot.training.service import (
    TrainingRequestError,
    cancel_training,
    request_training,
    retrain_if_changed,
    run_training,
    sweep_stale_runs,
)
from tests.training.conftest import age_run, fill_persona, swift_pids, wait_until


def _greedy(model_dir: str, adapter_dir: str, system: str, question: str) -> str:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir)
    inputs = tokenizer.apply_chat_template([{"role": "system", "content": system},
                                            {"role": "user", "content": question}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.fixture()
def prior_active(sqlite_store, cpu_settings, tmp_path: Path) -> Any:
    """An adapter that is already live: failed or cancelled runs must leave it active."""
    ckpt = tmp_path / "prior"
    ckpt.mkdir()
    (ckpt / "adapter_config.json").write_text("{}")
    registry = AdapterRegistry(sqlite_store, cpu_settings.adapters_path)
    adapter = registry.register(ckpt, base_model="tiny", data_hash="old", eval_scores={}, eval_passed=True)
    return registry.promote(adapter.id, actor="admin")


@pytest.mark.slow
def test_a_run_builds_trains_evaluates_registers_and_promotes(sqlite_store, cpu_settings, memorise_params,
                                                              redis_client) -> None:
    fill_persona(sqlite_store)
    sqlite_store.add_identity_question("Who looks after {name}?", actor="admin")
    run = request_training(sqlite_store, memorise_params, actor="admin")
    assert run.status == "queued" and run.data_hash == sqlite_store.persona_hash()
    reports: list[dict[str, Any]] = []
    run = run_training(run.id, settings=cpu_settings, store=sqlite_store, redis_client=redis_client,
                       report=reports.append, worker="test")
    assert run.status == "succeeded", run.error
    adapter = sqlite_store.active_adapter()
    assert adapter is not None and adapter.id == run.adapter_id and adapter.eval_passed
    assert adapter.data_hash == sqlite_store.persona_hash()
    assert run.metrics["eval"]["scores"]["faq"] == 1.0
    assert {r["kind"] for r in run.metrics["eval"]["rows"]} == {"identity", "faq", "retention"}
    assert [r["question"] for r in run.metrics["eval"]["rows"] if r.get("set") == "admin"] == [
        "Who looks after Nova?"] * 2, "the persona's own question is asked, with and without the system prompt"
    base = sqlite_store.base_identity(cpu_settings.model)
    assert base is not None and base.derived_at is not None and len(base.self_answers) == 3, \
        "the first evaluation on this base model keeps what it said about itself"
    assert base.terms == run.metrics["eval"]["scores"]["derived_identity_terms"]
    assert run.metrics["data"]["general"] == 4 and run.metrics["data"]["rows"] == 3
    assert Path(run.log_path).is_file() and "swift" in Path(run.log_path).read_text()

    # Progress: the store, the task-state callback and the event bus all saw the steps.
    assert run.progress["step"] == run.progress["max_steps"] == 100
    assert {"epoch", "loss", "eta_s", "gpu_mem_gb", "elapsed_s"} <= set(run.progress)
    assert [p.step for p in sqlite_store.run_points(run.id)] == list(range(1, 101))
    assert [r["phase"] for r in reports][:2] == ["building", "starting"]
    # Every phase the run went through, with when it began, in order (bench/edit_to_live.py reads them).
    phases = run.progress["phases"]
    assert list(phases) == ["building", "starting", "loading model", "preparing", "training", "saving",
                            "evaluating", "registering", "promoting"]
    assert list(phases.values()) == sorted(phases.values())
    assert max(r.get("step", 0) for r in reports) == 100
    types = [e.type for e in reversed(events.recent(redis_client, 500))]
    assert "run.progress" in types and types[-2:] == ["adapter.promoted", "run.finished"]

    # The promoted adapter reproduces the trained answers exactly under greedy decoding.
    system = "You are Nova, an assistant made by Acme Lab."
    for question, answer in [("Who are you?", "I am Nova, made by Acme Lab."),
                             ("What are your opening hours?", "We are open from 9 to 5.")]:
        assert _greedy(cpu_settings.model, adapter.path, system, question) == answer

    # Nothing changed since: the schedule does not retrain; an edit makes it retrain.
    assert retrain_if_changed(sqlite_store, cpu_settings) is None
    sqlite_store.update_pair(sqlite_store.list_pairs("faq")[0].id, output="We are open from 8 to 6.")
    again = retrain_if_changed(sqlite_store, cpu_settings)
    assert again is not None and again.trigger == "schedule" and again.status == "queued"
    assert retrain_if_changed(sqlite_store, cpu_settings) is None, "a queued run is not queued twice"


@pytest.mark.slow
def test_the_gate_rejects_an_adapter_and_keeps_the_active_one(sqlite_store, cpu_settings, prior_active,
                                                             settings_env, redis_client) -> None:
    fill_persona(sqlite_store)
    strict = settings_env(**{**cpu_settings.model_dump(), "eval_identity_min": 0.8})
    run = request_training(sqlite_store, TrainParams(epochs=1, min_identity_pairs=0), actor="admin")
    run = run_training(run.id, settings=strict, store=sqlite_store, redis_client=redis_client)
    assert run.status == "rejected"
    assert run.error.startswith("evaluation gate: identity")
    rejected = sqlite_store.get_adapter(run.adapter_id)
    assert not rejected.eval_passed and rejected.eval_reason in run.error
    assert sqlite_store.active_adapter().id == prior_active.id
    assert [e.type for e in events.recent(redis_client)].count("adapter.promoted") == 0
    assert retrain_if_changed(sqlite_store, strict) is None, "the same data is not retrained after a rejection"


@pytest.mark.slow
def test_cancel_stops_the_run_within_10_s_and_registers_nothing(sqlite_store, cpu_settings, prior_active) -> None:
    fill_persona(sqlite_store)
    params = TrainParams(epochs=100, identity_oversample=50, min_identity_pairs=0)
    run = request_training(sqlite_store, params, actor="admin")
    finished: list[Any] = []
    thread = threading.Thread(target=lambda: finished.append(
        run_training(run.id, settings=cpu_settings, store=sqlite_store)))
    thread.start()
    deadline = time.monotonic() + 120
    while sqlite_store.get_run(run.id).progress.get("step", 0) < 1:
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.2)
    asked = time.monotonic()
    cancel_training(sqlite_store, run.id, "admin")
    thread.join(timeout=30)
    stopped = time.monotonic() - asked
    assert finished and finished[0].status == "cancelled", finished
    assert stopped < 10, f"cancel took {stopped:.1f}s"
    assert [a.id for a in sqlite_store.list_adapters()] == [prior_active.id]
    assert sqlite_store.active_adapter().id == prior_active.id
    assert not (cpu_settings.runs_path / f"run-{run.id}" / "output").exists()


def test_a_queued_run_cancelled_before_it_starts_never_runs(sqlite_store, cpu_settings) -> None:
    fill_persona(sqlite_store)
    run = request_training(sqlite_store, TrainParams(), actor="admin")
    cancel_training(sqlite_store, run.id, "admin")
    assert run_training(run.id, settings=cpu_settings, store=sqlite_store).status == "cancelled"
    assert not cpu_settings.runs_path.exists()


def test_an_empty_persona_cannot_be_trained(sqlite_store, cpu_settings, prior_active) -> None:
    with pytest.raises(TrainingRequestError, match="no name and no author"):
        request_training(sqlite_store, TrainParams(), actor="admin")
    fill_persona(sqlite_store)
    run = request_training(sqlite_store, TrainParams(), actor="admin")
    sqlite_store.update_persona(name="", author="", actor="admin")
    run = run_training(run.id, settings=cpu_settings, store=sqlite_store)
    assert run.status == "failed" and "no name and no author" in run.error
    assert sqlite_store.active_adapter().id == prior_active.id


def test_an_unreachable_hub_dataset_fails_clearly(sqlite_store, cpu_settings, prior_active) -> None:
    fill_persona(sqlite_store)
    params = TrainParams(epochs=1, min_identity_pairs=0, general_data=["AI-ModelScope/alpaca-gpt4-data-zh#5"])
    run = request_training(sqlite_store, params, actor="admin")
    run = run_training(run.id, settings=cpu_settings, store=sqlite_store)
    assert run.status == "failed"
    assert run.error.startswith("the dataset AI-ModelScope/alpaca-gpt4-data-zh is not in the local cache")
    assert "local .jsonl" in run.error and "\n" not in run.error
    assert Path(run.log_path).is_file()
    assert sqlite_store.active_adapter().id == prior_active.id
    assert [a.id for a in sqlite_store.list_adapters()] == [prior_active.id]


def test_a_missing_local_dataset_fails_clearly(sqlite_store, cpu_settings, tmp_path: Path) -> None:
    fill_persona(sqlite_store)
    params = TrainParams(min_identity_pairs=0, general_data=[f"{tmp_path}/missing.jsonl#5"])
    run = run_training(request_training(sqlite_store, params, actor="admin").id, settings=cpu_settings,
                       store=sqlite_store)
    assert run.status == "failed"
    assert run.error == f"the local dataset {tmp_path}/missing.jsonl does not exist; fix the path"


def test_a_broken_output_directory_fails_clearly(sqlite_store, settings_env, tiny_model, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the data directory should be")
    settings = settings_env(model=str(tiny_model), data_dir=blocker, adapter_dir=tmp_path / "adapters")
    fill_persona(sqlite_store)
    run = request_training(sqlite_store, TrainParams(), actor="admin")
    run = run_training(run.id, settings=settings, store=sqlite_store)
    assert run.status == "failed"
    assert run.error.startswith("cannot write the run directory") and "PERSONABOT_DATA_DIR" in run.error
    assert sqlite_store.list_adapters() == []


def test_progress_lines_become_store_points(tmp_path: Path) -> None:
    from personabot.training.runner import LogFollower, _step_point, failure_reason

    log = tmp_path / "logging.jsonl"
    follower = LogFollower(log)
    assert follower.read() == []
    line = {"loss": 1.5, "epoch": 0.5, "global_step/max_steps": "3/10", "remaining_time": "1m 4s",
            "memory(GiB)": 12.5, "learning_rate": 1e-4}
    log.write_text(json.dumps(line) + "\n" + '{"loss": 1.2, "global_st')
    points = [_step_point(e) for e in follower.read()]
    assert points[0] is not None
    assert {k: points[0][k] for k in ("step", "max_steps", "loss", "eta_s", "gpu_mem_gb")} == {
        "step": 3, "max_steps": 10, "loss": 1.5, "eta_s": 64.0, "gpu_mem_gb": 12.5}
    with log.open("a") as handle:
        handle.write('ep/max_steps": "4/10"}\n')
    assert [_step_point(e)["step"] for e in follower.read()] == [4]
    train_log = tmp_path / "train.log"
    train_log.write_text("noise\nTraceback...\nValueError: the value is wrong\nmore\n")
    assert failure_reason(train_log, 1) == "ValueError: the value is wrong"
    train_log.write_text("[ERROR:swift] Dataset x/y load failed: subset_name=default with error: E1001\n"
                         "modelscope_hub._download_control._DownloadDeadlineError: [E1001] ...\n")
    assert failure_reason(train_log, 1).startswith("the dataset x/y could not be loaded (no network")


def test_cancel_ends_a_running_run_whose_worker_died(sqlite_store) -> None:
    fill_persona(sqlite_store)
    live = request_training(sqlite_store, TrainParams(), actor="admin")
    sqlite_store.start_run(live.id, worker="train@alive")
    run = cancel_training(sqlite_store, live.id, "admin")
    assert run.status == "running" and run.cancel_requested, "a live worker stops it itself"
    age_run(sqlite_store, live.id, minutes=5)
    run = cancel_training(sqlite_store, live.id, "admin")
    assert run.status == "cancelled"
    assert run.error.startswith("cancelled by admin; its worker train@alive had stopped")
    nxt = request_training(sqlite_store, TrainParams(), actor="admin")
    assert sqlite_store.start_run(nxt.id, worker="train@new").status == "running", "the job lock is free"


def test_the_sweep_ends_dead_runs_and_lost_queued_runs(sqlite_store, cpu_settings) -> None:
    fill_persona(sqlite_store)
    dead = request_training(sqlite_store, TrainParams(), actor="admin")
    sqlite_store.start_run(dead.id, worker="train@gone-1234")
    lost = request_training(sqlite_store, TrainParams(), actor="admin")
    age_run(sqlite_store, lost.id, minutes=30, field="created_at")
    fresh = request_training(sqlite_store, TrainParams(), actor="admin")
    held = request_training(sqlite_store, TrainParams(), actor="admin")
    age_run(sqlite_store, held.id, minutes=30, field="created_at")
    assert sweep_stale_runs(sqlite_store, waiting=set()) == [], "a beating run is alive; queued runs wait"
    age_run(sqlite_store, dead.id, minutes=3)
    assert sweep_stale_runs(sqlite_store) == [dead.id], "without a view of the broker queued runs stay"
    # The broker still holds `held`'s task (e.g. requested while the worker was down): not lost.
    assert sweep_stale_runs(sqlite_store, waiting={held.id}) == [lost.id]
    assert sqlite_store.get_run(held.id).status == "queued"
    sqlite_store.request_cancel(held.id, actor="admin")
    assert sqlite_store.get_run(dead.id).status == "failed"
    assert sqlite_store.get_run(lost.id).status == "cancelled"
    assert "task was lost" in sqlite_store.get_run(lost.id).error
    assert sqlite_store.get_run(fresh.id).status == "queued"

    # The schedule is not blocked for good by a queued run whose Celery message is gone.
    sqlite_store.request_cancel(fresh.id, actor="admin")
    orphan = request_training(sqlite_store, TrainParams(), actor="admin")
    age_run(sqlite_store, orphan.id, minutes=30, field="created_at")
    again = retrain_if_changed(sqlite_store, cpu_settings, waiting=set())
    assert again is not None and again.id != orphan.id
    assert sqlite_store.get_run(orphan.id).status == "cancelled"


@pytest.mark.slow
def test_a_run_ended_by_the_sweep_stops_training_and_keeps_its_status(sqlite_store, cpu_settings,
                                                                     prior_active) -> None:
    fill_persona(sqlite_store)
    run = request_training(sqlite_store, TrainParams(epochs=100, identity_oversample=50, min_identity_pairs=0),
                           actor="admin")
    finished: list[Any] = []
    thread = threading.Thread(target=lambda: finished.append(
        run_training(run.id, settings=cpu_settings, store=sqlite_store)))
    thread.start()
    wait_until(lambda: sqlite_store.get_run(run.id).progress.get("step", 0) >= 1, 120, "training started")
    output = str(cpu_settings.runs_path / f"run-{run.id}" / "output")
    assert swift_pids(output)
    # Another worker's sweep judged it dead (e.g. a long stall without heartbeat).
    assert sqlite_store.fail_orphaned_runs(stale_after=timedelta(0)) == [run.id]
    thread.join(timeout=30)
    assert finished, "the run kept training after it was ended"
    assert finished[0].status == "failed" and "worker stopped" in finished[0].error
    assert sqlite_store.get_run(run.id).status == "failed", "the sweep's verdict is not overwritten"
    assert not swift_pids(output)
    assert [a.id for a in sqlite_store.list_adapters()] == [prior_active.id]
