"""Errors the store raises; each message says why and what to do."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

Row = TypeVar("Row")


class StoreError(Exception):
    """A store operation was refused; the message says why and what to do."""


class RunLockedError(StoreError):
    """Another training run is already running."""


class NotFoundError(StoreError):
    """The row asked for does not exist."""


def get_row(s: Session, model: type[Row], row_id: int, what: str) -> Row:
    """The row `row_id` of `model`; NotFoundError("<what> <id> does not exist") without one."""
    row = s.get(model, row_id)
    if row is None:
        raise NotFoundError(f"{what} {row_id} does not exist")
    return row
