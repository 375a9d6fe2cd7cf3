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


# --- hardening (issue 11) --------------------------------------------------------------------------


def test_csv_export_neutralises_formula_cells_and_import_keeps_text(sqlite_store: Store) -> None:
    formulas = ['=HYPERLINK("http://x","y")', "+cmd|' /C calc'!A0", "-2+3", "@SUM(1+1)", "\tx", "\rx"]
    sqlite_store.add_pairs([{"kind": "faq", "instruction": f"q{i}?", "output": f} for i, f in enumerate(formulas)])
    import csv
    import io

    cells = [row["output"] for row in csv.DictReader(io.StringIO(export_pairs(sqlite_store, "csv").decode()))]
    assert all(c.startswith("'") for c in cells), cells
    report = parse_pairs(json.dumps([{"instruction": "q", "output": "=1+1"}]).encode(), "x.json")
    assert report.rows[0]["output"] == "=1+1"


def test_nul_escape_and_lone_surrogate_are_refused_per_field(sqlite_store: Store) -> None:
    for text in ('[{"instruction": "a\\u0000b", "output": "x"}]', '[{"instruction": "a", "output": "\\ud800"}]'):
        report = parse_pairs(text.encode(), "x.json")
        assert not report.ok
        assert "NUL" in report.summary() or "surrogate" in report.summary()


@pytest.mark.parametrize("char", ["\u2028", "\u2029", "\u0085"])
def test_jsonl_round_trip_with_unicode_line_separators(sqlite_store: Store, char: str) -> None:
    sqlite_store.add_pairs([{"kind": "faq", "instruction": f"a{char}b?", "output": f"c{char}d"}])
    before = _snapshot(sqlite_store)
    again = parse_pairs(export_pairs(sqlite_store, "jsonl"), "x.jsonl")
    assert again.ok, again.summary()
    import_pairs(sqlite_store, again, replace=True)
    assert _snapshot(sqlite_store) == before


def test_import_stops_at_max_pairs_plus_one_and_caps_the_report() -> None:
    from personabot.core.pairs_io import MAX_REPORTED_ERRORS

    many = "\n".join(json.dumps({"instruction": f"q{i}", "output": "a"}) for i in range(100_000))
    report = parse_pairs(many.encode(), "x.jsonl")
    assert len(report.rows) == 5001 and report.truncated
    bad = "\n".join("{bad" for _ in range(100_000))
    report = parse_pairs(bad.encode(), "x.jsonl")
    assert len(report.errors) <= MAX_REPORTED_ERRORS + 2 and len(report.summary()) < 5000
    huge = json.dumps([{"instruction": "q", "output": "a", "kind": "x" * 5_000_000}]).encode()
    assert len(parse_pairs(huge, "x.json").summary()) < 1000


def test_duplicate_json_keys_and_csv_headers_are_reported() -> None:
    report = parse_pairs(b'[{"instruction": "a", "output": "b", "output": "c"}]', "x.json")
    assert "more than once" in report.summary()
    report = parse_pairs(b"instruction,output,output\na,b,c\n", "x.csv")
    assert "more than once" in report.summary()


def test_unterminated_csv_quote_says_so_and_where() -> None:
    report = parse_pairs(b'instruction,output\na,b\nc,"d\n', "x.csv")
    assert "unterminated quote" in report.summary() and "line 3" in report.summary()


def test_pair_search_treats_percent_and_underscore_literally(sqlite_store: Store) -> None:
    sqlite_store.add_pairs([{"kind": "faq", "instruction": "100% sure?", "output": "yes"},
                            {"kind": "faq", "instruction": "a_b?", "output": "no"},
                            {"kind": "faq", "instruction": "axb?", "output": "no"}])
    assert [p.instruction for p in sqlite_store.list_pairs(search="%")] == ["100% sure?"]
    assert [p.instruction for p in sqlite_store.list_pairs(search="a_b")] == ["a_b?"]


def test_audit_log_holds_no_password_hash(sqlite_store: Store) -> None:
    sqlite_store.set_config("admin_password_hash", "scrypt$secret-hash")
    assert "secret-hash" not in str([e.detail for e in sqlite_store.list_audit()])
