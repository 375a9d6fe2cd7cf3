"""Store behaviour on SQLite and PostgreSQL: persona, pairs, the run lock, one active adapter."""

from __future__ import annotations

import pytest

from personabot.core.store import NotFoundError, RunLockedError, Store, StoreError


def test_migrations_are_idempotent(store: Store) -> None:
    assert store.schema_version() == store.migrate()
    again = Store(store.url)
    assert again.schema_version() == store.schema_version()
    again.close()


def test_persona_update_is_audited(store: Store) -> None:
    store.update_persona(name="Nova", author="Acme Lab", actor="alice")
    persona = store.get_persona()
    assert (persona.name, persona.author) == ("Nova", "Acme Lab")
    entry = store.list_audit(1)[0]
    assert entry.actor == "alice" and entry.action == "persona.update"
    assert entry.detail["name"] == {"from": "", "to": "Nova"}


def test_pairs_add_update_delete_and_search(store: Store) -> None:
    ids = store.add_pairs([
        {"kind": "identity", "instruction": "Who are you?", "output": "I am {name}."},
        {"kind": "faq", "instruction": "Opening hours?", "output": "9 to 5."},
    ])
    assert len(store.list_pairs()) == 2
    assert [p.instruction for p in store.list_pairs(search="hours")] == ["Opening hours?"]
    store.update_pair(ids[1], enabled=False)
    assert len(store.list_pairs(enabled_only=True)) == 1
    with pytest.raises(StoreError, match="same kind and question"):
        store.add_pairs([{"kind": "identity", "instruction": "Who are you?", "output": "x"}])
    assert store.delete_pairs([ids[0]]) == 1
    with pytest.raises(NotFoundError):
        store.get_pair(ids[0])


def test_failed_batch_insert_leaves_store_unchanged(store: Store) -> None:
    store.add_pairs([{"kind": "identity", "instruction": "A?", "output": "a"}])
    with pytest.raises(StoreError):
        store.add_pairs([{"kind": "faq", "instruction": "B?", "output": "b"},
                         {"kind": "identity", "instruction": "A?", "output": "again"}])
    assert [p.instruction for p in store.list_pairs()] == ["A?"]


def test_persona_hash_tracks_enabled_data(store: Store) -> None:
    h0 = store.persona_hash()
    (pid,) = store.add_pairs([{"kind": "faq", "instruction": "Q?", "output": "A"}])
    h1 = store.persona_hash()
    assert h1 != h0
    store.update_pair(pid, enabled=False)
    assert store.persona_hash() == h0
    store.update_pair(pid, enabled=True)
    assert store.persona_hash() == h1


def test_only_one_run_can_run(store: Store) -> None:
    first = store.create_run({"epochs": 1})
    second = store.create_run({"epochs": 1})
    store.start_run(first.id, worker="w1")
    with pytest.raises(RunLockedError):
        store.start_run(second.id, worker="w2")
    store.finish_run(first.id, "succeeded")
    assert store.start_run(second.id, worker="w2").status == "running"


def test_orphaned_runs_are_failed_with_reason(store: Store) -> None:
    run = store.create_run({})
    store.start_run(run.id, worker="dead-worker")
    assert store.fail_orphaned_runs(worker="dead-worker") == [run.id]
    run = store.get_run(run.id)
    assert run.status == "failed" and "stopped" in run.error


def test_cancel_queued_run(store: Store) -> None:
    run = store.create_run({})
    assert store.request_cancel(run.id).status == "cancelled"
    with pytest.raises(StoreError, match="already ended"):
        store.request_cancel(run.id)


def test_one_active_adapter_enforced_by_database(store: Store) -> None:
    a = store.add_adapter(name="v1", path="v1", base_model="m", data_hash="h", eval_scores={},
                          eval_passed=True)
    b = store.add_adapter(name="v2", path="v2", base_model="m", data_hash="h", eval_scores={},
                          eval_passed=True)
    store.set_active(a.id)
    store.set_active(b.id)
    assert store.active_adapter().name == "v2"
    # Bypass set_active: the partial unique index refuses a second active row.
    from sqlalchemy import update
    from sqlalchemy.exc import IntegrityError

    from personabot.core.models import AdapterVersion

    with pytest.raises(IntegrityError):
        with store.session() as s:
            s.execute(update(AdapterVersion).where(AdapterVersion.id == a.id).values(active=True))
    assert store.active_adapter().name == "v2"


def test_failed_adapter_cannot_be_activated_and_active_cannot_be_deleted(store: Store) -> None:
    bad = store.add_adapter(name="bad", path="bad", base_model="m", data_hash="h",
                            eval_scores={"identity": 0.1}, eval_passed=False,
                            eval_reason="identity 0.10 < 0.80")
    with pytest.raises(StoreError, match="failed its evaluation"):
        store.set_active(bad.id)
    good = store.add_adapter(name="good", path="good", base_model="m", data_hash="h",
                             eval_scores={}, eval_passed=True)
    store.set_active(good.id)
    with pytest.raises(StoreError, match="is active"):
        store.delete_adapter(good.id)
    store.delete_adapter(bad.id)
    assert [a.name for a in store.list_adapters()] == ["good"]


def test_concurrent_activations_leave_exactly_one_active(store: Store) -> None:
    """Admins activating different versions at once: one wins, the others get a clear StoreError."""
    import threading

    ids = [store.add_adapter(name=f"c{i}", path=f"c{i}", base_model="m", data_hash="h", eval_scores={},
                             eval_passed=True).id for i in range(6)]
    errors: list[Exception] = []
    barrier = threading.Barrier(len(ids))

    def activate(adapter_id: int) -> None:
        other = Store(store.url, migrate=False)
        barrier.wait()
        try:
            other.set_active(adapter_id)
        except Exception as error:  # noqa: BLE001 - anything but a StoreError must fail the test below
            errors.append(error)
        finally:
            other.close()

    threads = [threading.Thread(target=activate, args=(i,)) for i in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    actives = [a for a in store.list_adapters() if a.active]
    assert len(actives) == 1
    assert all("at the same moment" in str(e) for e in errors)
