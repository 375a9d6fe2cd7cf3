"""The store: persona, pairs, training runs, adapter versions and audit log on SQLite or PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, func, or_, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from core.models import (
    PAIR_KINDS,
    RUN_FINAL,
    AdapterVersion,
    AuditEntry,
    Base,
    ConfigEntry,
    Pair,
    Persona,
    RunPoint,
    SchemaVersion,
    TrainingRun,
    utcnow,
)

log = logging.getLogger(__name__)


class StoreError(Exception):
    """A store operation was refused; the message says why and what to do."""


class RunLockedError(StoreError):
    """Another training run is already running."""


class NotFoundError(StoreError):
    """The row asked for does not exist."""


def _migration_v1(conn: Any) -> None:
    Base.metadata.create_all(conn)


# Append-only: each entry upgrades the schema by one version.
MIGRATIONS = [_migration_v1]
SCHEMA_VERSION = len(MIGRATIONS)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)

        # Start write transactions eagerly so that concurrent writers queue on busy_timeout
        # instead of failing with "database is locked" on lock upgrade.
        @event.listens_for(engine, "connect")
        def _no_pysqlite_begin(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None

        @event.listens_for(engine, "begin")
        def _begin_immediate(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True)


class Store:
    """All reads and writes of persistent state. Safe to use from several processes at once."""

    def __init__(self, url: str, *, migrate: bool = True) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        if migrate:
            self.migrate()

    @classmethod
    def from_settings(cls, settings: Any = None) -> Store:
        from core.settings import get_settings

        return cls((settings or get_settings()).db_url)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    # --- schema -------------------------------------------------------------------------------
    def migrate(self) -> int:
        """Apply pending migrations (idempotent, safe when several processes start at once)."""
        with self.engine.begin() as conn:
            if self.engine.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(74657373)"))
            SchemaVersion.__table__.create(conn, checkfirst=True)
            current = conn.execute(select(func.max(SchemaVersion.version))).scalar() or 0
            for version in range(current + 1, SCHEMA_VERSION + 1):
                MIGRATIONS[version - 1](conn)
                conn.execute(SchemaVersion.__table__.insert().values(version=version, applied_at=utcnow()))
                log.info("store schema migrated to version %d", version)
            if conn.execute(select(Persona.id)).first() is None:
                conn.execute(Persona.__table__.insert().values(id=1, name="", author="",
                                                               system_prompt="You are a helpful assistant.",
                                                               updated_at=utcnow()))
        return SCHEMA_VERSION

    def schema_version(self) -> int:
        """The applied schema version; 0 for an empty database."""
        from sqlalchemy import inspect

        if not inspect(self.engine).has_table(SchemaVersion.__tablename__):
            return 0
        with self.session() as s:
            return s.execute(select(func.max(SchemaVersion.version))).scalar() or 0

    # --- audit --------------------------------------------------------------------------------
    @staticmethod
    def _audit(s: Session, actor: str, action: str, detail: dict[str, Any] | None = None) -> None:
        s.add(AuditEntry(actor=actor, action=action, detail=detail or {}))

    def audit(self, actor: str, action: str, detail: dict[str, Any] | None = None) -> None:
        with self.session() as s:
            self._audit(s, actor, action, detail)

    def list_audit(self, limit: int = 100) -> list[AuditEntry]:
        with self.session() as s:
            return list(s.scalars(select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)))

    # --- persona ------------------------------------------------------------------------------
    def get_persona(self) -> Persona:
        with self.session() as s:
            persona = s.get(Persona, 1)
            assert persona is not None, "migrate() creates the persona row"
            return persona

    def update_persona(
        self,
        *,
        name: str | None = None,
        author: str | None = None,
        system_prompt: str | None = None,
        actor: str = "system",
    ) -> Persona:
        with self.session() as s:
            persona = s.get(Persona, 1)
            assert persona is not None
            changes: dict[str, Any] = {}
            for field, value in (("name", name), ("author", author), ("system_prompt", system_prompt)):
                if value is not None and getattr(persona, field) != value:
                    changes[field] = {"from": getattr(persona, field), "to": value}
                    setattr(persona, field, value)
            if changes:
                self._audit(s, actor, "persona.update", changes)
            return persona

    # --- pairs --------------------------------------------------------------------------------
    def list_pairs(
        self, kind: str | None = None, *, enabled_only: bool = False, search: str | None = None
    ) -> list[Pair]:
        with self.session() as s:
            query = select(Pair).order_by(Pair.kind, Pair.id)
            if kind:
                query = query.where(Pair.kind == kind)
            if enabled_only:
                query = query.where(Pair.enabled.is_(True))
            if search:
                like = f"%{search}%"
                query = query.where(or_(Pair.instruction.ilike(like), Pair.output.ilike(like),
                                        Pair.input.ilike(like)))
            return list(s.scalars(query))

    def count_pairs(self) -> int:
        with self.session() as s:
            return s.execute(select(func.count(Pair.id))).scalar() or 0

    def get_pair(self, pair_id: int) -> Pair:
        with self.session() as s:
            pair = s.get(Pair, pair_id)
            if pair is None:
                raise NotFoundError(f"pair {pair_id} does not exist")
            return pair

    def add_pairs(
        self, rows: Iterable[dict[str, Any]], *, actor: str = "system", replace: bool = False
    ) -> list[int]:
        """Insert validated rows in one transaction (all or nothing). `replace` clears first."""
        rows = list(rows)
        try:
            with self.session() as s:
                if replace:
                    s.query(Pair).delete()
                objects = []
                for row in rows:
                    kind = row.get("kind", "identity")
                    if kind not in PAIR_KINDS:
                        raise StoreError(f"kind {kind!r} is not one of {PAIR_KINDS}")
                    objects.append(Pair(kind=kind, instruction=row["instruction"],
                                        input=row.get("input", "") or "", output=row["output"],
                                        enabled=bool(row.get("enabled", True))))
                s.add_all(objects)
                s.flush()
                self._audit(s, actor, "pairs.import" if replace or len(rows) > 1 else "pairs.add",
                            {"count": len(rows), "replace": replace})
                return [obj.id for obj in objects]
        except IntegrityError as error:
            raise StoreError(
                "a pair with the same kind and question already exists; edit it instead of adding"
            ) from error

    def update_pair(self, pair_id: int, *, actor: str = "system", **fields: Any) -> Pair:
        allowed = {"kind", "instruction", "input", "output", "enabled"}
        unknown = set(fields) - allowed
        if unknown:
            raise StoreError(f"cannot set {sorted(unknown)} on a pair; allowed: {sorted(allowed)}")
        try:
            with self.session() as s:
                pair = s.get(Pair, pair_id)
                if pair is None:
                    raise NotFoundError(f"pair {pair_id} does not exist")
                before = pair.as_dict()
                for key, value in fields.items():
                    setattr(pair, key, value)
                s.flush()
                self._audit(s, actor, "pairs.update", {"id": pair_id, "before": before,
                                                       "after": pair.as_dict()})
                return pair
        except IntegrityError as error:
            raise StoreError("another pair already asks the same question") from error

    def delete_pairs(self, pair_ids: Sequence[int], *, actor: str = "system") -> int:
        with self.session() as s:
            count = s.query(Pair).filter(Pair.id.in_(list(pair_ids))).delete()
            self._audit(s, actor, "pairs.delete", {"ids": list(pair_ids)})
            return count

    # --- persona data hash --------------------------------------------------------------------
    def persona_snapshot(self) -> dict[str, Any]:
        """Everything the training set depends on, in a stable order."""
        persona = self.get_persona()
        pairs = self.list_pairs(enabled_only=True)
        return {
            "name": persona.name,
            "author": persona.author,
            "system_prompt": persona.system_prompt,
            "pairs": sorted(
                [[p.kind, p.instruction, p.input, p.output] for p in pairs]
            ),
        }

    def persona_hash(self) -> str:
        blob = json.dumps(self.persona_snapshot(), ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    # --- config -------------------------------------------------------------------------------
    def get_config(self, key: str, default: str | None = None) -> str | None:
        with self.session() as s:
            entry = s.get(ConfigEntry, key)
            return entry.value if entry else default

    def set_config(self, key: str, value: str, *, actor: str = "system") -> None:
        with self.session() as s:
            entry = s.get(ConfigEntry, key)
            old = entry.value if entry else None
            if entry is None:
                s.add(ConfigEntry(key=key, value=value))
            else:
                entry.value = value
            self._audit(s, actor, "config.set", {"key": key, "from": old, "to": value})

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
            run = s.get(TrainingRun, run_id)
            if run is None:
                raise NotFoundError(f"training run {run_id} does not exist")
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
                run = s.get(TrainingRun, run_id)
                if run is None:
                    raise NotFoundError(f"training run {run_id} does not exist")
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
            run = s.get(TrainingRun, run_id)
            if run is None:
                raise NotFoundError(f"training run {run_id} does not exist")
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
            run = s.get(TrainingRun, run_id)
            if run is None:
                raise NotFoundError(f"training run {run_id} does not exist")
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
            adapter = s.get(AdapterVersion, adapter_id)
            if adapter is None:
                raise NotFoundError(f"adapter version {adapter_id} does not exist")
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
        with self.session() as s:
            previous = s.scalars(select(AdapterVersion).where(AdapterVersion.active.is_(True))).first()
            target = None
            if adapter_id is not None:
                target = s.get(AdapterVersion, adapter_id)
                if target is None:
                    raise NotFoundError(f"adapter version {adapter_id} does not exist")
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
            adapter = s.get(AdapterVersion, adapter_id)
            if adapter is None:
                raise NotFoundError(f"adapter version {adapter_id} does not exist")
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
