"""Adapter registry: path safety, register, promote/rollback events, delete."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from personabot.core import events
from personabot.core.store import StoreError
from personabot.training.registry import AdapterPathError, AdapterRegistry


def _checkpoint(path: Path, marker: str) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": 8, "marker": marker}))
    (path / "adapter_model.safetensors").write_bytes(marker.encode() * 10)
    (path / "optimizer.pt").write_bytes(b"not copied")
    return path


def _register(registry: AdapterRegistry, tmp_path: Path, marker: str, passed: bool = True):
    return registry.register(_checkpoint(tmp_path / "ckpt" / marker, marker), base_model="tiny",
                             data_hash=f"hash-{marker}", eval_scores={"identity": 1.0}, eval_passed=passed,
                             eval_reason="" if passed else "identity 0.10 < 0.80", run_id=None)


def test_paths_never_leave_the_adapter_store(sqlite_store, tmp_path: Path) -> None:
    root = tmp_path / "adapters"
    root.mkdir()
    registry = AdapterRegistry(sqlite_store, root)
    assert registry.resolve_path("v1") == root.resolve() / "v1"
    assert registry.resolve_path(root / "v1") == root.resolve() / "v1"
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", root / "sneaky")
    for bad in ["", "..", "../outside", "v1/../../outside", "/etc/passwd", str(tmp_path / "outside"),
                "sneaky", "sneaky/x", ".", "v1\x00"]:
        with pytest.raises(AdapterPathError):
            registry.resolve_path(bad)
    with pytest.raises(AdapterPathError):
        registry.register(_checkpoint(tmp_path / "c", "x"), base_model="tiny", data_hash="h", eval_scores={},
                          eval_passed=True, name="../escape")


def test_register_copies_only_adapter_files(sqlite_store, tmp_path: Path) -> None:
    registry = AdapterRegistry(sqlite_store, tmp_path / "adapters")
    adapter = _register(registry, tmp_path, "a")
    stored = Path(adapter.path)
    assert stored.parent == (tmp_path / "adapters").resolve()
    assert sorted(p.name for p in stored.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert adapter.size_bytes == sum(p.stat().st_size for p in stored.iterdir())
    assert sqlite_store.find_adapter(adapter.name).data_hash == "hash-a"
    assert not sqlite_store.find_adapter(adapter.name).active


def test_promote_and_rollback_publish_the_swap_event(sqlite_store, redis_client, tmp_path: Path) -> None:
    registry = AdapterRegistry(sqlite_store, tmp_path / "adapters", redis_client)
    first, second = _register(registry, tmp_path, "a"), _register(registry, tmp_path, "b")
    registry.promote(first.id, actor="admin")
    registry.promote(second.id, actor="admin")
    assert sqlite_store.active_adapter().id == second.id
    registry.rollback(first.id, actor="admin")
    assert sqlite_store.active_adapter().id == first.id
    promoted = [e for e in reversed(events.recent(redis_client)) if e.type == "adapter.promoted"]
    assert [e.data["version"] for e in promoted] == [first.name, second.name, first.name]
    assert promoted[-1].data == {"version": first.name, "id": first.id, "path": str(Path(first.path)),
                                 "base_model": "tiny", "action": "rollback"}
    assert Path(promoted[-1].data["path"]).is_absolute()
    assert "adapter.rollback" in [entry.action for entry in sqlite_store.list_audit()]


def test_a_failed_adapter_is_never_activated(sqlite_store, redis_client, tmp_path: Path) -> None:
    registry = AdapterRegistry(sqlite_store, tmp_path / "adapters", redis_client)
    good, bad = _register(registry, tmp_path, "good"), _register(registry, tmp_path, "bad", passed=False)
    registry.promote(good.id, actor="admin")
    with pytest.raises(StoreError, match="failed its evaluation"):
        registry.promote(bad.id, actor="admin")
    assert sqlite_store.active_adapter().id == good.id
    assert [e.data["version"] for e in events.recent(redis_client) if e.type == "adapter.promoted"] == [good.name]


def test_delete_refuses_the_active_version_and_removes_files(sqlite_store, tmp_path: Path) -> None:
    registry = AdapterRegistry(sqlite_store, tmp_path / "adapters")
    first, second = _register(registry, tmp_path, "a"), _register(registry, tmp_path, "b")
    registry.promote(second.id, actor="admin")
    with pytest.raises(StoreError, match="is active"):
        registry.delete(second.id, actor="admin")
    assert Path(second.path).exists()
    registry.delete(first.id, actor="admin")
    assert not Path(first.path).exists()
    assert [a.id for a in sqlite_store.list_adapters()] == [second.id]


def test_a_row_pointing_outside_the_store_is_refused(sqlite_store, tmp_path: Path) -> None:
    registry = AdapterRegistry(sqlite_store, tmp_path / "adapters")
    outside = _checkpoint(tmp_path / "elsewhere", "z")
    row = sqlite_store.add_adapter(name="planted", path=str(outside), base_model="tiny", data_hash="h",
                                   eval_scores={}, eval_passed=True)
    with pytest.raises(AdapterPathError):
        registry.promote(row.id, actor="admin")
    with pytest.raises(AdapterPathError):
        registry.delete(row.id, actor="admin")
    assert outside.exists() and sqlite_store.active_adapter() is None


def test_a_redis_failure_after_activation_keeps_the_activation(sqlite_store, redis_server, tmp_path: Path) -> None:
    import redis

    client = redis.Redis.from_url(redis_server.url, socket_connect_timeout=2, socket_timeout=2)
    registry = AdapterRegistry(sqlite_store, tmp_path / "adapters", client)
    first, second = _register(registry, tmp_path, "a"), _register(registry, tmp_path, "b")
    registry.promote(first.id, actor="admin")
    redis_server.stop()
    try:
        assert registry.promote(second.id, actor="admin").id == second.id
        assert registry.rollback(first.id, actor="admin").id == first.id
        assert sqlite_store.active_adapter().id == first.id, "the store is the truth; workers sync from it"
    finally:
        client.close()
