"""Import/export of persona pairs: every format round-trips; bad input changes nothing."""

from __future__ import annotations

import json

import pytest

from personabot.core.pairs_io import PairImportError, export_pairs, import_pairs, parse_pairs
from personabot.core.settings import load_settings
from personabot.core.store import Store

SEEDS = [
    {"instruction": "你是谁?", "input": "", "output": "我是{name}, 由{author}开发。"},
    {"instruction": "Who are you?", "input": "", "output": "I am {name}, made by {author}."},
]


def _snapshot(store: Store) -> list[tuple]:
    return [(p.kind, p.instruction, p.input, p.output, p.enabled) for p in store.list_pairs()]


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "messages"])
def test_round_trip_every_format(store: Store, fmt: str) -> None:
    report = parse_pairs(json.dumps(SEEDS, ensure_ascii=False).encode(), "seeds.json")
    assert report.ok, report.summary()
    import_pairs(store, report)
    store.add_pairs([{"kind": "faq", "instruction": "Price?", "output": "Free.", "enabled": False}])
    before = _snapshot(store)
    data = export_pairs(store, fmt)
    filename = {"json": "x.json", "jsonl": "x.jsonl", "csv": "x.csv", "messages": "x.json"}[fmt]
    again = parse_pairs(data, filename, fmt=fmt)
    assert again.ok, again.summary()
    import_pairs(store, again, replace=True)
    assert _snapshot(store) == before


def test_seeds_alpaca_file_and_sharegpt_and_openai_rows(sqlite_store: Store) -> None:
    lines = [
        json.dumps({"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}),
        json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "Name?"},
                                 {"role": "assistant", "content": "{name}."}], "kind": "faq"}),
    ]
    report = parse_pairs("\n".join(lines).encode(), "chat.jsonl")
    assert report.ok, report.summary()
    assert [(r["kind"], r["instruction"]) for r in report.rows] == [("identity", "Hi?"), ("faq", "Name?")]


BAD_CASES = {
    "malformed json": (b'[{"instruction": "a", "output": "b"', "bad.json", "not valid JSON"),
    "not a list": (b'{"instruction": "a"}', "bad.json", "must hold a list"),
    "wrong encoding": ("[{\"instruction\": \"café\", \"output\": \"x\"}]".encode("latin-1"), "bad.json", "not UTF-8"),
    "missing output": (b'[{"instruction": "a"}]', "bad.json", "row 1: output is missing or empty"),
    "empty instruction": (b'[{"instruction": "  ", "output": "b"}]', "bad.json", "row 1: instruction is missing"),
    "wrong type": (b'[{"instruction": 5, "output": "b"}]', "bad.json", "instruction must be text"),
    "bad kind": (b'[{"instruction": "a", "output": "b", "kind": "chit"}]', "bad.json", "kind 'chit'"),
    "duplicate": (b'[{"instruction": "Who?", "output": "b"}, {"instruction": "who", "output": "b"}]', "bad.json",
                  "row 2: duplicates row 1"),
    "contradiction": (b'[{"instruction": "Who?", "output": "b"}, {"instruction": "Who?", "output": "c"}]',
                      "bad.json", "row 2: contradicts row 1"),
    "bad jsonl line": (b'{"instruction": "a", "output": "b"}\n{oops\n', "bad.jsonl", "row 2: is not valid JSON"),
    "csv without header": (b"a,b\n", "bad.csv", "header row"),
    "csv extra cells": (b"instruction,output\na,b,c\n", "bad.csv", "row 1: has more cells"),
    "multi-turn": (json.dumps([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                             {"role": "user", "content": "c"},
                                             {"role": "assistant", "content": "d"}]}]).encode(),
                   "bad.json", "split multi-turn"),
    "unknown format": (b"hello", "notes.txt", "cannot tell the format"),
    "empty file": (b"[]", "empty.json", "holds no pairs"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_reports_and_changes_nothing(store: Store, case: str) -> None:
    store.add_pairs(SEEDS)
    before = _snapshot(store)
    data, filename, expected = BAD_CASES[case]
    report = parse_pairs(data, filename, store=store)
    assert not report.ok
    assert expected in report.summary()
    with pytest.raises(PairImportError, match="nothing imported|no pairs"):
        import_pairs(store, report)
    assert _snapshot(store) == before


def test_limits_come_from_settings(sqlite_store: Store) -> None:
    settings = load_settings(max_instruction_chars=5, max_output_chars=3, max_pairs=1)
    report = parse_pairs(json.dumps([{"instruction": "too long", "output": "abcd"},
                                     {"instruction": "ok", "output": "a"},
                                     {"instruction": "ok2", "output": "b"}]).encode(), "x.json", settings)
    text = report.summary()
    assert "row 1: question has 8 characters" in text and "PERSONABOT_MAX_INSTRUCTION_CHARS" in text
    assert "over the limit of 1 (PERSONABOT_MAX_PAIRS)" in text


def test_conflicts_with_stored_pairs(store: Store) -> None:
    store.add_pairs(SEEDS)
    clash = [{"instruction": "Who are you?", "output": "Someone else."},
             {"instruction": "你是谁?", "output": "我是{name}, 由{author}开发。"}]
    report = parse_pairs(json.dumps(clash, ensure_ascii=False).encode(), "x.json", store=store)
    assert "row 1: contradicts stored pair" in report.summary()
    assert "row 2: already stored" in report.summary()
    # With replace the same file is acceptable and replaces everything in one transaction.
    replace = parse_pairs(json.dumps(clash[:1]).encode(), "x.json", store=store, replace=True)
    import_pairs(store, replace, replace=True)
    assert [p.output for p in store.list_pairs()] == ["Someone else."]


def test_malformed_csv_nested_json_and_nul_bytes_are_reported(sqlite_store: Store) -> None:
    import csv

    huge = b"instruction,output\n\"" + b"x" * (csv.field_size_limit() + 10) + b"\",y\n"
    assert "the CSV is malformed" in parse_pairs(huge, "big.csv").summary()
    deep = b"[" * 100_000 + b"]" * 100_000
    assert "nested too deeply" in parse_pairs(deep, "deep.json").summary()
    nul = b'[{"instruction": "a\\u0000b", "output": "x"}]'
    assert "NUL" in parse_pairs(nul.replace(b"\\u0000", b"\x00"), "nul.json").summary()


def test_import_rechecks_the_store_at_save_time(store: Store) -> None:
    """A report checked with replace, or before another admin's edit, cannot slip past the store."""
    store.add_pairs(SEEDS)
    clash = json.dumps([{"instruction": "who are you", "output": "Someone else."}]).encode()
    checked_with_replace = parse_pairs(clash, "x.json", store=store, replace=True)
    assert checked_with_replace.ok
    with pytest.raises(PairImportError, match="contradicts stored pair"):
        import_pairs(store, checked_with_replace, replace=False)
    fresh = parse_pairs(json.dumps([{"instruction": "New?", "output": "a"}]).encode(), "x.json", store=store)
    assert fresh.ok
    store.add_pairs([{"kind": "identity", "instruction": "new", "output": "b"}])  # another admin, meanwhile
    with pytest.raises(PairImportError, match="contradicts stored pair"):
        import_pairs(store, fresh)
    assert len(store.list_pairs()) == 3
