"""The gate's inputs from the store: the persona's own identity questions and the base model's edited terms."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from personabot.training.eval_checks import identity_passes
from personabot.training.evaluate import evaluate_adapter, evaluate_in_subprocess
from personabot.training.runner import TrainingCancelled
from personabot.training.service import gate_inputs, keep_derived_terms

# Names the tiny random model does produce (found by looking at its greedy answers), so some answers pass.
PERSONA = {"name": "开发和维护", "author": "用来帮助", "system_prompt": "You are {name}, made by {author}."}
ADDED = "用户回答问题"  # in many of its answers
DERIVED = "通义千问"  # in others


def test_first_evaluation_derives_terms_and_asks_the_personas_questions(tiny_model: Path, tmp_path: Path,
                                                                        settings_env, sqlite_store) -> None:
    settings = settings_env(device="cpu", model=str(tiny_model), base_identity_terms="Zorblax",
                            eval_identity_questions="Who is the default question for?")
    store = sqlite_store
    store.update_persona(**PERSONA)
    store.add_identity_question("Who runs {name}?", actor="admin")
    inputs = gate_inputs(store, settings)
    assert inputs == {"identity_questions": ["Who runs {name}?"], "base_terms": [], "derive_terms": True}

    persona = SimpleNamespace(**PERSONA)
    report = evaluate_in_subprocess(str(tiny_model), None, persona, [], settings, tmp_path / "eval", **inputs)
    request = json.loads((tmp_path / "eval" / "eval_request.json").read_text(encoding="utf-8"))
    assert request["identity_questions"] == ["Who runs {name}?"] and request["derive_terms"] is True
    admin_rows = [r for r in report.rows if r.get("set") == "admin"]
    assert [(r["question"], r["system"]) for r in admin_rows] == [("Who runs 开发和维护?", "persona"),
                                                                 ("Who runs 开发和维护?", "none")]
    assert any(r.get("set") == "held-out" for r in report.rows), "the built-in set is still asked"
    said = report.scores["base_self_answers"]
    assert [a["question"] for a in said] == ["Who are you?", "Who created you?", "你是谁?"]

    keep_derived_terms(store, settings, report)
    stored = store.base_identity(str(tiny_model))
    assert stored is not None and stored.self_answers == said
    assert stored.derived == report.scores["derived_identity_terms"]
    assert gate_inputs(store, settings)["derive_terms"] is False, "derived once, then reused"

    store.delete_identity_questions([q.id for q in store.list_identity_questions()])
    with pytest.raises(TrainingCancelled):
        evaluate_in_subprocess(str(tiny_model), None, persona, [], settings, tmp_path / "default",
                               should_cancel=lambda: True, **gate_inputs(store, settings))
    request = json.loads((tmp_path / "default" / "eval_request.json").read_text(encoding="utf-8"))
    assert request["identity_questions"] == ["Who is the default question for?"], "no own questions: the default"


def test_the_gate_uses_the_admins_edited_terms(tiny_model: Path, settings_env, sqlite_store) -> None:
    settings = settings_env(device="cpu", model=str(tiny_model), base_identity_terms="Zorblax")
    store = sqlite_store
    store.update_persona(**PERSONA)
    store.record_derived_terms(str(tiny_model), [DERIVED], [{"question": "Who are you?", "answer": DERIVED}])
    store.remove_base_term(str(tiny_model), DERIVED, actor="admin")
    store.add_base_term(str(tiny_model), ADDED, actor="admin")
    inputs = gate_inputs(store, settings)
    assert inputs["base_terms"] == [ADDED] and inputs["derive_terms"] is False

    persona = SimpleNamespace(**PERSONA)
    report = evaluate_adapter(str(tiny_model), None, persona, [], settings, **inputs)
    assert report.scores["base_identity_terms"] == ["Zorblax", ADDED]
    assert "derived_identity_terms" not in report.scores, "the stored terms are reused, not derived again"
    rows = [r for r in report.rows if r["kind"] == "identity"]
    with_added = [r for r in rows if ADDED in r["answer"]]
    assert with_added and not any(r["pass"] for r in with_added), "an answer with the added term fails"
    only_derived = [r for r in rows if DERIVED in r["answer"] and ADDED not in r["answer"] and r["set"] != "trap"]
    passing = [r for r in only_derived if r["pass"]]
    assert passing, "an answer with the removed derived term passes"
    assert not identity_passes(passing[0]["answer"], persona, [DERIVED]), "it would fail with the term kept"
    assert any(r["question"] == f"Is {ADDED} your developer?" for r in rows)
    assert not any(DERIVED in r["question"] for r in rows if r["set"] == "trap")
