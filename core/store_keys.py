"""The store's API keys: created (shown once), stored as a sha256 hash, listed by prefix, revoked, usage counted."""

from __future__ import annotations

import hashlib
import secrets
from contextlib import AbstractContextManager
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import BigInteger, DateTime, Integer, String, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from personabot.core.models import Base, utcnow
from personabot.core.store_errors import NotFoundError, StoreError

KEY_PREFIX = "pb-"
SHOWN_CHARS = 11  # "pb-" and 8 characters: enough to tell keys apart, far too few to guess the rest


class ApiKey(Base):
    """One API key; only its hash and its first characters are kept."""

    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    prefix: Mapped[str] = mapped_column(String(20), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    rate_limit_per_minute: Mapped[int | None] = mapped_column(Integer, nullable=True)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


def hash_key(secret: str) -> str:
    """sha256 of the whole key (the key has 256 bits of randomness, so no salt or slow hash is needed)."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def migration_api_keys(conn: Any) -> None:
    ApiKey.__table__.create(conn, checkfirst=True)  # type: ignore[attr-defined]


class ApiKeyRecords:
    """API keys; mixed into `core.store.Store`, which provides the session and the audit log."""

    if TYPE_CHECKING:  # provided by Store
        def session(self) -> AbstractContextManager[Session]: ...

        @staticmethod
        def _audit(s: Session, actor: str, action: str, detail: dict[str, Any] | None = None) -> None: ...

    def create_api_key(self, name: str, *, rate_limit_per_minute: int | None = None,
                       actor: str = "system") -> tuple[ApiKey, str]:
        """A new key and its secret; the secret is returned this once and never stored."""
        name = name.strip()
        if not name or len(name) > 100:
            raise StoreError("an API key needs a name of 1 to 100 characters (who or what uses it)")
        if rate_limit_per_minute is not None and rate_limit_per_minute < 1:
            raise StoreError("rate_limit_per_minute must be at least 1 (or empty for the default)")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        with self.session() as s:
            key = ApiKey(name=name, prefix=secret[:SHOWN_CHARS], key_hash=hash_key(secret),
                         rate_limit_per_minute=rate_limit_per_minute)
            s.add(key)
            s.flush()
            self._audit(s, actor, "api_key.create", {"key": key.id, "name": name, "prefix": key.prefix})
            return key, secret

    def list_api_keys(self, *, include_revoked: bool = True) -> list[ApiKey]:
        with self.session() as s:
            query = select(ApiKey).order_by(ApiKey.id)
            if not include_revoked:
                query = query.where(ApiKey.revoked_at.is_(None))
            return list(s.scalars(query))

    def find_api_key(self, secret: str) -> ApiKey | None:
        """The live (not revoked) key with this secret, else None."""
        if not secret.startswith(KEY_PREFIX):
            return None
        with self.session() as s:
            return s.scalars(select(ApiKey).where(ApiKey.key_hash == hash_key(secret),
                                                  ApiKey.revoked_at.is_(None))).first()

    def revoke_api_key(self, ref: int | str, *, actor: str = "system") -> ApiKey:
        """Revoke by id or by the shown prefix; revoking twice is refused."""
        with self.session() as s:
            if isinstance(ref, int) or str(ref).isdigit():
                matches = [k for k in [s.get(ApiKey, int(ref))] if k is not None]
            else:
                matches = list(s.scalars(select(ApiKey).where(ApiKey.prefix == str(ref))))
            if not matches:
                raise NotFoundError(f"no API key {ref!r}; `personabot keys list` shows ids and prefixes")
            if len(matches) > 1:
                raise StoreError(f"several keys start with {ref!r}; revoke by id instead")
            key = matches[0]
            if key.revoked_at is not None:
                raise StoreError(f"API key {key.id} ({key.prefix}…) is already revoked")
            key.revoked_at = utcnow()
            self._audit(s, actor, "api_key.revoke", {"key": key.id, "prefix": key.prefix})
            return key

    def add_api_key_usage(self, key_id: int, *, prompt_tokens: int, completion_tokens: int) -> None:
        """Count one request and its tokens on the key (one UPDATE, safe under concurrency)."""
        with self.session() as s:
            s.execute(update(ApiKey).where(ApiKey.id == key_id).values(
                requests=ApiKey.requests + 1, prompt_tokens=ApiKey.prompt_tokens + prompt_tokens,
                completion_tokens=ApiKey.completion_tokens + completion_tokens, last_used_at=utcnow()))
