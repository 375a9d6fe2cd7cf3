"""The store's training records: runs (with the job lock), their loss points, adapter versions."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from personabot.core.models import RUN_FINAL, AdapterVersion, RunPoint, TrainingRun, utcnow
from personabot.core.store_errors import RunLockedError, StoreError, get_row


class TrainingRecords:
    """Runs and adapter versions; mixed into `core.store.Store`, which provides the session."""

    if TYPE_CHECKING:  # provided by Store
        def session(self) -> AbstractContextManager[Session]: ...

        @staticmethod
        def _audit(s: Session, actor: str, action: str, detail: dict[str, Any] | None = None) -> None: ...

    # --- training runs ------------------------------------------------------------------------
    def create_run(self, params: dict[str, Any], *, trigger: str = "admin", actor: str = "system",
                   data_hash: str = "") -> TrainingRun:
        with self.session() as s:
            run = TrainingRun(status="queued", params=params, trigger=trigger, data_hash=data_hash)
            s.add(run)
            s.flush()
            self._audit(s, actor, "run.create", {"run": run.id, "trigger": trigger})
            return run

    def get_run(self, run_id: int) -> TrainingRun:
        with self.session() as s:
            run = get_row(s, TrainingRun, run_id, "training run")
            return run

    def list_runs(self, limit: int = 50) -> list[TrainingRun]:
        with self.session() as s:
            return list(s.scalars(select(TrainingRun).order_by(TrainingRun.id.desc()).limit(limit)))

    def current_run(self) -> TrainingRun | None:
        """The running run, else the newest queued one."""
        with self.session() as s:
            for status in ("running", "queued"):
                run = s.scalars(select(TrainingRun).where(TrainingRun.status == status)
                                .order_by(TrainingRun.id.desc())).first()
                if run is not None:
                    return run
            return None

    def start_run(self, run_id: int, *, worker: str, task_id: str = "", log_path: str = "") -> TrainingRun:
        """Take the job lock: mark the run running. Raises RunLockedError if another runs."""
        try:
            with self.session() as s:
                run = get_row(s, TrainingRun, run_id, "training run")
                if run.status != "queued":
                    raise StoreError(f"run {run_id} is {run.status}, not queued")
                if run.cancel_requested:
                    run.status = "cancelled"
                    run.finished_at = utcnow()
                    return run
                run.status = "running"
                run.worker = worker
                run.task_id = task_id or run.task_id
                run.log_path = log_path or run.log_path
                run.started_at = run.heartbeat_at = utcnow()
                s.flush()
                return run
        except IntegrityError as error:
            raise RunLockedError("another training run is already running; wait or cancel it") from error

    def update_run(self, run_id: int, **fields: Any) -> None:
        allowed = {"progress", "metrics", "log_path", "data_hash", "task_id", "params"}
        unknown = set(fields) - allowed
        if unknown:
            raise StoreError(f"cannot set {sorted(unknown)} on a run")
        with self.session() as s:
            s.execute(update(TrainingRun).where(TrainingRun.id == run_id)
                      .values(heartbeat_at=utcnow(), **fields))

    def add_run_points(self, run_id: int, points: Iterable[dict[str, Any]]) -> None:
        with self.session() as s:
            s.add_all(RunPoint(run_id=run_id, step=int(p["step"]), epoch=float(p.get("epoch") or 0),
                               loss=p.get("loss"), learning_rate=p.get("learning_rate"))
                      for p in points)

    def run_points(self, run_id: int) -> list[RunPoint]:
        with self.session() as s:
            return list(s.scalars(select(RunPoint).where(RunPoint.run_id == run_id)
                                  .order_by(RunPoint.step)))

    def finish_run(self, run_id: int, status: str, *, error: str = "",
                   metrics: dict[str, Any] | None = None, adapter_id: int | None = None) -> TrainingRun:
        if status not in RUN_FINAL:
            raise StoreError(f"{status!r} is not a final status {RUN_FINAL}")
        with self.session() as s:
            run = get_row(s, TrainingRun, run_id, "training run")
            run.status = status
            run.error = error
            run.finished_at = utcnow()
            if metrics is not None:
                run.metrics = metrics
            if adapter_id is not None:
                run.adapter_id = adapter_id
            self._audit(s, "system", f"run.{status}", {"run": run_id, "error": error})
            return run

    def request_cancel(self, run_id: int, *, actor: str = "system") -> TrainingRun:
        with self.session() as s:
            run = get_row(s, TrainingRun, run_id, "training run")
            if run.status in RUN_FINAL:
                raise StoreError(f"run {run_id} already ended ({run.status}); nothing to cancel")
            run.cancel_requested = True
            if run.status == "queued":
                run.status = "cancelled"
                run.finished_at = utcnow()
            self._audit(s, actor, "run.cancel", {"run": run_id})
            return run

    def fail_orphaned_runs(self, *, worker: str | None = None,
                           stale_after: timedelta | None = None) -> list[int]:
        """Mark runs left 'running' by a dead worker as failed; return their ids."""
        with self.session() as s:
            query = select(TrainingRun).where(TrainingRun.status == "running")
            if worker is not None:
                query = query.where(TrainingRun.worker == worker)
            if stale_after is not None:
                query = query.where(TrainingRun.heartbeat_at < utcnow() - stale_after)
            ids = []
            for run in s.scalars(query):
                run.status = "failed"
                run.error = "the training worker stopped while this run was running; start it again"
                run.finished_at = utcnow()
                ids.append(run.id)
            if ids:
                self._audit(s, "system", "run.orphaned", {"runs": ids})
            return ids

    # --- adapters -----------------------------------------------------------------------------
    def add_adapter(self, *, name: str, path: str, base_model: str, data_hash: str,
                    eval_scores: dict[str, Any], eval_passed: bool, eval_reason: str = "",
                    size_bytes: int = 0, run_id: int | None = None) -> AdapterVersion:
        try:
            with self.session() as s:
                adapter = AdapterVersion(name=name, path=path, base_model=base_model,
                                         data_hash=data_hash, eval_scores=eval_scores,
                                         eval_passed=eval_passed, eval_reason=eval_reason,
                                         size_bytes=size_bytes, run_id=run_id)
                s.add(adapter)
                s.flush()
                self._audit(s, "system", "adapter.register", {"adapter": adapter.id, "name": name,
                                                              "passed": eval_passed})
                return adapter
        except IntegrityError as error:
            raise StoreError(f"an adapter named {name!r} already exists; pick another name") from error

    def get_adapter(self, adapter_id: int) -> AdapterVersion:
        with self.session() as s:
            adapter = get_row(s, AdapterVersion, adapter_id, "adapter version")
            return adapter

    def find_adapter(self, name: str) -> AdapterVersion | None:
        with self.session() as s:
            return s.scalars(select(AdapterVersion).where(AdapterVersion.name == name)).first()

    def list_adapters(self) -> list[AdapterVersion]:
        with self.session() as s:
            return list(s.scalars(select(AdapterVersion).order_by(AdapterVersion.id.desc())))

    def active_adapter(self) -> AdapterVersion | None:
        with self.session() as s:
            return s.scalars(select(AdapterVersion).where(AdapterVersion.active.is_(True))).first()

    def set_active(self, adapter_id: int | None, *, actor: str = "system") -> AdapterVersion | None:
        """Make one version active (None = base model only) in one transaction."""
        try:
            return self._set_active(adapter_id, actor)
        except IntegrityError as error:
            raise StoreError(
                "another admin changed the active adapter at the same moment; reload and try again"
            ) from error

    def _set_active(self, adapter_id: int | None, actor: str) -> AdapterVersion | None:
        with self.session() as s:
            previous = s.scalars(select(AdapterVersion).where(AdapterVersion.active.is_(True))
                                 .with_for_update()).first()
            target = None
            if adapter_id is not None:
                target = get_row(s, AdapterVersion, adapter_id, "adapter version")
                if not target.eval_passed:
                    raise StoreError(
                        f"adapter {target.name} failed its evaluation ({target.eval_reason}); "
                        "it cannot be activated"
                    )
            if previous is not None:
                previous.active = False
                s.flush()
            if target is not None:
                target.active = True
                target.activated_at = utcnow()
            self._audit(s, actor, "adapter.activate",
                        {"from": previous.id if previous else None, "to": adapter_id})
            return target

    def delete_adapter(self, adapter_id: int, *, actor: str = "system") -> AdapterVersion:
        with self.session() as s:
            adapter = get_row(s, AdapterVersion, adapter_id, "adapter version")
            if adapter.active:
                raise StoreError(
                    f"adapter {adapter.name} is active; activate another version before deleting it"
                )
            s.delete(adapter)
            self._audit(s, actor, "adapter.delete", {"adapter": adapter_id, "name": adapter.name})
            return adapter


def latest_heartbeat_age(run: TrainingRun) -> float | None:
    if run.heartbeat_at is None:
        return None
    return (utcnow() - run.heartbeat_at).total_seconds()


def isoformat(value: datetime | None) -> str:
    return value.isoformat(timespec="seconds") + "Z" if value else ""
