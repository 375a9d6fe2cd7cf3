"""Celery training tasks (`personabot.train`, `personabot.retrain_if_changed`, the stale-run sweep) and worker hooks."""

# Start: celery -A workers.train_tasks:app worker -Q train --concurrency 1 --prefetch-multiplier 1
# One job at a time: concurrency 1, and the store's job lock (one 'running' run) across hosts.
# Early ack (no acks_late): a job that trains for hours is never redelivered by Redis's
# visibility timeout. A worker that dies mid-run leaves the run 'running' with a heartbeat that
# stops; the stale-run sweep (worker start, beat every few minutes, any task that finds the job
# lock taken, the schedule) marks it failed. A worker that shuts down cancels its own run first.

from __future__ import annotations

import base64
import json
import logging
import socket
import threading
from typing import Any

import redis
from celery import Celery, signals

from personabot.core.settings import Settings, get_settings
from personabot.core.store import RunLockedError, Store
from personabot.training.service import retrain_if_changed, run_training, sweep_stale_runs
from personabot.workers.app import TRAIN_QUEUE, app
from personabot.workers.beat import SWEEP_TASK
from personabot.workers.client import RETRAIN_IF_CHANGED_TASK, TRAIN_TASK, TrainingNotQueuedError, queue_training

log = logging.getLogger(__name__)
LOCKED_RETRY_S = 60


def _redis() -> redis.Redis:
    url = get_settings().redis_url or app.conf.broker_url
    return redis.Redis.from_url(url)


def waiting_run_ids(client: redis.Redis) -> set[int]:
    """Run ids whose `personabot.train` task the broker still holds: in the `train` list, or
    delivered and not yet acknowledged (kombu's `unacked` hash; a retry with a countdown sits there)."""
    raw = list(client.lrange(TRAIN_QUEUE, 0, -1)) + list(client.hvals("unacked"))
    ids: set[int] = set()
    for item in raw:
        try:
            message = json.loads(item)
            if isinstance(message, list):  # unacked entries are [message, exchange, routing_key]
                message = message[0]
            if message.get("headers", {}).get("task") != TRAIN_TASK:
                continue
            body = message["body"]
            if message.get("properties", {}).get("body_encoding") == "base64":
                body = base64.b64decode(body)
            ids.add(int(json.loads(body)[1]["run_id"]))
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            continue
    return ids


def _waiting() -> set[int] | None:
    """`waiting_run_ids` from the broker; None (leave queued runs alone) when it cannot be read."""
    import redis

    client = _redis()
    try:
        return waiting_run_ids(client)
    except redis.RedisError as error:
        log.warning("cannot read the train queue (%s); queued runs are not swept", type(error).__name__)
        return None
    finally:
        client.close()


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
        ids += sweep_stale_runs(store, waiting=_waiting())
        if ids:
            log.warning("ended runs %s: their worker stopped while they were running or queued", ids)
        return ids
    finally:
        store.close()


def cancel_worker_runs(hostname: str) -> list[int]:
    """Ask the runs this worker is running to stop (ms-swift is stopped, the run ends cancelled)."""
    store = Store(get_settings().db_url)
    try:
        ids = []
        for run in store.list_runs(limit=20):
            if run.status == "running" and run.worker == hostname:
                store.request_cancel(run.id, actor=f"the shutdown of worker {hostname}")
                ids.append(run.id)
        if ids:
            log.warning("worker %s is shutting down: cancelling runs %s", hostname, ids)
        return ids
    finally:
        store.close()


@signals.worker_shutting_down.connect
def _cancel_on_shutdown(sender: Any = None, **_: Any) -> None:
    """Ctrl-C / SIGTERM: cancel this worker's run so a warm shutdown ends within seconds.

    Runs in a thread (this is a signal handler that may interrupt the task's own store access);
    the thread is not a daemon, so the process finishes the write before it exits.
    """
    if sender:
        threading.Thread(target=cancel_worker_runs, args=(str(sender),), name="cancel-runs").start()


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
        store.update_run(run_id)  # a sign of life: this queued run still has a task
        freed = sweep_stale_runs(store, waiting=waiting_run_ids(client))
        log.info("run %s waits: %s%s", run_id, error, f" (ended stale runs {freed})" if freed else "")
        raise self.retry(countdown=1 if freed else LOCKED_RETRY_S) from error
    finally:
        client.close()
        store.close()


def enqueue_retrain_if_changed(store: Store, settings: Settings, celery_app: Celery) -> dict[str, Any]:
    """Create and enqueue a run if the persona changed; a run that cannot be enqueued is cancelled."""
    try:
        run = queue_training(store, lambda: retrain_if_changed(store, settings, waiting=_waiting()), app=celery_app)
    except TrainingNotQueuedError as error:
        return {"queued": False, "run_id": error.run_id, "error": error.reason}
    return {"queued": run is not None, **({"run_id": run.id} if run is not None else {})}


@app.task(name=RETRAIN_IF_CHANGED_TASK, ignore_result=False)
def retrain_if_changed_task() -> dict[str, Any]:
    """Enqueue training only if the persona data hash differs from the active adapter's."""
    settings = get_settings()
    store = Store(settings.db_url)
    try:
        return enqueue_retrain_if_changed(store, settings, app)
    finally:
        store.close()


@app.task(name=SWEEP_TASK, ignore_result=False)
def sweep() -> list[int]:
    """End runs whose worker died (sent by beat every few minutes)."""
    store = Store(get_settings().db_url)
    try:
        return sweep_stale_runs(store, waiting=_waiting())
    finally:
        store.close()
