"""Training jobs end to end: request, run (build -> sft -> evaluate -> register -> promote), cancel, schedule."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Collection
from datetime import timedelta
from pathlib import Path
from typing import Any

import redis
from redis.exceptions import RedisError

from personabot.core.errors import one_line
from personabot.core.events import AnyEvent, RunFinished, RunProgress, publish
from personabot.core.gpu_share import gpu_memory_gb, gpu_released, should_release
from personabot.core.models import RUN_FINAL, TrainingRun, utcnow
from personabot.core.settings import Settings, env_for_children, get_settings
from personabot.core.store import Store, latest_heartbeat_age
from personabot.core.train_params import TrainParams
from personabot.training.dataset import (
    DatasetUnavailableError,
    EmptyPersonaError,
    PersonaData,
    check_general_data,
    render_rows,
    template_default_system,
    write_training_set,
)
from personabot.training.evaluate import EvalReport, EvaluationError, evaluate_in_subprocess
from personabot.training.model_source import ModelUnavailableError, hub_env, resolve_model_dir
from personabot.training.registry import AdapterRegistry
from personabot.training.runner import TrainingCancelled, TrainingFailed, run_sft, sft_command, sft_env

log = logging.getLogger(__name__)
# Training speed per mode in tokens/s measured on one H200 (bench/RESULTS.md), for the release ETA.
SPEED_TOK_S = {"fast": 6400.0, "24gb": 2900.0, "seeds": 830.0}
ASSUMED_GENERAL_TOKENS = 300
# A running run whose heartbeat is older than this belongs to a dead worker (it beats every few s).
STALE_AFTER = timedelta(minutes=2)
# A queued run with no sign of life for this long has no Celery message left (a waiting task
# touches its run at every retry, once a minute): it would block the schedule for good.
QUEUED_STALE_AFTER = timedelta(minutes=10)


class TrainingRequestError(ValueError):
    """A training run cannot be requested now; the message says what to do."""


def request_training(store: Store, params: TrainParams, *, actor: str, trigger: str = "admin") -> TrainingRun:
    """Check that the persona can be trained and create the queued run (enqueue it separately)."""
    persona = PersonaData.from_snapshot(store.persona_snapshot())
    try:
        render_rows(persona, params)
    except EmptyPersonaError as error:
        raise TrainingRequestError(str(error)) from None
    return store.create_run(params.model_dump(mode="json"), trigger=trigger, actor=actor,
                            data_hash=persona.persona_hash())


def cancel_training(store: Store, run_id: int, actor: str) -> TrainingRun:
    """Ask a run to stop: a queued run is cancelled at once, a running one within seconds.

    A running run whose worker stopped beating (dead worker) is ended here, since nobody else would.
    """
    run = store.request_cancel(run_id, actor=actor)
    age = latest_heartbeat_age(run) if run.status == "running" else None
    if age is not None and age > STALE_AFTER.total_seconds():
        run = store.finish_run(run_id, "cancelled", error=(
            f"cancelled by {actor}; its worker {run.worker or '?'} had stopped "
            f"(no heartbeat for {age:.0f}s), nothing was registered"))
    return run


def sweep_stale_runs(store: Store, *, waiting: Collection[int] | None = None) -> list[int]:
    """End runs nobody works on; returns their ids.

    'running' runs without a heartbeat for STALE_AFTER become failed. When then nothing runs,
    'queued' runs without any sign of life for QUEUED_STALE_AFTER are cancelled — but only when
    the caller can see the broker: `waiting` holds the run ids whose train task the broker still
    has (queued, or delivered and not yet acknowledged); those are alive however old. With
    `waiting=None` queued runs are left alone.
    """
    ids = store.fail_orphaned_runs(stale_after=STALE_AFTER)
    runs = store.list_runs(limit=100)
    if waiting is None or any(run.status == "running" for run in runs):
        return _logged(ids)
    cutoff = utcnow() - QUEUED_STALE_AFTER
    for run in runs:
        if run.status == "queued" and run.id not in waiting and (run.heartbeat_at or run.created_at) < cutoff:
            store.finish_run(run.id, "cancelled", error=(
                f"no train worker took this run for {QUEUED_STALE_AFTER.total_seconds() / 60:.0f} min "
                "(its task was lost); start it again"))
            ids.append(run.id)
    return _logged(ids)


def _logged(ids: list[int]) -> list[int]:
    if ids:
        log.warning("ended stale runs %s: no worker was working on them", ids)
    return ids


def retrain_if_changed(store: Store, settings: Settings | None = None, *, actor: str = "schedule",
                  waiting: Collection[int] | None = None) -> TrainingRun | None:
    """Create a run only if the persona data changed since the active adapter was trained.

    Skips when a run is already queued or running, or when the last run on this very data was
    rejected by the evaluation gate (retraining the same data would fail the same way).
    """
    settings = settings or get_settings()
    current = store.persona_hash()
    active = store.active_adapter()
    if active is not None and active.data_hash == current:
        return None
    sweep_stale_runs(store, waiting=waiting)
    if store.current_run() is not None:
        return None
    last = next((r for r in store.list_runs(limit=20) if r.data_hash == current), None)
    if last is not None and last.status == "rejected":
        return None
    try:
        return request_training(store, settings.training, actor=actor, trigger="schedule")
    except TrainingRequestError as error:
        log.info("scheduled retraining skipped: %s", error)
        return None


def _eta_s(counts: dict[str, int], params: TrainParams) -> float:
    tokens = (counts["rows"] * 80 + counts.get("general", 0) * ASSUMED_GENERAL_TOKENS) * params.epochs
    return round(60 + tokens / SPEED_TOK_S[params.speed_mode])


def _publish(redis_client: redis.Redis | None, event: AnyEvent) -> None:
    """Publish an event; a Redis failure is logged, never fatal (the store holds the truth)."""
    if redis_client is None:
        return
    try:
        publish(redis_client, event)
    except (RedisError, OSError) as error:
        log.warning("could not publish %s (%s)", event.TYPE, error)


def _cancelled_by(store: Store, run_id: int) -> str:
    for entry in store.list_audit(200):
        if entry.action == "run.cancel" and entry.detail.get("run") == run_id:
            return entry.actor
    return "an admin"


class _Job:
    """State of one run while it executes; every store write of the run goes through here."""

    def __init__(self, store: Store, run_id: int, settings: Settings, redis_client: redis.Redis | None,
                 report: Callable[[dict[str, Any]], None] | None) -> None:
        self.store = store
        self.run_id = run_id
        self.settings = settings
        self.redis = redis_client
        self.report = report
        self._cancel_checked = 0.0
        self._cancelled = False
        self.last: dict[str, Any] = {}
        self.phases: dict[str, float] = {}  # phase -> when the run entered it (unix time), kept in the progress

    def cancelled(self) -> bool:
        """A cancel was asked, or the run is no longer ours (ended by a stale-run sweep)."""
        now = time.monotonic()
        if not self._cancelled and now - self._cancel_checked >= 1.0:
            self._cancel_checked = now
            run = self.store.get_run(self.run_id)
            self._cancelled = bool(run.cancel_requested) or run.status != "running"
        return self._cancelled

    def heartbeat(self) -> None:
        self.store.update_run(self.run_id)

    def progress(self, progress: dict[str, Any], points: list[dict[str, Any]]) -> None:
        # The phases the runner passed since its last report (with when), and the one entered now.
        for name, at in [*progress.get("phases", {}).items(), (progress.get("phase"), round(time.time(), 3))]:
            if name:
                self.phases.setdefault(str(name), at)
        progress = self.last = {**progress, "phases": dict(self.phases)}
        self.store.update_run(self.run_id, progress=progress)
        if points:
            self.store.add_run_points(self.run_id, points)
        if self.report is not None:
            self.report({"run_id": self.run_id, **progress})
        if points:
            _publish(self.redis, RunProgress(run_id=self.run_id, **{k: progress.get(k) for k in (
                "step", "max_steps", "epoch", "loss", "eta_s", "gpu_mem_gb")}))

    def phase(self, name: str, **extra: Any) -> None:
        """Enter a phase, keeping the latest training numbers (step, loss, ...) in the progress."""
        self.progress({**self.last, "phase": name, **extra}, [])


def run_training(
    run_id: int,
    *,
    settings: Settings | None = None,
    store: Store | None = None,
    redis_client: redis.Redis | None = None,
    report: Callable[[dict[str, Any]], None] | None = None,
    worker: str = "",
    task_id: str = "",
) -> TrainingRun:
    """Execute a queued run; always ends it in a final state (the active adapter changes only on success)."""
    settings = settings or get_settings()
    own_store = store is None
    if store is None:
        from personabot.core.store import Store

        store = Store(settings.db_url)
    try:
        run = store.get_run(run_id)
        if run.status != "queued":
            log.info("run %s is %s; nothing to do", run_id, run.status)
            return run
        run = store.start_run(run_id, worker=worker, task_id=task_id)
        if run.status != "running":
            return run
        job = _Job(store, run_id, settings, redis_client, report)
        status, error, adapter_id, metrics = _execute(job, TrainParams.model_validate(run.params))
        current = store.get_run(run_id)
        if current.status in RUN_FINAL:
            log.warning("run %s was ended as %s while it ran (%s); keeping that", run_id, current.status,
                        current.error)
            return current
        run = store.finish_run(run_id, status, error=error, metrics=metrics, adapter_id=adapter_id)
        _publish(redis_client, RunFinished(run_id=run_id, status=status, error=error, adapter_id=adapter_id))
        return run
    finally:
        if own_store:
            store.close()


def _execute(job: _Job, params: TrainParams) -> tuple[str, str, int | None, dict[str, Any]]:
    """The run's steps; returns (status, one-line error, adapter id, metrics)."""
    settings, store = job.settings, job.store
    metrics: dict[str, Any] = {}
    run_dir = settings.runs_path / f"run-{job.run_id}"
    output_dir = run_dir / "output"
    try:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            log_path = run_dir / "train.log"
            log_path.touch()
        except OSError as error:
            raise TrainingFailed(f"cannot write the run directory {run_dir} ({error.strerror or error}); "
                                 "point PERSONABOT_DATA_DIR at a writable directory") from None
        store.update_run(job.run_id, log_path=str(log_path))
        job.phase("building")
        persona = PersonaData.from_snapshot(store.persona_snapshot())
        model_dir = resolve_model_dir(settings)
        built = write_training_set(persona, params, run_dir / "data", base_system=template_default_system(model_dir))
        metrics["data"] = {**built.counts, "content_hash": built.data_hash}
        store.update_run(job.run_id, data_hash=built.persona_hash, metrics=metrics)
        check_general_data(params.general_data, use_hf=settings.use_hf)
        on_gpu = gpu_memory_gb() is not None
        dtype = settings.dtype if settings.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
        command = sft_command(model=settings.model, dataset_args=built.dataset_args, output_dir=output_dir,
                              params=params, system=built.system_prompt, torch_dtype=dtype,
                              dataloader_workers=2 if on_gpu else 0)
        env = {**env_for_children(settings), **hub_env(settings)}
        sft_environment = {**env, **sft_env(params)}
        eta = _eta_s(built.counts, params)
        release = should_release(settings.gpu_share)
        if release:
            job.phase("releasing", eta_s=eta)
        with gpu_released(job.redis, release=release, eta_s=eta, wait_s=settings.gpu_release_wait_s,
                          run_id=job.run_id):
            if job.cancelled():
                raise TrainingCancelled("the run was cancelled")
            job.phase("starting", eta_s=eta)
            result = run_sft(command, output_dir, log_path, on_progress=job.progress,
                             should_cancel=job.cancelled, env=sft_environment)
            metrics["train"] = {"final_loss": result.final_loss, "steps": result.steps,
                                "elapsed_s": result.elapsed_s, "peak_gpu_mem_gb": result.peak_gpu_mem_gb}
            job.phase("evaluating")
            report = evaluate_in_subprocess(
                str(model_dir), str(result.adapter_dir), persona,
                [p for p in persona.pairs if p["kind"] == "faq"], settings, run_dir / "eval",
                exclude_questions=_trained_questions(built.path), env=env, should_cancel=job.cancelled,
                heartbeat=job.heartbeat, **gate_inputs(store, settings))
        if job.cancelled():
            raise TrainingCancelled("the run was cancelled")
        keep_derived_terms(store, settings, report)
        metrics["eval"] = report.to_dict()
        job.phase("registering")
        registry = AdapterRegistry(store, settings.adapters_path, job.redis)
        adapter = registry.register(result.adapter_dir, base_model=settings.model, data_hash=built.persona_hash,
                                    eval_scores=report.scores, eval_passed=report.passed,
                                    eval_reason=report.reason, run_id=job.run_id)
        shutil.rmtree(result.adapter_dir, ignore_errors=True)
        if not report.passed:
            return "rejected", f"evaluation gate: {report.reason}", adapter.id, metrics
        job.phase("promoting")
        registry.promote(adapter.id, actor="training")
        return "succeeded", "", adapter.id, metrics
    except TrainingCancelled:
        shutil.rmtree(output_dir, ignore_errors=True)
        reason = f"cancelled by {_cancelled_by(store, job.run_id)}; nothing was registered"
        return "cancelled", reason, None, metrics
    except TrainingFailed as error:
        return "failed", error.reason, None, metrics
    except (EmptyPersonaError, DatasetUnavailableError, EvaluationError, ModelUnavailableError, OSError) as error:
        return "failed", one_line(error, with_type=False), None, metrics
    except Exception as error:
        log.exception("run %s failed", job.run_id)
        return "failed", one_line(error), None, metrics


def gate_inputs(store: Store, settings: Settings) -> dict[str, Any]:
    """What the gate takes from the store: the persona's own identity questions (none: the settings'
    default), the base model's stored base-identity terms, and whether to derive them (first evaluation)."""
    stored = store.base_identity(settings.model)
    return {"identity_questions": [q.question for q in store.list_identity_questions()],
            "base_terms": list(stored.terms) if stored is not None else [],
            "derive_terms": store.needs_derived_terms(settings.model)}


def keep_derived_terms(store: Store, settings: Settings, report: EvalReport) -> None:
    """Store what the base model said about itself, once per base model (a report without it changes nothing)."""
    scores: dict[str, Any] = report.scores
    if "derived_identity_terms" in scores:
        store.record_derived_terms(settings.model, scores["derived_identity_terms"],
                                   scores.get("base_self_answers", []))


def _trained_questions(path: Path) -> list[str]:
    """The user messages of the training set: never part of the held-out identity test."""
    import json

    return [json.loads(line)["messages"][1]["content"]
            for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


__all__ = ["QUEUED_STALE_AFTER", "STALE_AFTER", "TrainingRequestError", "cancel_training", "gate_inputs",
           "keep_derived_terms", "request_training", "retrain_if_changed", "run_training", "sweep_stale_runs"]
