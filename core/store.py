"""The store: persona, pairs, audit log and settings on SQLite or PostgreSQL (runs and adapters
in `core.store_training`, the gate's terms and questions in `core.store_gate`)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Engine, Table, create_engine, event, func, insert, or_, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from personabot.core.models import (
    PAIR_KINDS,
    AuditEntry,
    Base,
    ConfigEntry,
    Pair,
    Persona,
    SchemaVersion,
    utcnow,
)
from personabot.core.store_errors import NotFoundError, RunLockedError, StoreError, get_row
from personabot.core.store_gate import GateInputError, GateRecords, migration_gate_records
from personabot.core.store_keys import ApiKeyRecords, migration_api_keys
from personabot.core.store_training import TrainingRecords, isoformat, latest_heartbeat_age

if TYPE_CHECKING:
    from personabot.core.settings import Settings

log = logging.getLogger(__name__)


def _migration_v1(conn: Any) -> None:
    Base.metadata.create_all(conn)


# Append-only: each entry upgrades the schema by one version.
MIGRATIONS = [_migration_v1, migration_api_keys, migration_gate_records]
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


class Store(TrainingRecords, ApiKeyRecords, GateRecords):
    """All reads and writes of persistent state. Safe to use from several processes at once."""

    def __init__(self, url: str, *, migrate: bool = True) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        if migrate:
            self.migrate()

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> Store:
        from personabot.core.settings import get_settings

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
            cast(Table, SchemaVersion.__table__).create(conn, checkfirst=True)
            current = conn.execute(select(func.max(SchemaVersion.version))).scalar() or 0
            for version in range(current + 1, SCHEMA_VERSION + 1):
                MIGRATIONS[version - 1](conn)
                conn.execute(insert(SchemaVersion).values(version=version, applied_at=utcnow()))
                log.info("store schema migrated to version %d", version)
            if conn.execute(select(Persona.id)).first() is None:
                conn.execute(insert(Persona).values(id=1, name="", author="",
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
                escaped = search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                like = f"%{escaped}%"
                query = query.where(or_(Pair.instruction.ilike(like, escape="\\"),
                                        Pair.output.ilike(like, escape="\\"), Pair.input.ilike(like, escape="\\")))
            return list(s.scalars(query))

    def count_pairs(self) -> int:
        with self.session() as s:
            return s.execute(select(func.count(Pair.id))).scalar() or 0

    def get_pair(self, pair_id: int) -> Pair:
        with self.session() as s:
            pair = get_row(s, Pair, pair_id, "pair")
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
                pair = get_row(s, Pair, pair_id, "pair")
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
            if _is_secret_key(key):
                old, value = (None if old is None else "(secret)"), "(secret)"
            self._audit(s, actor, "config.set", {"key": key, "from": old, "to": value})


def _is_secret_key(key: str) -> bool:
    """Config keys whose values (password hashes, tokens) never go into the audit log."""
    return any(word in key.lower() for word in ("hash", "password", "secret", "token"))


__all__ = ["GateInputError", "NotFoundError", "RunLockedError", "Store", "StoreError", "isoformat",
           "latest_heartbeat_age", "make_engine"]
