"""CLI: adapters list/promote/rollback refuse bad input with the fix; the gate table names failing items."""

from __future__ import annotations

import pytest

from personabot.cli import main
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
