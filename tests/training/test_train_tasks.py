"""The train worker (real Celery subprocess): orphaned runs on start, scheduled retraining."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.training.conftest import TrainWorker, fill_persona, wait_for_run
from training.params import TrainParams
from training.registry import AdapterRegistry
from training.service import request_training
from workers.app import make_celery
from workers.client import MAYBE_RETRAIN_TASK


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

        assert app.send_task(MAYBE_RETRAIN_TASK).get(timeout=60) == {"queued": False}
        sqlite_store.update_pair(sqlite_store.list_pairs("faq")[0].id, output="We are open from 8 to 6.")
        queued = app.send_task(MAYBE_RETRAIN_TASK).get(timeout=60)
        assert queued["queued"] is True
        run = wait_for_run(sqlite_store, queued["run_id"], timeout_s=60)
        assert run.trigger == "schedule" and run.worker == "train@pytest"
        assert run.status == "failed", worker.log_tail()
        assert run.error == f"the local dataset {missing} does not exist; fix the path"
        assert sqlite_store.active_adapter().id == live.id
    finally:
        app.close()
        worker.stop()
