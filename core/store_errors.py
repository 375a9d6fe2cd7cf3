"""Errors the store raises; each message says why and what to do."""

from __future__ import annotations


class StoreError(Exception):
    """A store operation was refused; the message says why and what to do."""


class RunLockedError(StoreError):
    """Another training run is already running."""


class NotFoundError(StoreError):
    """The row asked for does not exist."""
