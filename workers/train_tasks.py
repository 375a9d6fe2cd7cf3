"""Celery training tasks (`personabot.train`, `personabot.maybe_retrain`) and the train worker's start-up."""

# Start: celery -A workers.train_tasks:app worker -Q train --concurrency 1 --prefetch-multiplier 1
# One job at a time: concurrency 1, and the store's job lock (one 'running' run) across hosts.
# Early ack (no acks_late): a job that trains for hours is never redelivered by Redis's
# visibility timeout; a worker that dies mid-run leaves the run 'running', and the next start of
# a train worker marks it failed.

from __future__ import annotations

import logging
import socket
from datetime import timedelta
from typing import Any

from celery import signals

from core.settings import get_settings
from core.store import RunLockedError, Store
from training.service import maybe_retrain as plan_retrain
from training.service import run_training
from workers.app import app
from workers.client import MAYBE_RETRAIN_TASK, TRAIN_TASK

log = logging.getLogger(__name__)
# A run whose heartbeat is older than this belongs to a dead worker (progress is written every few s).
STALE_AFTER = timedelta(minutes=2)
LOCKED_RETRY_S = 60


def _redis() -> Any:
    import redis

    url = get_settings().redis_url or app.conf.broker_url
    return redis.Redis.from_url(url)


def _worker_name(task: Any) -> str:
    return str(getattr(task.request, "hostname", "") or socket.gethostname())


@signals.worker_ready.connect
def fail_orphaned_runs(sender: Any = None, **_: Any) -> list[int]:
    """In the worker's main process at start: runs left 'running' by a dead worker become failed."""
    settings = get_settings()
    store = Store(settings.db_url)
    try:
        hostname = str(getattr(sender, "hostname", "") or "")
        ids = store.fail_orphaned_runs(worker=hostname) if hostname else []
        ids += store.fail_orphaned_runs(stale_after=STALE_AFTER)
        if ids:
            log.warning("marked runs %s failed: their worker stopped while they were running", ids)
        return ids
    finally:
        store.close()


@app.task(name=TRAIN_TASK, bind=True, acks_late=False, ignore_result=False, max_retries=None)
def train(self: Any, run_id: int) -> dict[str, Any]:
    """Build, train, evaluate, register and promote one queued run."""
    settings = get_settings()
    store = Store(settings.db_url)
    client = _redis()
    try:
        run = run_training(run_id, settings=settings, store=store, redis_client=client,
                           report=lambda meta: self.update_state(state="PROGRESS", meta=meta),
                           worker=_worker_name(self), task_id=str(self.request.id or ""))
        return {"run_id": run.id, "status": run.status, "error": run.error, "adapter_id": run.adapter_id}
    except RunLockedError as error:
        log.info("run %s waits: %s", run_id, error)
        raise self.retry(countdown=LOCKED_RETRY_S) from error
    finally:
        client.close()
        store.close()


@app.task(name=MAYBE_RETRAIN_TASK, ignore_result=False)
def maybe_retrain() -> dict[str, Any]:
    """Enqueue training only if the persona data hash differs from the active adapter's."""
    settings = get_settings()
    store = Store(settings.db_url)
    try:
        run = plan_retrain(store, settings)
        if run is None:
            return {"queued": False}
        result = train.apply_async(kwargs={"run_id": run.id})
        store.update_run(run.id, task_id=str(result.id))
        return {"queued": True, "run_id": run.id}
    finally:
        store.close()
