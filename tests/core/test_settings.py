"""Settings: defaults, one-line errors that name the variable, .env.example in sync."""

from __future__ import annotations

from pathlib import Path

import pytest

from personabot.core.env_example import render
from personabot.core.settings import SettingsError


def test_defaults(settings_env) -> None:  # type: ignore[no-untyped-def]
    settings = settings_env()
    assert settings.model == "Qwen/Qwen2.5-7B-Instruct"
    assert settings.general_data == ["AI-ModelScope/alpaca-gpt4-data-zh#500",
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
    assert settings.general_data == ["a/b#10", "/data/x.jsonl"]
    assert settings.allow_users == [1, 2]
    assert settings.telegram_token is None
    assert settings.db_url == "postgresql+psycopg://u@h/db"


@pytest.mark.parametrize(("var", "value", "expected"), [
    ("PERSONABOT_REDIS_URL", "http://localhost", "PERSONABOT_REDIS_URL: Value error, must start with redis://"),
    ("PERSONABOT_TEMPERATURE", "5", "PERSONABOT_TEMPERATURE: Input should be less than or equal to 2"),
    ("PERSONABOT_RETRAIN_CRON", "every day", "PERSONABOT_RETRAIN_CRON: Value error, is not a 5-field cron"),
    ("PERSONABOT_DEVICE", "tpu", "PERSONABOT_DEVICE: Input should be 'auto', 'cuda' or 'cpu'"),
    ("PERSONABOT_MAX_BATCH", "many", "PERSONABOT_MAX_BATCH: Input should be a valid integer"),
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
