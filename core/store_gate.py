"""The store's evaluation-gate records: base-identity terms per base model, the persona's own identity questions."""

from __future__ import annotations

import re
from collections.abc import Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import JSON, DateTime, Integer, String, Table, Text, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from personabot.core.models import Base, Persona, utcnow
from personabot.core.store_errors import NotFoundError, StoreError

MAX_TERMS = 50
MAX_TERM_CHARS = 100
MAX_QUESTIONS = 100
MAX_QUESTION_CHARS = 500
_PLACEHOLDER = re.compile(r"(?<!\{)\{([^{}]*)\}(?!\})")


class GateInputError(StoreError, ValueError):
    """A base-identity term or an identity question was refused; the message says why and what to do."""


class BaseIdentity(Base):
    """What a base model calls itself: the terms the gate fails an answer for (besides the settings' own)."""

    __tablename__ = "base_identity"
    base_model: Mapped[str] = mapped_column(String(1000), primary_key=True)
    terms: Mapped[list[str]] = mapped_column(JSON, default=list)
    derived: Mapped[list[str]] = mapped_column(JSON, default=list)
    self_answers: Mapped[list[dict[str, str]]] = mapped_column(JSON, default=list)
    edited_by: Mapped[str] = mapped_column(String(100), default="")
    derived_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class IdentityQuestion(Base):
    """One of the persona's own identity questions, asked by the gate besides the built-in set."""

    __tablename__ = "identity_questions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    question: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


def migration_gate_records(conn: Any) -> None:
    for model in (BaseIdentity, IdentityQuestion):
        cast(Table, model.__table__).create(conn, checkfirst=True)


def check_base_term(term: str, terms: Sequence[str], persona: Persona) -> str:
    """The stripped term, or GateInputError: empty, too long, a duplicate, too many, or part of the persona."""
    term = term.strip()
    if not term:
        raise GateInputError("the term is empty; type a name the base model calls itself, e.g. SmolLM")
    if len(term) > MAX_TERM_CHARS:
        raise GateInputError(f"the term has {len(term)} characters; keep it under {MAX_TERM_CHARS}")
    if "\n" in term:
        raise GateInputError("the term spans several lines; add one term at a time")
    if term.lower() in (t.lower() for t in terms):
        raise GateInputError(f"{term!r} is already in the list")
    if len(terms) >= MAX_TERMS:
        raise GateInputError(f"the list already has {MAX_TERMS} terms, the most it may hold; remove one first")
    for label, value in (("name", persona.name), ("author", persona.author)):
        if value.strip() and term.lower() in value.lower():
            raise GateInputError(f"{term!r} is part of the persona's {label} {value!r}: every answer naming "
                                 "the persona would fail the gate; pick a term only the base model uses")
    return term


def check_identity_question(question: str, questions: Sequence[str]) -> str:
    """The stripped question, or GateInputError: empty, too long, unknown placeholder, duplicate, too many."""
    question = question.strip()
    if not question:
        raise GateInputError("the question is empty; type a question about who the assistant is")
    if len(question) > MAX_QUESTION_CHARS:
        raise GateInputError(f"the question has {len(question)} characters; keep it under {MAX_QUESTION_CHARS}")
    unknown = [p for p in _PLACEHOLDER.findall(question) if p not in ("name", "author")]
    if unknown:
        raise GateInputError(f"unknown placeholder {{{unknown[0]}}}; only {{name}} and {{author}} are filled in")
    key = _question_key(question)
    if any(_question_key(q) == key for q in questions):
        raise GateInputError(f"{question!r} is already in the list")
    if len(questions) >= MAX_QUESTIONS:
        raise GateInputError(f"the persona already has {MAX_QUESTIONS} identity questions, the most it may "
                             "hold; remove one first")
    return question


def _question_key(question: str) -> str:
    return re.sub(r"\s+", " ", question).strip().lower()


class GateRecords:
    """Base-identity terms and identity questions; mixed into `core.store.Store` (session, audit log)."""

    if TYPE_CHECKING:  # provided by Store
        def session(self) -> AbstractContextManager[Session]: ...

        @staticmethod
        def _audit(s: Session, actor: str, action: str, detail: dict[str, Any] | None = None) -> None: ...

    # --- base-identity terms ------------------------------------------------------------------
    def base_identity(self, base_model: str) -> BaseIdentity | None:
        """The stored terms of `base_model`; None before its first evaluation (or the admin's first edit)."""
        with self.session() as s:
            return s.get(BaseIdentity, base_model)

    def needs_derived_terms(self, base_model: str) -> bool:
        """True until an evaluation has asked `base_model` about itself (`record_derived_terms`)."""
        row = self.base_identity(base_model)
        return row is None or row.derived_at is None

    def record_derived_terms(self, base_model: str, terms: Sequence[str],
                             self_answers: Sequence[dict[str, str]]) -> BaseIdentity:
        """Keep what the first evaluation derived, added to any terms the admin set before it; later calls
        change nothing (the admin's edits of the derived terms stay)."""
        with self.session() as s:
            row = self._identity_row(s, base_model)
            if row.derived_at is not None:
                return row
            known = {t.lower() for t in row.terms}
            row.terms = [*row.terms, *(t for t in dict.fromkeys(terms) if t.lower() not in known)][:MAX_TERMS]
            row.derived, row.self_answers, row.derived_at = list(terms), list(self_answers), utcnow()
            self._audit(s, "system", "base_terms.derive", {"base_model": base_model, "terms": list(terms)})
            return row

    def add_base_term(self, base_model: str, term: str, *, actor: str = "system") -> BaseIdentity:
        """Add one term (validated by `check_base_term`) to `base_model`'s list; audited."""
        with self.session() as s:
            row = self._identity_row(s, base_model)
            term = check_base_term(term, row.terms, self._persona(s))
            return self._set_terms(s, row, [*row.terms, term], actor, {"added": term})

    def remove_base_term(self, base_model: str, term: str, *, actor: str = "system") -> BaseIdentity:
        """Remove one term from `base_model`'s list; GateInputError (listing the terms) if it is not there."""
        with self.session() as s:
            row = self._identity_row(s, base_model)
            wanted = term.strip().lower()
            kept = [t for t in row.terms if t.lower() != wanted]
            if len(kept) == len(row.terms):
                listed = ", ".join(row.terms) or "none"
                raise GateInputError(f"{term.strip()!r} is not in the list (the terms are: {listed})")
            return self._set_terms(s, row, kept, actor, {"removed": term.strip()})

    def _identity_row(self, s: Session, base_model: str) -> BaseIdentity:
        row = s.get(BaseIdentity, base_model, with_for_update=True)
        if row is None:
            row = BaseIdentity(base_model=base_model, terms=[], derived=[], self_answers=[])
            s.add(row)
        return row

    def _set_terms(self, s: Session, row: BaseIdentity, terms: list[str], actor: str,
                   change: dict[str, str]) -> BaseIdentity:
        before = list(row.terms or [])
        row.terms = terms
        row.edited_by = actor
        row.updated_at = utcnow()
        s.flush()
        self._audit(s, actor, "base_terms.update", {"base_model": row.base_model, **change,
                                                    "from": before, "to": terms})
        return row

    @staticmethod
    def _persona(s: Session) -> Persona:
        persona = s.get(Persona, 1)
        assert persona is not None, "migrate() creates the persona row"
        return persona

    # --- the persona's identity questions -----------------------------------------------------
    def list_identity_questions(self) -> list[IdentityQuestion]:
        with self.session() as s:
            return list(s.scalars(select(IdentityQuestion).order_by(IdentityQuestion.id)))

    def add_identity_question(self, question: str, *, actor: str = "system") -> IdentityQuestion:
        """Add one question (validated by `check_identity_question`); audited."""
        with self.session() as s:
            existing = [q.question for q in s.scalars(select(IdentityQuestion).with_for_update())]
            question = check_identity_question(question, existing)
            row = IdentityQuestion(question=question)
            s.add(row)
            s.flush()
            self._audit(s, actor, "identity_questions.add", {"id": row.id, "question": question})
            return row

    def delete_identity_questions(self, ids: Sequence[int], *, actor: str = "system") -> int:
        """Delete the questions `ids`, all or none: NotFoundError names an id that does not exist."""
        ids = list(dict.fromkeys(ids))
        with self.session() as s:
            rows = list(s.scalars(select(IdentityQuestion).where(IdentityQuestion.id.in_(ids))))
            missing = sorted(set(ids) - {r.id for r in rows})
            if missing:
                raise NotFoundError(f"identity question {missing[0]} does not exist; nothing was removed")
            for row in rows:
                s.delete(row)
            self._audit(s, actor, "identity_questions.delete", {"ids": ids,
                                                                "questions": [r.question for r in rows]})
            return len(rows)
