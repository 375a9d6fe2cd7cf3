"""The train worker (real Celery subprocess): dead runs, shutdown, kills and scheduled retraining."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest
from celery import Celery

from personabot.core.train_params import TrainParams
from personabot.training.registry import AdapterRegistry
from personabot.training.service import request_training
from personabot.workers.app import make_celery
from personabot.workers.beat import SWEEP_TASK
from personabot.workers.client import RETRAIN_IF_CHANGED_TASK, TRAIN_TASK, TrainingNotQueuedError, queue_training
from personabot.workers.train_tasks import enqueue_retrain_if_changed, waiting_run_ids
from tests.training.conftest import (
    TrainWorker,
    age_run,
    fill_persona,
    process_env,
    swift_pids,
    wait_for_run,
    wait_until,
)

LONG = {"epochs": 100, "identity_oversample": 50, "min_identity_pairs": 0}


@pytest.mark.slow
def test_worker_start_fails_orphans_and_retrains_only_on_change(tmp_path: Path, redis_server, sqlite_store,
                                                                tiny_model: Path) -> None:
    fill_persona(sqlite_store)
    data_dir = tmp_path / "data"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "adapter_config.json").write_text("{}")
    registry = AdapterRegistry(sqlite_store, data_dir / "adapters")
    live = registry.register(ckpt, base_model=str(tiny_model), data_hash=sqlite_store.persona_hash(),
                             eval_scores={}, eval_passed=True)
    registry.promote(live.id, actor="admin")
    # A run that a worker of the same name was running when it died.
    orphan = request_training(sqlite_store, TrainParams(), actor="admin")
    sqlite_store.start_run(orphan.id, worker="train@pytest")

    missing = tmp_path / "missing.jsonl"
    worker = TrainWorker(redis_server.url, sqlite_store.url, tiny_model, data_dir,
                         env={"PERSONABOT_GENERAL_DATA": f"{missing}#1", "PERSONABOT_MIN_IDENTITY_PAIRS": "0"})
    worker.start()
    app = make_celery(redis_server.url)
    try:
        deadline = time.monotonic() + 20
        while sqlite_store.get_run(orphan.id).status == "running" and time.monotonic() < deadline:
            time.sleep(0.2)
        failed = sqlite_store.get_run(orphan.id)
        assert failed.status == "failed" and "worker stopped" in failed.error

        assert app.send_task(RETRAIN_IF_CHANGED_TASK).get(timeout=60) == {"queued": False}
        sqlite_store.update_pair(sqlite_store.list_pairs("faq")[0].id, output="We are open from 8 to 6.")
        queued = app.send_task(RETRAIN_IF_CHANGED_TASK).get(timeout=60)
        assert queued["queued"] is True
        run = wait_for_run(sqlite_store, queued["run_id"], timeout_s=60)
        assert run.trigger == "schedule" and run.worker == "train@pytest"
        assert run.status == "failed", worker.log_tail()
        assert run.error == f"the local dataset {missing} does not exist; fix the path"
        assert sqlite_store.active_adapter().id == live.id
    finally:
        app.close()
        worker.stop()


@pytest.mark.slow
def test_a_run_left_by_a_dead_worker_does_not_block_the_next_one(tmp_path: Path, redis_server, sqlite_store,
                                                                 tiny_model: Path) -> None:
    fill_persona(sqlite_store)
    worker = TrainWorker(redis_server.url, sqlite_store.url, tiny_model, tmp_path / "data").start()
    app = make_celery(redis_server.url)
    try:
        # Beat's periodic sweep: a run whose worker died after this worker started ends failed.
        gone = request_training(sqlite_store, TrainParams(), actor="admin")
        sqlite_store.start_run(gone.id, worker="train@gone-4241")
        assert app.send_task(SWEEP_TASK).get(timeout=30) == []
        age_run(sqlite_store, gone.id, minutes=5)
        assert app.send_task(SWEEP_TASK).get(timeout=30) == [gone.id]
        # The next run finds the job lock taken by another dead run: it sweeps and goes ahead.
        dead = request_training(sqlite_store, TrainParams(), actor="admin")
        sqlite_store.start_run(dead.id, worker="train@gone-4242")
        age_run(sqlite_store, dead.id, minutes=5)
        missing = tmp_path / "missing.jsonl"
        nxt = request_training(sqlite_store, TrainParams(min_identity_pairs=0, general_data=[f"{missing}#1"]),
                               actor="admin")
        app.send_task(TRAIN_TASK, kwargs={"run_id": nxt.id})
        run = wait_for_run(sqlite_store, nxt.id, timeout_s=40)
        assert run.status == "failed" and run.error.startswith("the local dataset"), worker.log_tail()
        assert sqlite_store.get_run(dead.id).status == "failed"
        assert "worker stopped" in sqlite_store.get_run(dead.id).error
    finally:
        app.close()
        worker.stop()


def test_a_scheduled_run_that_cannot_be_queued_is_cancelled(sqlite_store, cpu_settings) -> None:
    fill_persona(sqlite_store)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # As inside a worker: publishing only (a worker task never waits on the result backend).
    dead_broker = Celery("dead", broker=f"redis://127.0.0.1:{port}/0")
    try:
        result = enqueue_retrain_if_changed(sqlite_store, cpu_settings, dead_broker)
    finally:
        dead_broker.close()
    assert result["queued"] is False and "could not be queued" in result["error"]
    run = sqlite_store.get_run(result["run_id"])
    assert run.status == "cancelled" and run.error == result["error"]
    assert sqlite_store.current_run() is None, "the next schedule tick is not blocked"


def test_queue_training_enqueues_the_requested_run_or_cancels_it(sqlite_store, redis_server, redis_client) -> None:
    """The one "request, enqueue, cancel on failure" path the UI's Start button and the schedule share."""
    fill_persona(sqlite_store)
    live = make_celery(redis_server.url)
    try:
        run = queue_training(sqlite_store, lambda: request_training(sqlite_store, TrainParams(), actor="admin"),
                             app=live)
    finally:
        live.close()
    assert waiting_run_ids(redis_client) == {run.id}, "the train task is on the queue"
    assert sqlite_store.get_run(run.id).task_id and sqlite_store.get_run(run.id).status == "queued"
    sqlite_store.request_cancel(run.id, actor="admin")
    assert queue_training(sqlite_store, lambda: None, app=live) is None, "nothing requested, nothing queued"

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dead_broker = Celery("dead", broker=f"redis://127.0.0.1:{port}/0")
    try:
        with pytest.raises(TrainingNotQueuedError, match="could not be queued") as raised:
            queue_training(sqlite_store, lambda: request_training(sqlite_store, TrainParams(), actor="admin"),
                           app=dead_broker)
    finally:
        dead_broker.close()
    lost = sqlite_store.get_run(raised.value.run_id)
    assert lost.status == "cancelled" and lost.error == raised.value.reason
    assert sqlite_store.current_run() is None, "the cancelled run blocks no later run"


def _start_training(tmp_path: Path, redis_server, store, tiny_model: Path, general_file: Path,
                    env: dict[str, str] | None = None) -> tuple[TrainWorker, int, str]:
    """A solo-pool worker (as `personabot worker train` runs it) training a long run."""
    fill_persona(store)
    worker = TrainWorker(redis_server.url, store.url, tiny_model, tmp_path / "data", env=env, pool="solo").start()
    run = request_training(store, TrainParams(**LONG, general_data=[f"{general_file}#4"]), actor="admin")
    app = make_celery(redis_server.url)
    try:
        app.send_task(TRAIN_TASK, kwargs={"run_id": run.id})
    finally:
        app.close()
    try:
        wait_until(lambda: store.get_run(run.id).progress.get("step", 0) >= 1, 150, "training started")
    except TimeoutError:
        worker.stop()
        raise
    output = str(tmp_path / "data" / "runs" / f"run-{run.id}" / "output")
    assert swift_pids(output), worker.log_tail()
    return worker, run.id, output


def _reap(output: str) -> None:
    for pid in swift_pids(output):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_killed_worker_takes_ms_swift_with_it(tmp_path: Path, redis_server, sqlite_store, tiny_model: Path,
                                                general_file: Path) -> None:
    worker, run_id, output = _start_training(tmp_path, redis_server, sqlite_store, tiny_model, general_file,
                                             env={"PERSONABOT_USE_HF": "1"})
    try:
        assert process_env(swift_pids(output)[0]).get("USE_HF") == "1", "ms-swift uses the same hub"
        assert worker.process is not None
        os.killpg(worker.process.pid, signal.SIGKILL)
        worker.process.wait(timeout=10)
        wait_until(lambda: not swift_pids(output), 15, "ms-swift died with its worker")
    finally:
        _reap(output)
        worker.stop()


@pytest.mark.slow
def test_stopping_the_worker_cancels_its_run(tmp_path: Path, redis_server, sqlite_store, tiny_model: Path,
                                             general_file: Path) -> None:
    worker, run_id, output = _start_training(tmp_path, redis_server, sqlite_store, tiny_model, general_file)
    try:
        assert worker.process is not None
        os.killpg(worker.process.pid, signal.SIGTERM)  # what `personabot up` and Ctrl-C do
        worker.process.wait(timeout=30)
        run = sqlite_store.get_run(run_id)
        assert run.status == "cancelled", worker.log_tail()
        assert run.error == "cancelled by the shutdown of worker train@pytest; nothing was registered"
        assert not swift_pids(output)
    finally:
        _reap(output)
        worker.stop()


def test_the_broker_view_keeps_old_queued_runs_whose_task_waits(redis_server, sqlite_store) -> None:
    """A run requested while no train worker ran is old but not lost: its task is in the broker."""
    import redis

    from personabot.training.service import sweep_stale_runs
    from personabot.workers.train_tasks import waiting_run_ids
    from tests.training.conftest import age_run, fill_persona

    fill_persona(sqlite_store)
    waiting = request_training(sqlite_store, TrainParams(), actor="admin")
    lost = request_training(sqlite_store, TrainParams(), actor="admin")
    app = make_celery(redis_server.url)
    app.send_task(TRAIN_TASK, kwargs={"run_id": waiting.id})
    app.send_task("personabot.chat", args=[{"request_id": "x", "messages": []}])
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert waiting_run_ids(client) == {waiting.id}
        for run in (waiting, lost):
            age_run(sqlite_store, run.id, minutes=30, field="created_at")
        assert sweep_stale_runs(sqlite_store, waiting=waiting_run_ids(client)) == [lost.id]
        assert sqlite_store.get_run(waiting.id).status == "queued"
    finally:
        client.close()
        app.close()
