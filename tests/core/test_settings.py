"""Settings: defaults, one-line errors that name the variable, .env.example in sync."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from personabot.core.env_example import render
from personabot.core.settings import SettingsError, env_for_children
from personabot.core.train_params import DEFAULT_GENERAL_DATA, TrainParams


def test_defaults(settings_env) -> None:  # type: ignore[no-untyped-def]
    settings = settings_env()
    assert settings.model == "Qwen/Qwen2.5-7B-Instruct"
    assert settings.training.general_data == ["AI-ModelScope/alpaca-gpt4-data-zh#500",
                                              "AI-ModelScope/alpaca-gpt4-data-en#500"]
    assert settings.db_url.startswith("sqlite:///") and settings.db_url.endswith("data/personabot.db")
    assert settings.adapters_path.name == "adapters"
    assert settings.telegram_token is None and settings.admin_password is None


def test_env_values_and_lists(settings_env, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("PERSONABOT_GENERAL_DATA", "a/b#10, /data/x.jsonl")
    monkeypatch.setenv("PERSONABOT_ALLOW_USERS", "[1, 2]")
    monkeypatch.setenv("PERSONABOT_TELEGRAM_TOKEN", "")
    monkeypatch.setenv("PERSONABOT_DATABASE_URL", "postgresql://u@h/db")
    settings = settings_env()
    assert settings.training.general_data == ["a/b#10", "/data/x.jsonl"]
    assert settings.allow_users == [1, 2]
    assert settings.telegram_token is None
    assert settings.db_url == "postgresql+psycopg://u@h/db"


def test_training_defaults_are_one_typed_object(settings_env, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """Settings.training is the TrainParams a run starts from; nested names and the old flat ones both set it."""
    defaults = settings_env().training
    assert TrainParams(**defaults.model_dump()) == defaults.updated(), "same fields, same defaults"
    assert TrainParams().min_identity_pairs == defaults.min_identity_pairs and TrainParams().general_data == []
    monkeypatch.setenv("PERSONABOT_TRAINING__EPOCHS", "3")
    monkeypatch.setenv("PERSONABOT_TRAINING__GENERAL_DATA", '["a/b#1"]')
    monkeypatch.setenv("PERSONABOT_TRAIN_LORA_RANK", "16")
    monkeypatch.setenv("PERSONABOT_MIN_IDENTITY_PAIRS", "5")
    monkeypatch.setenv("PERSONABOT_TRAIN_EPOCHS", "7")  # the nested name wins over the old one
    training = settings_env().training
    assert (training.epochs, training.general_data, training.lora_rank, training.min_identity_pairs) == \
        (3, ["a/b#1"], 16, 5)
    monkeypatch.delenv("PERSONABOT_TRAINING__GENERAL_DATA")
    assert settings_env().training.general_data == list(DEFAULT_GENERAL_DATA), "a partial override keeps the mix"
    assert settings_env().training.updated(epochs=2, lora_alpha=None).model_dump() == \
        {**training.model_dump(), "epochs": 2, "general_data": list(DEFAULT_GENERAL_DATA)}


def test_children_see_the_same_training_defaults(settings_env, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("PERSONABOT_TRAIN_SPEED_MODE", "24gb")
    settings = settings_env()
    child = {key: value for key, value in env_for_children(settings).items() if key.startswith("PERSONABOT_")}
    for key in list(os.environ):
        if key.startswith("PERSONABOT_"):
            monkeypatch.delenv(key)
    for key, value in child.items():
        monkeypatch.setenv(key, value)
    assert settings_env().training == settings.training and settings.training.speed_mode == "24gb"


@pytest.mark.parametrize(("var", "value", "expected"), [
    ("PERSONABOT_REDIS_URL", "http://localhost", "PERSONABOT_REDIS_URL: Value error, must start with redis://"),
    ("PERSONABOT_TEMPERATURE", "5", "PERSONABOT_TEMPERATURE: Input should be less than or equal to 2"),
    ("PERSONABOT_RETRAIN_CRON", "every day", "PERSONABOT_RETRAIN_CRON: Value error, is not a 5-field cron"),
    ("PERSONABOT_DEVICE", "tpu", "PERSONABOT_DEVICE: Input should be 'auto', 'cuda' or 'cpu'"),
    ("PERSONABOT_MAX_BATCH", "many", "PERSONABOT_MAX_BATCH: Input should be a valid integer"),
    ("PERSONABOT_TRAINING__MIN_IDENTITY_PAIRS", "5000",
     "PERSONABOT_TRAINING__MIN_IDENTITY_PAIRS (or PERSONABOT_MIN_IDENTITY_PAIRS): Input should be less than"),
    ("PERSONABOT_TRAIN_EPOCHS", "0", "PERSONABOT_TRAINING__EPOCHS (or PERSONABOT_TRAIN_EPOCHS): Input should be"),
])
def test_bad_value_names_variable(settings_env, monkeypatch: pytest.MonkeyPatch, var: str, value: str,
                                  expected: str) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError) as info:
        settings_env()
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_secrets_are_hidden_in_repr(settings_env, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("PERSONABOT_TELEGRAM_TOKEN", "123456:SECRET-TOKEN")
    monkeypatch.setenv("PERSONABOT_ADMIN_PASSWORD", "hunter2-secret")
    settings = settings_env()
    text = repr(settings) + str(settings) + settings.model_dump_json()
    assert "SECRET-TOKEN" not in text and "hunter2-secret" not in text
    assert settings.telegram_token.get_secret_value() == "123456:SECRET-TOKEN"


def test_env_example_documents_every_setting() -> None:
    committed = (Path(__file__).resolve().parents[2] / ".env.example").read_text(encoding="utf-8")
    assert committed == render(), "regenerate: python -m personabot.core.env_example > .env.example"
