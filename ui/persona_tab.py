"""Persona tab: name, author, system prompt; identity/FAQ pairs; the gate's own identity questions; import,
export; training-set preview."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from personabot.core.models import PAIR_KINDS
from personabot.core.pairs_io import (
    FORMATS,
    ImportReport,
    PairImportError,
    export_pairs,
    import_pairs,
    parse_pairs,
)
from personabot.core.persona import PersonaFieldError, check_persona, refuse_clash, validate_pair
from personabot.core.prompting import render
from personabot.core.store import StoreError
from personabot.training.dataset import preview_training_set
from personabot.ui.context import AdminContext, actor, notice

PAIR_COLUMNS = ["id", "kind", "enabled", "instruction", "input", "output"]
QUESTION_COLUMNS = ["id", "question", "asked as"]
REPORT_COLUMNS = ["row", "problem"]
EXPORT_SUFFIX = {"json": ".json", "jsonl": ".jsonl", "csv": ".csv", "messages": ".messages.json"}


def preview_summary(preview: dict[str, Any]) -> str:
    """One line: rows per kind, general samples, the persona's share of the mix and its data hash."""
    counts = preview.get("counts", {})
    parts = [f"identity pairs: {counts.get('identity', 0)}"]
    if counts.get("identity_default"):
        parts.append(f"built-in identity pairs added: {counts['identity_default']}")
    parts += [f"FAQ pairs: {counts.get('faq', 0)}", f"identity oversample: x{counts.get('oversample', 1)}",
              f"FAQ oversample: x{counts.get('faq_oversample', 1)}",
              f"persona rows: {counts.get('rows', 0)}", f"general samples: {counts.get('general', 0)}"]
    share = preview.get("persona_share")
    if share is not None:
        parts.append(f"persona share of the mix: {share:.0%}")
    if preview.get("general_unsampled"):
        parts.append("all samples of: " + ", ".join(preview["general_unsampled"]))
    parts.append(f"persona hash {str(preview.get('persona_hash', ''))[:12]}")
    return notice(" · ".join(parts))


def preview_samples(preview: dict[str, Any]) -> pd.DataFrame:
    rows = []
    for sample in preview.get("samples", []):
        by_role = {m["role"]: m["content"] for m in sample.get("messages", [])}
        rows.append([by_role.get("system", ""), by_role.get("user", ""), by_role.get("assistant", "")])
    return pd.DataFrame(rows, columns=["system", "user", "assistant"])


def _cell(value: Any) -> str:
    """A table cell as text: empty for missing values (pandas gives NaN for empty cells)."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    return str(value)


class UploadError(ValueError):
    """A file that did not come through Gradio's upload, or is too large; the message says what to do."""


def read_upload(path: str, max_bytes: int) -> bytes:
    """The bytes of an uploaded file; only files inside Gradio's upload folder (resolved) are read."""
    from gradio.utils import get_upload_folder

    folder = Path(get_upload_folder()).resolve()
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(folder) or not resolved.is_file():
        raise UploadError("that file was not uploaded here; choose the file with the upload box and check again")
    size = resolved.stat().st_size
    if size > max_bytes:
        raise UploadError(f"the file has {size} bytes, over the limit of {max_bytes} (PERSONABOT_MAX_IMPORT_BYTES); "
                          "split it and import the parts")
    return resolved.read_bytes()


EXPORT_KEEP_S = 3600.0


def remove_old_exports(root: Path, keep_s: float = EXPORT_KEEP_S) -> None:
    """Delete export folders under `root` older than `keep_s` seconds."""
    now = time.time()
    for folder in root.iterdir():
        if folder.is_dir() and now - folder.stat().st_mtime > keep_s:
            shutil.rmtree(folder, ignore_errors=True)


class PersonaTab:
    """The Persona tab: its handlers call the store and `core.pairs_io`."""

    def __init__(self, ctx: AdminContext) -> None:
        self.ctx = ctx

    def load_persona(self) -> tuple[str, str, str]:
        persona = self.ctx.store.get_persona()
        return persona.name, persona.author, persona.system_prompt

    def save_persona(self, name: str, author: str, system_prompt: str,
                     request: gr.Request | None = None) -> str:
        try:
            check_persona(self.ctx.settings, name.strip(), author.strip(), system_prompt)
        except PersonaFieldError as error:
            return notice(str(error), ok=False)
        self.ctx.store.update_persona(name=name.strip(), author=author.strip(), system_prompt=system_prompt,
                                 actor=actor(request))
        return notice(f"saved; persona data hash {self.ctx.store.persona_hash()[:12]}")

    def pairs_frame(self, kind: str, search: str) -> pd.DataFrame:
        pairs = self.ctx.store.list_pairs(None if kind == "all" else kind, search=search.strip() or None)
        return pd.DataFrame([[p.id, p.kind, p.enabled, p.instruction, p.input, p.output] for p in pairs],
                            columns=PAIR_COLUMNS)

    def add_pair(self, kind: str, instruction: str, input_: str, output: str,
                 filter_kind: str, search: str, request: gr.Request | None = None) -> tuple[Any, ...]:
        try:
            row = validate_pair({"kind": kind, "instruction": instruction, "input": input_, "output": output},
                                self.ctx.settings, store=self.ctx.store)
            (pair_id,) = self.ctx.store.add_pairs([row], actor=actor(request))
        except StoreError as error:
            return notice(f"not added: {error}", ok=False), gr.skip(), instruction, input_, output
        return notice(f"added pair {pair_id}"), self.pairs_frame(filter_kind, search), "", "", ""

    def save_table_edits(self, table: pd.DataFrame, filter_kind: str, search: str,
                         request: gr.Request | None = None) -> tuple[str, pd.DataFrame]:
        """Save the cells an admin changed in the pairs table (each row validated like an import)."""
        changed, problems = 0, []
        for record in table.to_dict("records"):
            try:
                pair_id = int(float(record["id"]))
            except (TypeError, ValueError):
                problems.append("a row without an id was skipped; add new pairs with the form below")
                continue
            row: dict[str, Any] = {key: _cell(record.get(key)) for key in ("kind", "instruction", "input", "output")}
            row["enabled"] = record.get("enabled") in (True, "true", "True", 1, "1")
            try:
                stored = self.ctx.store.get_pair(pair_id)
                row = validate_pair(row, self.ctx.settings)
                refuse_clash(self.ctx.store, pair_id, row)
                fields = {key: row[key] for key in ("kind", "instruction", "input", "output", "enabled")
                          if getattr(stored, key) != row[key]}
                if fields:
                    self.ctx.store.update_pair(pair_id, actor=actor(request), **fields)
                    changed += 1
            except StoreError as error:
                problems.append(f"pair {pair_id}: {error}")
        text = f"saved {changed} changed pairs"
        if problems:
            text += f"; {len(problems)} refused: " + "; ".join(problems)
        return notice(text, ok=not problems), self.pairs_frame(filter_kind, search)

    @staticmethod
    def _parse_ids(text: str, what: str = "pair") -> list[int]:
        try:
            return [int(part) for part in text.replace(",", " ").split()]
        except ValueError:
            raise StoreError(f"{text!r} is not a list of {what} ids like '3, 7, 12'") from None

    def enable(self, ids_text: str, filter_kind: str, search: str,
               request: gr.Request | None = None) -> tuple[str, Any]:
        return self.set_enabled(ids_text, True, filter_kind, search, request)

    def disable(self, ids_text: str, filter_kind: str, search: str,
                request: gr.Request | None = None) -> tuple[str, Any]:
        return self.set_enabled(ids_text, False, filter_kind, search, request)

    def set_enabled(self, ids_text: str, enabled: bool, filter_kind: str, search: str,
                    request: gr.Request | None = None) -> tuple[str, Any]:
        try:
            ids = self._parse_ids(ids_text)
            for pair_id in ids:
                self.ctx.store.update_pair(pair_id, enabled=enabled, actor=actor(request))
        except StoreError as error:
            return notice(str(error), ok=False), gr.skip()
        word = "enabled" if enabled else "disabled"
        return notice(f"{word} {len(ids)} pairs"), self.pairs_frame(filter_kind, search)

    def delete_pairs(self, ids_text: str, filter_kind: str, search: str,
                     request: gr.Request | None = None) -> tuple[str, Any]:
        try:
            ids = self._parse_ids(ids_text)
        except StoreError as error:
            return notice(str(error), ok=False), gr.skip()
        count = self.ctx.store.delete_pairs(ids, actor=actor(request))
        return notice(f"deleted {count} pairs"), self.pairs_frame(filter_kind, search)


    # --- the gate's identity questions ---------------------------------------------------------
    def questions_frame(self) -> pd.DataFrame:
        """The persona's own identity questions, each as the gate asks it ({name}/{author} filled in)."""
        persona = self.ctx.store.get_persona()
        return pd.DataFrame([[q.id, q.question, render(q.question, name=persona.name, author=persona.author)]
                             for q in self.ctx.store.list_identity_questions()], columns=QUESTION_COLUMNS)

    def questions_note(self) -> str:
        if self.ctx.store.list_identity_questions():
            return notice("the evaluation gate asks these besides its 30 built-in questions")
        default = self.ctx.settings.eval_identity_questions
        return notice("no own questions: the gate asks its 30 built-in questions"
                      + (f" and the default {default} (PERSONABOT_EVAL_IDENTITY_QUESTIONS)" if default else ""))

    def add_question(self, question: str, request: gr.Request | None = None) -> tuple[str, Any, str]:
        try:
            row = self.ctx.store.add_identity_question(question, actor=actor(request))
        except StoreError as error:
            return notice(f"not added: {error}", ok=False), gr.skip(), question
        return notice(f"added identity question {row.id}"), self.questions_frame(), ""

    def delete_questions(self, ids_text: str, request: gr.Request | None = None) -> tuple[str, Any]:
        try:
            ids = self._parse_ids(ids_text, "question")
            if not ids:
                raise StoreError("no question ids given; type the ids to remove, like '3, 7'")
            count = self.ctx.store.delete_identity_questions(ids, actor=actor(request))
        except StoreError as error:
            return notice(str(error), ok=False), gr.skip()
        return notice(f"removed {count} identity questions"), self.questions_frame()

    @staticmethod
    def select_row(table: pd.DataFrame, event: gr.SelectData) -> str:
        row = event.index[0] if isinstance(event.index, (list, tuple)) else event.index
        return str(table.iloc[int(row)]["id"])

    def check_import(self, path: str | None, default_kind: str,
                     replace: bool) -> tuple[str, pd.DataFrame, ImportReport | None, Any]:
        if not path:
            return (notice("choose a file first", ok=False), pd.DataFrame(columns=REPORT_COLUMNS), None,
                    gr.update(interactive=False))
        try:
            data = read_upload(path, self.ctx.settings.max_import_bytes)
        except UploadError as error:
            return (notice(str(error), ok=False), pd.DataFrame(columns=REPORT_COLUMNS), None,
                    gr.update(interactive=False))
        report = parse_pairs(data, Path(path).name, self.ctx.settings,
                             default_kind=default_kind, store=self.ctx.store, replace=replace)
        errors = pd.DataFrame([[e.row or "file", e.message] for e in report.errors], columns=REPORT_COLUMNS)
        return notice(report.summary(), ok=report.ok), errors, report if report.ok else None, gr.update(
            interactive=report.ok)

    def run_import(self, report: ImportReport | None, replace: bool, filter_kind: str, search: str,
                   request: gr.Request | None = None) -> tuple[str, Any, None, Any]:
        if report is None:
            return notice("check a file first; nothing was imported", ok=False), gr.skip(), None, gr.update(
                interactive=False)
        try:
            ids = import_pairs(self.ctx.store, report, replace=replace, actor=actor(request))
        except PairImportError as error:
            return notice(str(error), ok=False), gr.skip(), None, gr.update(interactive=False)
        return (notice(f"imported {len(ids)} pairs" + (" (replaced all pairs)" if replace else "")),
                self.pairs_frame(filter_kind, search), None, gr.update(interactive=False))

    def run_export(self, fmt: str) -> str:
        """Write the export to a private folder under Gradio's temp dir; Gradio serves a copy (behind
        the login). Exports older than EXPORT_KEEP_S are removed first."""
        from gradio.utils import get_upload_folder

        root = Path(get_upload_folder()) / "personabot-exports"
        root.mkdir(parents=True, exist_ok=True)
        remove_old_exports(root)
        path = Path(tempfile.mkdtemp(prefix="export-", dir=root)) / f"pairs{EXPORT_SUFFIX[fmt]}"
        path.write_bytes(export_pairs(self.ctx.store, fmt))
        return str(path)

    def preview(self) -> tuple[str, pd.DataFrame]:
        params = self.ctx.settings.training
        try:
            result = preview_training_set(self.ctx.store, params)
        except (ValueError, StoreError) as error:
            return notice(str(error), ok=False), pd.DataFrame()
        return preview_summary(result), preview_samples(result)

    def on_load(self) -> tuple[Any, ...]:
        return (*self.load_persona(), self.pairs_frame("all", ""), self.questions_frame(), self.questions_note())

    def build(self) -> list[Any]:
        """Lay out the tab inside the current Blocks; return the outputs of `on_load`."""
        kinds = list(PAIR_KINDS)
        with gr.Row():
            name = gr.Textbox(label="Name", elem_id="persona-name", max_lines=1)
            author = gr.Textbox(label="Author", elem_id="persona-author", max_lines=1)
        system_prompt = gr.Textbox(label="System prompt ({name} and {author} are filled in)", lines=3,
                                   elem_id="persona-system")
        save = gr.Button("Save persona", variant="primary", elem_id="persona-save")
        persona_note = gr.HTML(elem_id="persona-note")

        gr.Markdown("### Pairs")
        with gr.Row():
            filter_kind = gr.Dropdown(["all", *kinds], value="all", label="Kind", scale=1)
            search = gr.Textbox(label="Search", placeholder="words in question or answer", scale=3,
                                elem_id="pairs-search")
            refresh = gr.Button("Search", scale=1, elem_id="pairs-refresh")
        table = gr.Dataframe(headers=PAIR_COLUMNS, datatype=["number", "str", "bool", "str", "str", "str"],
                             interactive=True, wrap=True, max_height=420, elem_id="pairs-table",
                             label="Pairs (edit cells, then Save edits; click a row to select it)")
        with gr.Row():
            ids = gr.Textbox(label="Selected pair ids", placeholder="3, 7, 12", scale=3, elem_id="pairs-ids")
            save_edits = gr.Button("Save edits", scale=1)
            enable = gr.Button("Enable", scale=1)
            disable = gr.Button("Disable", scale=1)
            delete = gr.Button("Delete", variant="stop", scale=1)
        pairs_note = gr.HTML(elem_id="pairs-note")
        with gr.Accordion("Add a pair", open=False):
            new_kind = gr.Radio(kinds, value="identity", label="Kind")
            new_instruction = gr.Textbox(label="Question", lines=1)
            new_input = gr.Textbox(label="Input (optional)", lines=1)
            new_output = gr.Textbox(label="Answer", lines=2)
            add = gr.Button("Add pair")

        gr.Markdown("### Identity test questions")
        questions_note = gr.HTML(elem_id="questions-note")
        questions = gr.Dataframe(headers=QUESTION_COLUMNS, interactive=False, wrap=True, elem_id="questions-table",
                                 label="Asked by the evaluation gate after training, with and without the system "
                                       "prompt; an answer must name the persona ({name} and {author} are filled in)")
        with gr.Row():
            new_question = gr.Textbox(label="New question", placeholder="Who looks after {name}?", scale=3,
                                      max_lines=1, elem_id="questions-new")
            add_question = gr.Button("Add question", scale=1, elem_id="questions-add")
        with gr.Row():
            question_ids = gr.Textbox(label="Question ids to remove", placeholder="3, 7", scale=3,
                                      elem_id="questions-ids")
            delete_questions = gr.Button("Remove", variant="stop", scale=1, elem_id="questions-delete")
        questions.select(self.select_row, questions, question_ids, api_visibility="private")
        add_question.click(self.add_question, new_question, [questions_note, questions, new_question],
                           api_name="add_identity_question")
        delete_questions.click(self.delete_questions, question_ids, [questions_note, questions],
                               api_name="delete_identity_questions")

        gr.Markdown("### Import and export")
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="Pairs file (.json Alpaca or messages, .jsonl, .csv)",
                                 file_types=[".json", ".jsonl", ".csv"], elem_id="import-file")
                with gr.Row():
                    import_kind = gr.Dropdown(kinds, value="identity", label="Kind for rows without one")
                    replace = gr.Checkbox(label="Replace all pairs", value=False)
                check = gr.Button("Check file", elem_id="import-check")
                import_note = gr.HTML(elem_id="import-note")
                report_table = gr.Dataframe(headers=REPORT_COLUMNS, interactive=False,
                                            label="Validation report", elem_id="import-report")
                do_import = gr.Button("Import checked rows", variant="primary", interactive=False,
                                      elem_id="import-run")
            with gr.Column():
                export_format = gr.Dropdown(list(FORMATS), value="json", label="Export format")
                export = gr.Button("Export", elem_id="export-run")
                export_file = gr.File(label="Exported file", interactive=False)
                gr.Markdown("CSV export: a cell starting with = + - @, tab or CR gets a leading ' so a spreadsheet "
                            "shows it as text instead of running it as a formula.", elem_id="export-csv-note")
        report_state = gr.State(None)

        gr.Markdown("### Training set preview")
        preview_button = gr.Button("Preview the training set", elem_id="preview-run")
        preview_note = gr.HTML(elem_id="preview-note")
        preview_table = gr.Dataframe(headers=["system", "user", "assistant"], interactive=False, wrap=True,
                                      max_height=300, label="First rows of the training set")

        filters = [filter_kind, search]
        save.click(self.save_persona, [name, author, system_prompt], persona_note, api_name="save_persona")
        refresh.click(self.pairs_frame, filters, table, api_name="list_pairs")
        search.submit(self.pairs_frame, filters, table, api_visibility="private")
        filter_kind.change(self.pairs_frame, filters, table, api_visibility="private")
        table.select(self.select_row, table, ids, api_visibility="private")
        save_edits.click(self.save_table_edits, [table, *filters], [pairs_note, table], api_name="save_pairs")
        enable.click(self.enable, [ids, *filters], [pairs_note, table], api_name="enable_pairs")
        disable.click(self.disable, [ids, *filters], [pairs_note, table], api_name="disable_pairs")
        delete.click(self.delete_pairs, [ids, *filters], [pairs_note, table], api_name="delete_pairs")
        add.click(self.add_pair, [new_kind, new_instruction, new_input, new_output, *filters],
                  [pairs_note, table, new_instruction, new_input, new_output], api_name="add_pair")
        check.click(self.check_import, [upload, import_kind, replace],
                    [import_note, report_table, report_state, do_import], api_name="check_import")
        do_import.click(self.run_import, [report_state, replace, *filters],
                        [import_note, table, report_state, do_import], api_name="import_pairs")
        export.click(self.run_export, export_format, export_file, api_name="export_pairs")
        preview_button.click(self.preview, None, [preview_note, preview_table], api_name="preview_training_set")
        return [name, author, system_prompt, table, questions, questions_note]
