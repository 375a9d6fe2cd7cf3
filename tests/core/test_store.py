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


def test_base_identity_terms_derived_once_then_edited_and_audited(store: Store) -> None:
    from personabot.core.store import GateInputError

    store.update_persona(name="Nova", author="Acme Lab")
    assert store.base_identity("m") is None and store.needs_derived_terms("m")
    answers = [{"question": "Who are you?", "answer": "I am SmolLM, trained by Hugging Face."}]
    row = store.record_derived_terms("m", ["SmolLM", "Hugging Face"], answers)
    assert row.terms == ["SmolLM", "Hugging Face"] and row.self_answers == answers
    assert not store.needs_derived_terms("m")
    store.remove_base_term("m", "hugging face", actor="alice")
    store.add_base_term("m", "  HF Assistant ", actor="alice")
    store.record_derived_terms("m", ["Other"], [])
    again = Store(store.url, migrate=False)
    try:
        stored = again.base_identity("m")
        assert stored is not None and stored.terms == ["SmolLM", "HF Assistant"] and stored.edited_by == "alice"
        assert stored.derived == ["SmolLM", "Hugging Face"]
    finally:
        again.close()
    entry = store.list_audit(1)[0]
    assert entry.actor == "alice" and entry.action == "base_terms.update"
    assert entry.detail == {"base_model": "m", "added": "HF Assistant", "from": ["SmolLM"],
                            "to": ["SmolLM", "HF Assistant"]}
    for bad, why in (("  ", "empty"), ("x" * 101, "under 100"), ("smollm", "already in the list"),
                     ("Acme", "part of the persona's author"), ("a\nb", "one term at a time")):
        with pytest.raises(GateInputError, match=why):
            store.add_base_term("m", bad)
    with pytest.raises(GateInputError, match="not in the list"):
        store.remove_base_term("m", "Qwen")
    assert store.base_identity("m").terms == ["SmolLM", "HF Assistant"]
    assert store.base_identity("other") is None


def test_terms_set_before_the_first_evaluation_are_kept_with_the_derived(store: Store) -> None:
    store.add_base_term("m", "Qwen")
    assert store.needs_derived_terms("m")
    assert store.record_derived_terms("m", ["qwen", "SmolLM"], []).terms == ["Qwen", "SmolLM"]


def test_identity_questions_add_list_delete(store: Store) -> None:
    from personabot.core.store import GateInputError

    first = store.add_identity_question(" Who runs {name}? ", actor="alice")
    second = store.add_identity_question("谁维护你?")
    assert [q.question for q in store.list_identity_questions()] == ["Who runs {name}?", "谁维护你?"]
    assert store.list_audit(2)[1].detail == {"id": first.id, "question": "Who runs {name}?"}
    for bad, why in (("", "empty"), ("who runs  {name}?", "already"), ("Who is {nmae}?", "unknown placeholder"),
                     ("?" * 501, "under 500")):
        with pytest.raises(GateInputError, match=why):
            store.add_identity_question(bad)
    with pytest.raises(NotFoundError, match="nothing was removed"):
        store.delete_identity_questions([second.id, 999])
    assert len(store.list_identity_questions()) == 2
    assert store.delete_identity_questions([first.id], actor="bob") == 1
    assert [q.question for q in store.list_identity_questions()] == ["谁维护你?"]
    assert store.list_audit(1)[0].action == "identity_questions.delete"


def test_a_version_2_database_gains_the_gate_tables(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import inspect

    from personabot.core import store as store_module

    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = store_module.MIGRATIONS
    store_module.MIGRATIONS = old[:2]
    store_module.SCHEMA_VERSION = 2
    try:
        from personabot.core.store_gate import BaseIdentity, IdentityQuestion

        first = Store(url, migrate=False)
        with first.engine.begin() as conn:
            tables = [t for t in store_module.Base.metadata.sorted_tables
                      if t.name not in (BaseIdentity.__tablename__, IdentityQuestion.__tablename__)]
            store_module.Base.metadata.create_all(conn, tables=tables)
            from sqlalchemy import insert

            conn.execute(insert(store_module.SchemaVersion).values(version=1))
            conn.execute(insert(store_module.SchemaVersion).values(version=2))
        assert not inspect(first.engine).has_table("base_identity")
        first.close()
    finally:
        store_module.MIGRATIONS = old
        store_module.SCHEMA_VERSION = len(old)
    upgraded = Store(url)
    try:
        assert upgraded.schema_version() == 3 and inspect(upgraded.engine).has_table("base_identity")
        upgraded.add_identity_question("Who are you, really?")
        assert len(upgraded.list_identity_questions()) == 1
    finally:
        upgraded.close()
