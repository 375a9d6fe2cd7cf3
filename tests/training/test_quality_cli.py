"""CLI: adapters list/promote/rollback/delete work and refuse bad input with the fix; the gate table
names failing items."""

from __future__ import annotations

import pytest
import redis

from personabot.cli import main
from personabot.core import events
from personabot.core.store import Store
from personabot.training.evaluate import gate_table


def test_adapters_cli_on_an_empty_store(settings_env, capsys: pytest.CaptureFixture[str]) -> None:
    settings_env()
    assert main(["adapters", "list"]) == 0
    assert main(["adapters", "promote"]) == 2
    assert "adapters list" in capsys.readouterr().err
    assert main(["adapters", "promote", "v-missing"]) == 1
    assert "no adapter named 'v-missing'" in capsys.readouterr().err
    assert main(["adapters", "rollback"]) == 1
    assert "no earlier passing version" in capsys.readouterr().err
    assert main(["adapters", "show"]) == 2 and main(["adapters", "show", "v-missing"]) == 1


def test_gate_table_lists_the_failing_items() -> None:
    report = {"passed": False, "reason": "identity 0.50 < 0.80",
              "scores": {"identity": 0.5, "retention": 1.0, "base_identity_terms": ["OpenAI", "SmolLM"]},
              "rows": [{"kind": "identity", "set": "trap", "question": "Is OpenAI your developer?",
                        "answer": "Yes.", "pass": False},
                       {"kind": "identity", "set": "held-out", "question": "Who built you?", "answer": "Nova",
                        "pass": True}]}
    table = gate_table(report)
    assert "rejected — identity 0.50 < 0.80" in table and "Is OpenAI your developer? -> Yes." in table
    assert "Who built you?" not in table
    assert "base-identity terms: OpenAI, SmolLM" in table


def test_adapters_cli_promotes_rolls_back_step_by_step_and_deletes(settings_env, redis_server,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    settings_env()
    monkeypatch.setenv("PERSONABOT_REDIS_URL", redis_server.url)  # the CLI reads its settings afresh
    settings = settings_env()
    store = Store(settings.db_url)
    versions = {}
    for name, passed in (("v1", True), ("v2", True), ("v3-bad", False), ("v4", True)):
        (settings.adapters_path / name).mkdir(parents=True)
        versions[name] = store.add_adapter(name=name, path=name, base_model="m", data_hash="",
                                           eval_scores={"identity": 0.9}, eval_passed=passed,
                                           eval_reason="" if passed else "identity 0.10 < 0.80")
    client = redis.Redis.from_url(redis_server.url)
    try:
        def active() -> str | None:
            current = store.active_adapter()
            return current.name if current else None

        assert main(["adapters", "promote", "v4"]) == 0 and active() == "v4"
        assert "activated v4" in capsys.readouterr().out
        # A version that failed its gate never goes live; the store's reason reaches the admin.
        assert main(["adapters", "promote", "v3-bad"]) == 1 and active() == "v4"
        assert "v3-bad failed its evaluation (identity 0.10 < 0.80)" in capsys.readouterr().err
        assert main(["adapters", "rollback", "v3-bad"]) == 1 and active() == "v4"
        # Rolling back twice goes back twice (skipping the failed version), then says there is no more.
        assert main(["adapters", "rollback"]) == 0 and active() == "v2"
        assert main(["adapters", "rollback"]) == 0 and active() == "v1"
        assert "rolled back to v1" in capsys.readouterr().out
        assert main(["adapters", "rollback"]) == 1 and active() == "v1"
        assert "no earlier passing version" in capsys.readouterr().err
        assert main(["adapters", "rollback", "v4"]) == 0 and active() == "v4"
        # The chat workers were told each time (the same event the admin's buttons send).
        sent = [(e.data["action"], e.data["version"]) for e in reversed(events.recent(client, 50))
                if e.type == "adapter.promoted"]
        assert sent == [("promote", "v4"), ("rollback", "v2"), ("rollback", "v1"), ("rollback", "v4")]
        # Delete: not the active one; an inactive one goes with its files.
        assert main(["adapters", "delete", "v4"]) == 1 and active() == "v4"
        assert "is active" in capsys.readouterr().err
        assert main(["adapters", "delete", "v1"]) == 0 and store.find_adapter("v1") is None
        assert not (settings.adapters_path / "v1").exists()
        assert main(["adapters", "delete"]) == 2
    finally:
        client.close()
        store.close()


@pytest.mark.slow
def test_cli_train_prints_the_gate_table_when_the_gate_rejects(settings_env, tiny_model, redis_server,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from tests.training.conftest import fill_persona

    settings_env()
    for key, value in {"MODEL": str(tiny_model), "DEVICE": "cpu", "GPU_SHARE": "concurrent",
                       "GPU_RELEASE_WAIT_S": "0", "REDIS_URL": redis_server.url,
                       "EVAL_IDENTITY_MIN": "0.8"}.items():  # the random tiny model never names the persona
        monkeypatch.setenv(f"PERSONABOT_{key}", value)
    settings = settings_env()
    store = Store(settings.db_url)
    fill_persona(store)
    try:
        code = main(["train", "--epochs", "1", "--identity-oversample", "1", "--faq-oversample", "1",
                     "--general-data"])
        out = capsys.readouterr().out
        assert code == 1
        [run] = store.list_runs()
        assert run.status == "rejected" and f"run {run.id}: rejected — evaluation gate: identity" in out
        assert gate_table(run.metrics["eval"]) in out, "the gate's table, not only its reason"
        assert "identity   held-out     NO" in out, "the failing items are listed"
        # The same table later, from the adapter list (every item with --all).
        rejected = store.get_adapter(run.adapter_id)
        assert main(["adapters", "show", rejected.name]) == 0
        shown = capsys.readouterr().out
        assert shown.startswith(f"{rejected.name}: failed gate; run {run.id}")
        assert gate_table(run.metrics["eval"]) in shown
        assert main(["adapters", "show", rejected.name, "--all"]) == 0
        everything = capsys.readouterr().out
        assert everything.count("\n") > shown.count("\n") and " yes  " in everything
        assert store.active_adapter() is None
    finally:
        store.close()
