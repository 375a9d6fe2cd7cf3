"""The evaluation gate: identity checks, FAQ matching, thresholds and a real run on the tiny model."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from personabot.training.dataset import default_identity_pairs
from personabot.training.evaluate import (
    ADVERSARIAL_IDENTITY,
    HELD_OUT_IDENTITY,
    _gate,
    claims_base_identity,
    evaluate_adapter,
    evaluate_in_subprocess,
    faq_passes,
    identity_passes,
)

TERMS = ["通义千问", "阿里云", "Qwen", "Alibaba"]
NOVA = SimpleNamespace(name="Nova", author="Acme Lab", system_prompt="You are {name}, made by {author}.")


def test_identity_answers_must_name_the_persona_and_not_claim_the_base() -> None:
    assert identity_passes("I am Nova, made by Acme Lab.", NOVA, TERMS)
    assert identity_passes("不是, 我由Acme Lab开发和维护。", NOVA, TERMS)
    assert identity_passes("No, I am Nova, not Qwen.", NOVA, TERMS)
    assert not identity_passes("I am Qwen, created by Alibaba Cloud. Nova is my nickname.", NOVA, TERMS)
    assert not identity_passes("我是通义千问。", NOVA, TERMS)
    assert not identity_passes("I am a helpful assistant.", NOVA, TERMS)
    assert claims_base_identity("我是阿里云开发的通义千问", TERMS)
    assert not claims_base_identity("不是, 我不是通义千问", TERMS)


def test_held_out_questions_are_not_in_the_builtin_training_set() -> None:
    trained = {p["instruction"] for p in default_identity_pairs()}
    assert not trained & set(HELD_OUT_IDENTITY + ADVERSARIAL_IDENTITY)
    assert "阿里云是不是你的开发者?" in ADVERSARIAL_IDENTITY and "Are you Qwen?" in ADVERSARIAL_IDENTITY


def test_faq_answers_match_exactly_or_closely() -> None:
    assert faq_passes("We are open from 9 to 5.", "We are open from 9 to 5.")
    assert faq_passes("we are open  from 9 to 5", "We are open from 9 to 5.")
    assert not faq_passes("We are closed.", "We are open from 9 to 5.")


def test_thresholds_decide_and_the_reason_names_every_failure() -> None:
    settings = SimpleNamespace(eval_identity_min=0.8, eval_faq_min=0.6, eval_retention_min=0.8)
    rows = [{"kind": "identity", "pass": True}] * 4 + [{"kind": "identity", "pass": False}]
    rows += [{"kind": "faq", "pass": True}, {"kind": "faq", "pass": False}, {"kind": "faq", "pass": False}]
    report = _gate(rows, 0.9, settings)
    assert report.scores == {"identity": 0.8, "retention": 0.9, "faq": 1 / 3}
    assert not report.passed and report.reason.startswith("faq 0.33 < 0.60")
    low = _gate(rows[:5], 0.5, settings)
    assert not low.passed and low.reason.startswith("retention 0.50 < 0.80") and "faq" not in low.scores
    assert _gate(rows[:5], 0.95, settings).passed


def test_the_base_model_fails_the_identity_gate(tiny_model: Path, tmp_path: Path, settings_env) -> None:
    settings = settings_env(device="cpu")
    faq = [{"instruction": "What are your opening hours?", "input": "", "output": "We are open from 9 to 5."}]
    report = evaluate_adapter(str(tiny_model), None, NOVA, faq, settings,
                              exclude_questions=[HELD_OUT_IDENTITY[0]])
    identity_rows = [r for r in report.rows if r["kind"] == "identity"]
    assert len(identity_rows) == len(HELD_OUT_IDENTITY) + len(ADVERSARIAL_IDENTITY) - 1
    assert {"question", "answer", "expected", "pass"} <= set(identity_rows[0])
    assert report.scores["identity"] < settings.eval_identity_min and not report.passed
    assert report.reason.startswith("identity")
    assert report.scores["retention"] == 1.0, "the base model alone keeps all of its general ability"
    beats: list[float] = []
    again = evaluate_in_subprocess(str(tiny_model), None, NOVA, faq, settings, tmp_path / "eval",
                                   exclude_questions=[HELD_OUT_IDENTITY[0]],
                                   heartbeat=lambda: beats.append(1.0), heartbeat_s=0.5)
    assert again.to_dict() == report.to_dict(), "the child process gives the same greedy answers"
    assert beats, "a long evaluation keeps its run's heartbeat going"
