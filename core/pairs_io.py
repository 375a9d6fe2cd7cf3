"""Import and export persona pairs: Alpaca JSON, JSONL, CSV and messages-style (ShareGPT/OpenAI).

Parsing never writes: `parse_pairs` returns an `ImportReport` with every valid row and a per-row
error list; `import_pairs` saves a clean report in one transaction or raises without a change.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from personabot.core.models import PAIR_KINDS
from personabot.core.store_errors import StoreError

if TYPE_CHECKING:
    from personabot.core.settings import Settings
    from personabot.core.store import Store

FORMATS = ("json", "jsonl", "csv", "messages")
_USER_ROLES = {"user", "human"}
_ASSISTANT_ROLES = {"assistant", "gpt", "bot", "model"}
_SYSTEM_ROLES = {"system"}


class PairError(StoreError):
    """One pair breaks an import rule; the message names the problem and the fix."""


class PairImportError(ValueError):
    """An import was refused; `.report` holds the per-row errors. Nothing was saved."""

    def __init__(self, report: ImportReport) -> None:
        self.report = report
        super().__init__(report.summary())


@dataclass(frozen=True)
class RowError:
    row: int  # 1-based row (line for JSONL/CSV data rows, element for JSON); 0 = the whole file
    message: str

    def __str__(self) -> str:
        return f"row {self.row}: {self.message}" if self.row else self.message


@dataclass
class ImportReport:
    format: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    errors: list[RowError] = field(default_factory=list)
    source_rows: list[int] = field(default_factory=list)  # source row number of each valid row
    limits: Limits | None = None
    truncated: bool = False  # parsing stopped early (over the pair limit or too many problems)

    @property
    def ok(self) -> bool:
        return not self.errors and bool(self.rows)

    def summary(self) -> str:
        if not self.errors and not self.rows:
            return "the file holds no pairs; nothing to import"
        if not self.errors:
            return f"{len(self.rows)} pairs ready to import ({self.format})"
        shown = "; ".join(str(e) for e in self.errors[:10])
        more = f" (and {len(self.errors) - 10} more)" if len(self.errors) > 10 else ""
        if self.truncated:
            more += "; parsing stopped early (over the pair limit or too many problems)"
        return f"{len(self.errors)} problems, nothing imported: {shown}{more}"


@dataclass(frozen=True)
class Limits:
    max_pairs: int = 5000
    max_instruction_chars: int = 2000
    max_output_chars: int = 8000

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(settings.max_pairs, settings.max_instruction_chars, settings.max_output_chars)


MAX_REPORTED_ERRORS = 200
_ECHO_CHARS = 40
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _echo(value: Any) -> str:
    """A value for an error message, cut to a few characters."""
    text = repr(value)
    return text if len(text) <= _ECHO_CHARS else text[:_ECHO_CHARS] + f"... ({len(text)} characters)"


def csv_cell(value: Any) -> Any:
    """OWASP's CSV-injection rule: a text cell starting with = + - @ tab or CR gets a leading '."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def _check_text(key: str, value: str) -> None:
    if "\x00" in value:
        raise ValueError(f"{key} holds a NUL character (\\u0000); remove it")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"{key} holds a lone surrogate (U+{ord(value[error.start]):04X}) at character {error.start}; "
            "it is not valid Unicode, remove it"
        ) from None


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"key {dupes[0]!r} appears more than once in one object; keep one")
    return dict(pairs)


def _loads(text: str) -> Any:
    return json.loads(text, object_pairs_hook=_no_duplicate_keys)


def question_key(instruction: str, input_: str = "") -> str:
    """Normalised question for duplicate detection: case, spacing and end punctuation ignored."""
    text = f"{instruction}\n{input_}".casefold()
    text = re.sub(r"\s+", " ", text).strip()
    return text.rstrip("?？!！。.,， ")


def _decode(data: bytes) -> str:
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"the file is not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}); "
            "save it as UTF-8 and import again"
        ) from None


def detect_format(filename: str, text: str) -> str:
    name = filename.lower()
    if name.endswith(".csv"):
        return "csv"
    if name.endswith(".jsonl") or name.endswith(".ndjson"):
        return "jsonl"
    if name.endswith(".json"):
        return "json"
    stripped = text.lstrip()
    if stripped.startswith("["):
        return "json"
    if stripped.startswith("{"):
        return "jsonl"
    raise ValueError(f"cannot tell the format of {filename!r}; use .json, .jsonl or .csv")


def _from_messages(item: dict[str, Any]) -> dict[str, Any]:
    """A ShareGPT ({"conversations": [{"from", "value"}]}) or OpenAI ({"messages": [...]}) row."""
    turns = item.get("messages", item.get("conversations"))
    if not isinstance(turns, list):
        raise ValueError("'messages' (or 'conversations') must be a list of turns")
    users, assistants = [], []
    for turn in turns:
        if not isinstance(turn, dict):
            raise ValueError("each turn must be an object with role/content (or from/value)")
        role = str(turn.get("role", turn.get("from", ""))).lower()
        content = turn.get("content", turn.get("value"))
        if role in _SYSTEM_ROLES:
            continue
        if not isinstance(content, str):
            raise ValueError(f"a {role or 'turn'} turn has no text content")
        if role in _USER_ROLES:
            users.append(content)
        elif role in _ASSISTANT_ROLES:
            assistants.append(content)
        else:
            raise ValueError(f"unknown role {role!r}; use user/assistant (or human/gpt)")
    if len(users) != 1 or len(assistants) != 1:
        raise ValueError(
            f"has {len(users)} user and {len(assistants)} assistant turns; a pair is one question and "
            "one answer — split multi-turn conversations into single pairs"
        )
    row = {"instruction": users[0], "input": "", "output": assistants[0]}
    for key in ("kind", "enabled"):
        if key in item:
            row[key] = item[key]
    return row


def _unterminated_quote(text: str) -> str | None:
    """Where an unterminated CSV quote starts (line number), or None when every quote closes."""
    inside, start, line = False, 0, 1
    for index, char in enumerate(text):
        if char == "\n":
            line += 1
        elif char == '"':
            if not inside:
                inside, start = True, line
            elif index + 1 < len(text) and text[index + 1] == '"':
                continue
            else:
                inside = False
    return None if not inside else f"line {start}"


def _iter_items(fmt: str, text: str, cap: int) -> list[tuple[int, Any]]:
    """Numbered items, at most `cap` of them (the caller knows more means over the limit)."""
    if fmt == "csv":
        where = _unterminated_quote(text)
        if where is not None:
            raise ValueError(f"the CSV has an unterminated quote starting at {where}; close the quoted cell")
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if not reader.fieldnames or "instruction" not in reader.fieldnames or "output" not in reader.fieldnames:
            raise ValueError("the CSV needs a header row with at least 'instruction' and 'output' columns")
        headers = [h for h in reader.fieldnames if h]
        dupes = sorted({h for h in headers if headers.count(h) > 1})
        if dupes:
            raise ValueError(f"the CSV header names the column {dupes[0]!r} more than once; keep one")
        items: list[tuple[int, Any]] = []
        for number, record in enumerate(reader, start=1):
            if len(items) >= cap:
                break
            if None in record:
                items.append((number, ValueError("has more cells than the header has columns")))
                continue
            items.append((number, dict(record)))
        return items
    if fmt == "jsonl":
        items = []
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            if len(items) >= cap:
                break
            try:
                items.append((number, _loads(line)))
            except json.JSONDecodeError as error:
                items.append((number, ValueError(f"is not valid JSON ({error.msg} at column {error.colno})")))
            except ValueError as error:
                items.append((number, error))
        return items
    try:
        data = _loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"the file is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}"
        ) from None
    if not isinstance(data, list):
        raise ValueError("a .json file must hold a list of pairs, e.g. [{\"instruction\": ..., \"output\": ...}]")
    return list(enumerate(data[:cap], start=1))


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("", "1", "true", "yes", "y"):
        return True
    if text in ("0", "false", "no", "n"):
        return False
    raise ValueError(f"enabled must be true or false, not {_echo(value)}")


def _normalise(item: Any, default_kind: str, limits: Limits) -> dict[str, Any]:
    if isinstance(item, Exception):
        raise item
    if not isinstance(item, dict):
        raise ValueError("must be an object with instruction/output (or messages)")
    if "messages" in item or "conversations" in item:
        item = _from_messages(item)
    row: dict[str, Any] = {}
    for key in ("instruction", "input", "output"):
        value = item.get(key, "")
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise ValueError(f"{key} must be text, not {type(value).__name__}")
        _check_text(key, value)
        row[key] = value.strip()
    if not row["instruction"]:
        raise ValueError("instruction is missing or empty")
    if not row["output"]:
        raise ValueError("output is missing or empty")
    if len(row["instruction"]) + len(row["input"]) > limits.max_instruction_chars:
        raise ValueError(
            f"question has {len(row['instruction']) + len(row['input'])} characters, over the limit of "
            f"{limits.max_instruction_chars} (PERSONABOT_MAX_INSTRUCTION_CHARS)"
        )
    if len(row["output"]) > limits.max_output_chars:
        raise ValueError(
            f"output has {len(row['output'])} characters, over the limit of {limits.max_output_chars} "
            "(PERSONABOT_MAX_OUTPUT_CHARS)"
        )
    kind = str(item.get("kind") or default_kind).strip().lower()
    if kind not in PAIR_KINDS:
        raise ValueError(f"kind {_echo(kind)} is not one of {', '.join(PAIR_KINDS)}")
    row["kind"] = kind
    row["enabled"] = _to_bool(item.get("enabled", True))
    return row


def parse_pairs(
    data: bytes,
    filename: str,
    settings: Settings | None = None,
    *,
    default_kind: str = "identity",
    fmt: str | None = None,
    store: Store | None = None,
    replace: bool = False,
) -> ImportReport:
    """Parse and validate a file of pairs. Nothing is saved.

    With `store`, rows are also checked against the pairs already stored (unless `replace`):
    the same question with the same answer is a duplicate, with another answer a contradiction.
    """
    limits = Limits.from_settings(settings) if settings is not None else Limits()
    if default_kind not in PAIR_KINDS:
        raise ValueError(f"default kind {default_kind!r} is not one of {PAIR_KINDS}")
    try:
        text = _decode(data)
        if "\x00" in text:
            raise ValueError("the file contains NUL bytes, which no text field may hold; remove them")
        fmt = fmt or detect_format(filename, text)
        if fmt not in FORMATS:
            raise ValueError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
        items = _iter_items("json" if fmt == "messages" else fmt, text, limits.max_pairs + 1)
    except ValueError as error:
        return ImportReport(format=fmt or "unknown", errors=[RowError(0, str(error))], limits=limits)
    except csv.Error as error:
        return ImportReport(format="csv", errors=[RowError(0, f"the CSV is malformed ({error}); "
                                                             "check quoting and cell sizes")], limits=limits)
    except RecursionError:
        return ImportReport(format=fmt or "json", errors=[RowError(0, "the JSON is nested too deeply to be "
                                                                     "a list of pairs")], limits=limits)

    report = ImportReport(format=fmt, limits=limits, truncated=len(items) > limits.max_pairs)
    seen: dict[tuple[str, str], tuple[int, str]] = {}
    for number, item in items:
        if len(report.errors) >= MAX_REPORTED_ERRORS:
            report.truncated = True
            break
        try:
            row = _normalise(item, default_kind, limits)
        except ValueError as error:
            report.errors.append(RowError(number, str(error)))
            continue
        key = (row["kind"], question_key(row["instruction"], row["input"]))
        if key in seen:
            first, answer = seen[key]
            if answer == row["output"]:
                report.errors.append(RowError(number, f"duplicates row {first} (same question); remove one"))
            else:
                report.errors.append(RowError(
                    number, f"contradicts row {first}: same question, different answer; keep one answer"))
            continue
        seen[key] = (number, row["output"])
        report.rows.append(row)
        report.source_rows.append(number)

    if len(items) > limits.max_pairs and len(report.rows) <= limits.max_pairs:
        report.errors.append(RowError(0, f"the file holds more than {limits.max_pairs} pairs, over the limit of "
                                         f"{limits.max_pairs} (PERSONABOT_MAX_PAIRS)"))
    report.errors.extend(store_conflicts(report, store, replace=replace))
    report.errors.sort(key=lambda e: e.row)
    return report


def validate_pair(row: dict[str, Any], settings: Settings | None = None, *,
                  store: Store | None = None) -> dict[str, Any]:
    """Validate one pair with the import rules (limits, kind, NUL bytes; with `store`, clashes and the
    pair limit) and return it normalised; raise PairError naming the problem otherwise."""
    limits = Limits.from_settings(settings) if settings is not None else Limits()
    if any(isinstance(value, str) and "\x00" in value for value in row.values()):
        raise PairError("the pair contains NUL bytes, which no text field may hold; remove them")
    try:
        normalised = _normalise(row, str(row.get("kind") or "identity"), limits)
    except ValueError as error:
        raise PairError(str(error)) from None
    report = ImportReport(format="pair", rows=[normalised], source_rows=[1], limits=limits)
    errors = store_conflicts(report, store, replace=False)
    if errors:
        raise PairError("; ".join(error.message for error in errors))
    return normalised


def store_conflicts(report: ImportReport, store: Store | None, *, replace: bool) -> list[RowError]:
    """Rows that clash with stored pairs (unless `replace`), and the pair limit. No store = limit only.

    The same question with the same answer is a duplicate, with another answer a contradiction.
    """
    limits = report.limits or Limits()
    errors: list[RowError] = []
    if store is not None and not replace:
        existing = {(p.kind, question_key(p.instruction, p.input)): p for p in store.list_pairs()}
        for number, row in zip(report.source_rows, report.rows, strict=True):
            match = existing.get((row["kind"], question_key(row["instruction"], row["input"])))
            if match is None:
                continue
            if match.output == row["output"]:
                errors.append(RowError(number, f"already stored as pair {match.id}; remove the row"))
            else:
                errors.append(RowError(
                    number, f"contradicts stored pair {match.id} (same question, different answer); "
                    "edit that pair or import with replace"))
        total = len(existing) + len(report.rows)
    else:
        total = len(report.rows)
    if total > limits.max_pairs:
        errors.append(RowError(
            0, f"the persona would hold {total} pairs, over the limit of {limits.max_pairs} (PERSONABOT_MAX_PAIRS)"))
    return errors


def import_pairs(store: Store, report: ImportReport, *, replace: bool = False, actor: str = "system") -> list[int]:
    """Save a clean report in one transaction; raise PairImportError (store untouched) otherwise.

    The rows are checked against the store again here, with this call's `replace`: the store may
    have changed since the report was made, or it was made with another `replace`.
    """
    if not report.ok:
        raise PairImportError(report)
    conflicts = store_conflicts(report, store, replace=replace)
    if conflicts:
        report.errors.extend(conflicts)
        raise PairImportError(report)
    from personabot.core.store import StoreError

    try:
        return list(store.add_pairs(report.rows, replace=replace, actor=actor))
    except (StoreError, UnicodeError) as error:
        report.errors.append(RowError(0, str(error)))
        raise PairImportError(report) from error


def _pair_dict(pair: Any) -> dict[str, Any]:
    return {"instruction": pair.instruction, "input": pair.input, "output": pair.output,
            "kind": pair.kind, "enabled": pair.enabled}


def export_pairs(store: Store, fmt: str, *, kind: str | None = None) -> bytes:
    """Export stored pairs ({name}/{author} placeholders kept) in one of FORMATS."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    rows = [_pair_dict(p) for p in store.list_pairs(kind)]
    if fmt == "json":
        return json.dumps(rows, ensure_ascii=False, indent=2).encode("utf-8")
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    if fmt == "messages":
        out = [{"messages": [{"role": "user", "content": r["instruction"] + (f"\n{r['input']}" if r["input"] else "")},
                             {"role": "assistant", "content": r["output"]}],
                "kind": r["kind"], "enabled": r["enabled"]} for r in rows]
        return json.dumps(out, ensure_ascii=False, indent=2).encode("utf-8")
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=["instruction", "input", "output", "kind", "enabled"])
    writer.writeheader()
    writer.writerows({k: csv_cell(v) for k, v in r.items()} for r in rows)
    return buffer.getvalue().encode("utf-8")
