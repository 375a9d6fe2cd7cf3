"""Training-set building: rendering, the built-in identity set, mixing syntax and the content hash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from personabot.core.prompting import system_prompt_for
from personabot.core.train_params import TrainParams
from personabot.training.dataset import (
    EmptyPersonaError,
    build_training_set,
    default_identity_pairs,
    preview_training_set,
)
from tests.training.conftest import PAIRS, PERSONA, fill_persona


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_default_identity_set_is_bilingual_and_has_negatives() -> None:
    pairs = default_identity_pairs()
    assert len(pairs) >= 60
    chinese = [p for p in pairs if any("\u4e00" <= ch <= "\u9fff" for ch in p["instruction"])]
    english = [p for p in pairs if p["instruction"].isascii()]
    assert len(chinese) >= 25 and len(english) >= 25
    by_question = {p["instruction"]: p["output"] for p in pairs}
    assert by_question["你是阿里云开发的吗?"].startswith("不是")
    assert "{author}" in by_question["你是阿里云开发的吗?"]
    assert all("{name}" in p["output"] or "{author}" in p["output"] for p in pairs)
    assert len(by_question) == len(pairs), "every built-in question is asked once"


def test_rows_are_rendered_messages_with_the_persona_system_prompt(sqlite_store, tmp_path: Path) -> None:
    fill_persona(sqlite_store)
    built = build_training_set(sqlite_store, TrainParams(min_identity_pairs=0, identity_oversample=1,
                                                         faq_oversample=1), tmp_path)
    rows = _rows(built.path)
    persona = sqlite_store.get_persona()
    assert built.system_prompt == system_prompt_for(persona) == "You are Nova, an assistant made by Acme Lab."
    assert [m["role"] for m in rows[0]["messages"]] == ["system", "user", "assistant"]
    assert {r["messages"][0]["content"] for r in rows} == {built.system_prompt}
    answers = {r["messages"][1]["content"]: r["messages"][2]["content"] for r in rows}
    assert answers["Who are you?"] == "I am Nova, made by Acme Lab."
    assert answers["你是谁?"] == "我是Nova, 由Acme Lab开发。"
    assert built.counts == {"identity": 2, "identity_default": 0, "faq": 1, "oversample": 1, "faq_oversample": 1,
                            "rows": 3,
                            "identity_base_system": 0, "general": 0}
    assert built.dataset_args == [str(built.path)]


def test_builtin_set_tops_up_and_oversampling_repeats_identity_and_faq_apart(sqlite_store, tmp_path: Path) -> None:
    fill_persona(sqlite_store)
    params = TrainParams(min_identity_pairs=10, identity_oversample=3, faq_oversample=7,
                         general_data=["AI-ModelScope/alpaca-gpt4-data-zh#500", "/data/general.jsonl#20"])
    built = build_training_set(sqlite_store, params, tmp_path)
    assert built.counts["identity"] == 2 and built.counts["identity_default"] == 8
    assert built.counts["rows"] == (2 + 8) * 3 + 1 * 7  # FAQ pairs repeat by their own count
    questions = [r["messages"][1]["content"] for r in _rows(built.path)]
    assert questions.count("What are your opening hours?") == 7 and questions.count("Who are you?") == 3
    assert built.counts["general"] == 520
    assert built.dataset_args[1:] == ["AI-ModelScope/alpaca-gpt4-data-zh#500", "/data/general.jsonl#20"]
    rendered = json.dumps(_rows(built.path), ensure_ascii=False)
    assert "{name}" not in rendered and "{author}" not in rendered and "Acme Lab" in rendered


def test_admin_question_wins_over_the_builtin_one(sqlite_store, tmp_path: Path) -> None:
    fill_persona(sqlite_store, [{"kind": "identity", "instruction": "Who are you?", "output": "Only {name}."}])
    built = build_training_set(sqlite_store, TrainParams(min_identity_pairs=80, identity_oversample=1), tmp_path)
    answers = [r["messages"][2]["content"] for r in _rows(built.path) if r["messages"][1]["content"] == "Who are you?"]
    assert answers == ["Only Nova."]


def test_same_persona_data_gives_the_same_hash(store, tmp_path: Path) -> None:
    fill_persona(store)
    params = TrainParams(min_identity_pairs=0)
    first = build_training_set(store, params, tmp_path / "a")
    second = build_training_set(store, params, tmp_path / "b")
    assert first.data_hash == second.data_hash
    assert first.path.read_bytes() == second.path.read_bytes()
    assert first.persona_hash == store.persona_hash()
    store.update_pair(store.list_pairs("faq")[0].id, output="We are open from 8 to 6.")
    third = build_training_set(store, params, tmp_path / "c")
    assert third.data_hash != first.data_hash and third.persona_hash == store.persona_hash()
    other_mix = build_training_set(store, TrainParams(min_identity_pairs=0, general_data=["a/b#5"]), tmp_path / "d")
    assert other_mix.data_hash != third.data_hash


def test_disabled_pairs_are_left_out(sqlite_store, tmp_path: Path) -> None:
    fill_persona(sqlite_store)
    faq = sqlite_store.list_pairs("faq")[0]
    sqlite_store.update_pair(faq.id, enabled=False)
    built = build_training_set(sqlite_store, TrainParams(min_identity_pairs=0), tmp_path)
    assert built.counts["faq"] == 0
    assert "opening hours" not in built.path.read_text(encoding="utf-8")


def test_empty_persona_is_refused_with_the_fix(sqlite_store, tmp_path: Path) -> None:
    sqlite_store.add_pairs(PAIRS)
    with pytest.raises(EmptyPersonaError, match="no name and no author.*Persona tab"):
        build_training_set(sqlite_store, TrainParams(), tmp_path)


def test_dataset_specs_are_checked() -> None:
    for bad in ["--dataset x", "a/b#5; rm -rf /", "relative/file.jsonl#3x", "../x.jsonl"]:
        with pytest.raises(ValueError):
            TrainParams(general_data=[bad])


def test_preview_shows_counts_mix_and_samples(sqlite_store) -> None:
    fill_persona(sqlite_store)
    params = TrainParams(min_identity_pairs=4, identity_oversample=1, faq_oversample=1, general_data=["a/b#9"])
    preview = preview_training_set(sqlite_store, params)
    assert preview["counts"]["rows"] == 5 and preview["counts"]["general"] == 9
    assert preview["persona_share"] == round(5 / 14, 4)
    assert preview["samples"][0]["messages"][0]["content"].startswith("You are Nova")
    assert preview["persona_hash"] == sqlite_store.persona_hash()
    unsampled = preview_training_set(sqlite_store, TrainParams(min_identity_pairs=0, general_data=["a/b"]))
    assert unsampled["persona_share"] is None and unsampled["general_unsampled"] == ["a/b"]


def test_default_top_up_trains_every_builtin_pair(sqlite_store, tmp_path: Path) -> None:
    """The default min_identity_pairs covers the whole built-in set (it was 60 of 62)."""
    sqlite_store.update_persona(**PERSONA, actor="admin")
    built = build_training_set(sqlite_store, TrainParams(), tmp_path)
    assert built.counts["identity_default"] == len(default_identity_pairs()) == 62


def test_every_second_identity_copy_is_asked_under_the_base_models_own_system_prompt(
        sqlite_store, tmp_path: Path, tiny_model: Path) -> None:
    """A request without the persona's prompt is answered under the template's default one: train there too."""
    from personabot.training.dataset import template_default_system

    fill_persona(sqlite_store)
    base_system = template_default_system(tiny_model)
    assert base_system == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    assert template_default_system(tmp_path / "no-model") is None
    params = TrainParams(min_identity_pairs=0, identity_oversample=3, faq_oversample=3)
    built = build_training_set(sqlite_store, params, tmp_path, base_system=base_system)
    systems = [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in _rows(built.path)]
    persona_prompt = "You are Nova, an assistant made by Acme Lab."
    assert systems.count((base_system, "Who are you?")) == 1 and systems.count((persona_prompt, "Who are you?")) == 2
    assert {s for s, q in systems if q == "What are your opening hours?"} == {persona_prompt}  # FAQ: persona only
    assert built.counts["identity_base_system"] == 2 and built.counts["rows"] == 9
    assert build_training_set(sqlite_store, params, tmp_path / "plain").counts["identity_base_system"] == 0
