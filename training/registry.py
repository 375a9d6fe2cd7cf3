"""Adapter registry: versions under the adapter store, promote / rollback / delete, swap events."""

from __future__ import annotations

import logging
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
from redis.exceptions import RedisError

from personabot.core.events import AdapterPromoted, publish
from personabot.core.models import AdapterVersion

if TYPE_CHECKING:
    from personabot.core.store import Store

log = logging.getLogger(__name__)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# What a LoRA checkpoint needs for serving; optimizer and trainer state stay behind.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin",
                 "additional_config.json", "README.md")


class AdapterPathError(ValueError):
    """A name or path points outside the adapter store; use a version name from the registry."""


class AdapterRegistry:
    """Adapter versions: files under `adapter_root`, metadata in the store."""

    def __init__(self, store: Store, adapter_root: Path, redis_client: redis.Redis | None = None) -> None:
        self.store = store
        self.root = Path(adapter_root).resolve()
        self.redis = redis_client

    # --- paths --------------------------------------------------------------------------------
    def resolve_path(self, name_or_relpath: str | Path) -> Path:
        """The absolute path of a version inside the store; refuses anything that leaves it."""
        text = str(name_or_relpath)
        if not text.strip() or "\x00" in text:
            raise AdapterPathError("an adapter name or path is required")
        candidate = Path(text)
        if not candidate.is_absolute():
            if any(part == ".." for part in candidate.parts):
                raise AdapterPathError(f"{text!r} climbs out of the adapter store; use a version name")
            candidate = self.root / candidate
        resolved = candidate.resolve()
        if resolved == self.root or not resolved.is_relative_to(self.root):
            raise AdapterPathError(f"{text!r} is outside the adapter store {self.root}; use a version name")
        return resolved

    def next_name(self, run_id: int | None = None) -> str:
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        base = f"v{len(self.store.list_adapters()) + 1}-{stamp}" + (f"-run{run_id}" if run_id else "")
        name, n = base, 1
        while self.store.find_adapter(name) is not None or (self.root / name).exists():
            n += 1
            name = f"{base}-{n}"
        return name

    # --- lifecycle ----------------------------------------------------------------------------
    def register(
        self,
        source_dir: Path,
        *,
        base_model: str,
        data_hash: str,
        eval_scores: dict[str, Any],
        eval_passed: bool,
        eval_reason: str = "",
        run_id: int | None = None,
        name: str | None = None,
    ) -> AdapterVersion:
        """Copy a checkpoint's adapter files into the store and record the version."""
        name = name or self.next_name(run_id)
        if not _NAME.match(name):
            raise AdapterPathError(f"{name!r} is not a version name (letters, digits, '.', '_', '-')")
        target = self.resolve_path(name)
        if target.exists():
            raise AdapterPathError(f"{target} already exists; pick another version name")
        source = Path(source_dir)
        if not (source / "adapter_config.json").exists():
            raise FileNotFoundError(f"{source} holds no adapter_config.json; it is not a LoRA checkpoint")
        tmp = self.root / f".{name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for file in ADAPTER_FILES:
            if (source / file).exists():
                shutil.copy2(source / file, tmp / file)
        tmp.rename(target)
        size = sum(f.stat().st_size for f in target.iterdir() if f.is_file())
        try:
            return self.store.add_adapter(name=name, path=str(target), base_model=base_model,
                                          data_hash=data_hash, eval_scores=eval_scores,
                                          eval_passed=eval_passed, eval_reason=eval_reason,
                                          size_bytes=size, run_id=run_id)
        except Exception:
            shutil.rmtree(target, ignore_errors=True)
            raise

    def _announce(self, adapter: AdapterVersion, action: str) -> None:
        """Tell the chat workers; a Redis failure only delays them (they sync with the store's active one)."""
        if self.redis is None:
            return
        try:
            publish(self.redis, AdapterPromoted(version=adapter.name, id=adapter.id,
                                                path=str(self.resolve_path(adapter.path)),
                                                base_model=adapter.base_model, action=action))
        except (RedisError, OSError) as error:
            log.warning("adapter %s is active, but the swap event could not be sent (%s); "
                        "the chat workers will pick it up from the store", adapter.name, error)

    def promote(self, version_id: int, *, actor: str) -> AdapterVersion:
        """Make a version active (it must have passed its evaluation) and tell the chat workers."""
        adapter = self.store.get_adapter(version_id)
        self.resolve_path(adapter.path)
        active = self.store.set_active(version_id, actor=actor)
        assert active is not None
        self._announce(active, "promote")
        log.info("adapter %s promoted by %s", active.name, actor)
        return active

    def rollback(self, version_id: int, *, actor: str) -> AdapterVersion:
        """Make an earlier version active again; same event as promote."""
        adapter = self.store.get_adapter(version_id)
        self.resolve_path(adapter.path)
        active = self.store.set_active(version_id, actor=actor)
        assert active is not None
        self.store.audit(actor, "adapter.rollback", {"adapter": version_id, "name": active.name})
        self._announce(active, "rollback")
        return active

    def delete(self, version_id: int, *, actor: str) -> AdapterVersion:
        """Delete a version that is not active: its row, then its files."""
        adapter = self.store.get_adapter(version_id)
        path = self.resolve_path(adapter.path)
        removed = self.store.delete_adapter(version_id, actor=actor)
        shutil.rmtree(path, ignore_errors=True)
        return removed

