"""Adapters tab: every version with hash, scores, size, date and state; activate, roll back, delete; the
gate's per-item results and the base model's identity terms (shown, editable)."""

from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd
import redis

from personabot.core.models import AdapterVersion
from personabot.core.store import StoreError, isoformat
from personabot.core.store_gate import BaseIdentity
from personabot.ui.context import AdminContext, actor, notice

GATE_COLUMNS = ["kind", "set", "system", "pass", "question", "answer", "expected", "detail"]
ADAPTER_COLUMNS = ["id", "name", "state", "data hash", "eval scores", "size", "created", "run", "gate"]
TERM_COLUMNS = ["term", "source", "editable"]


def adapter_state(adapter: AdapterVersion) -> str:
    if adapter.active:
        return "active"
    return "ready" if adapter.eval_passed else "failed gate"


def scores_text(scores: dict[str, Any]) -> str:
    parts = []
    for key, value in sorted((scores or {}).items()):
        if isinstance(value, float):
            parts.append(f"{key}={value:.2f}")
        elif isinstance(value, (int, str, bool)):
            parts.append(f"{key}={value}")
    return ", ".join(parts)


def size_text(size_bytes: int) -> str:
    return f"{size_bytes / 2**20:.1f} MiB" if size_bytes >= 2**20 else f"{size_bytes / 1024:.0f} KiB"


def hash_text(data_hash: str, persona_hash: str) -> str:
    """The adapter's persona data hash, flagged when the persona has changed since it was trained."""
    if not data_hash:
        return "—"
    return data_hash[:12] + ("" if data_hash == persona_hash else " (older data)")


def base_terms_summary(model: str, stored: BaseIdentity | None) -> str:
    """Markdown: which base model, and what it said about itself at its first evaluation."""
    lines = [f"Answers claiming one of these terms as their own identity fail the gate (base model `{model}`)."]
    if stored is None or stored.derived_at is None:
        lines.append("The base model has not been asked about itself yet: its first evaluation (the first "
                     "training run on it) adds the names it gives itself here.")
    else:
        lines.append(f"At its first evaluation ({isoformat(stored.derived_at)}) the base model said:")
        lines += [f"- *{a['question']}* → {a['answer'][:300]!r}" for a in stored.self_answers]
    if stored is not None and stored.edited_by:
        lines.append(f"Last edited by {stored.edited_by} at {isoformat(stored.updated_at)}.")
    return "\n".join(lines)


class AdaptersTab:
    """The Adapters tab; actions go through `training.registry.AdapterRegistry`."""

    def __init__(self, ctx: AdminContext) -> None:
        self.ctx = ctx

    def table(self) -> tuple[pd.DataFrame, Any, str]:
        adapters = self.ctx.store.list_adapters()
        persona_hash = self.ctx.store.persona_hash()
        rows = [[a.id, a.name, adapter_state(a),
                 hash_text(a.data_hash, persona_hash),
                 scores_text(a.eval_scores), size_text(a.size_bytes), isoformat(a.created_at), a.run_id or "",
                 a.eval_reason if not a.eval_passed else "passed"] for a in adapters]
        active = next((a for a in adapters if a.active), None)
        summary = (f"active: **{active.name}**" if active else "active: **base model** (no adapter)")
        choices = self.choices(adapters)
        return (pd.DataFrame(rows, columns=ADAPTER_COLUMNS),
                gr.update(choices=choices, value=choices[0][1] if choices else None), summary)

    def choices(self, adapters: list[AdapterVersion] | None = None) -> list[tuple[str, int]]:
        adapters = self.ctx.store.list_adapters() if adapters is None else adapters
        return [(f"{a.name} ({adapter_state(a)})", a.id) for a in adapters]

    def _act(self, action: str, adapter_id: Any, request: gr.Request | None) -> tuple[Any, ...]:
        if adapter_id in (None, ""):
            return (notice("choose an adapter version first", ok=False), *self.table())
        try:
            registry = self.ctx.registry
            method = {"activate": registry.promote, "rollback": registry.rollback,
                      "delete": registry.delete}[action]
            adapter = method(int(adapter_id), actor=actor(request))
        except (StoreError, ValueError, RuntimeError, OSError) as error:
            return (notice(str(error), ok=False), *self.table())
        except redis.RedisError as error:
            # The store changed; only the swap event could not be sent. Workers re-sync on their own.
            return (notice(f"{action} saved, but the swap event could not be sent ({type(error).__name__}); "
                           "chat workers pick up the active version at their next sync", ok=False),
                    *self.table())
        done = {"activate": "activated", "rollback": "rolled back to", "delete": "deleted"}[action]
        return (notice(f"{done} {adapter.name}; chat workers swap to the active version now"
                       if action != "delete" else f"{done} {adapter.name}"), *self.table())

    def activate(self, adapter_id: Any, request: gr.Request | None = None) -> tuple[Any, ...]:
        return self._act("activate", adapter_id, request)

    def rollback(self, adapter_id: Any, request: gr.Request | None = None) -> tuple[Any, ...]:
        return self._act("rollback", adapter_id, request)

    def delete(self, adapter_id: Any, request: gr.Request | None = None) -> tuple[Any, ...]:
        return self._act("delete", adapter_id, request)

    def gate_rows(self, adapter_id: Any) -> pd.DataFrame:
        """Every item the gate asked for the chosen version's run (question, answer, pass, why)."""
        rows: list[list[Any]] = []
        if adapter_id not in (None, ""):
            try:
                adapter = self.ctx.store.get_adapter(int(adapter_id))
                run = self.ctx.store.get_run(adapter.run_id) if adapter.run_id else None
            except (StoreError, ValueError):
                run = None
            for row in ((run.metrics or {}).get("eval", {}).get("rows", []) if run else []):
                base = "right" if row.get("base_correct") else "wrong"
                detail = row.get("why") or (f"ratio {row['ratio']}; base {base}" if "ratio" in row else "")
                rows.append([row.get("kind", ""), row.get("set", ""), row.get("system", ""),
                             "yes" if row.get("pass") else "NO", row.get("question", ""), row.get("answer", ""),
                             row.get("expected", ""), detail])
        return pd.DataFrame(rows, columns=GATE_COLUMNS)

    # --- base-identity terms ------------------------------------------------------------------
    def base_terms(self) -> tuple[str, pd.DataFrame]:
        """The settings' terms (fixed) and the base model's stored ones (derived or added; editable here)."""
        model = self.ctx.settings.model
        stored = self.ctx.store.base_identity(model)
        derived = {t.lower() for t in (stored.derived if stored else [])}
        rows = [[t, "settings (PERSONABOT_BASE_IDENTITY_TERMS)", "no"] for t in self.ctx.settings.base_identity_terms]
        rows += [[t, "derived from the base model" if t.lower() in derived else "added by an admin", "yes"]
                 for t in (stored.terms if stored else [])]
        return base_terms_summary(model, stored), pd.DataFrame(rows, columns=TERM_COLUMNS)

    def add_base_term(self, term: str, request: gr.Request | None = None) -> tuple[Any, ...]:
        return self._edit_term("add", term, request)

    def remove_base_term(self, term: str, request: gr.Request | None = None) -> tuple[Any, ...]:
        return self._edit_term("remove", term, request)

    def _edit_term(self, action: str, term: str, request: gr.Request | None) -> tuple[Any, ...]:
        model = self.ctx.settings.model
        stored = self.ctx.store.base_identity(model)
        editable = {t.lower() for t in (stored.terms if stored else [])}
        fixed = {t.lower() for t in self.ctx.settings.base_identity_terms} - editable
        if action == "remove" and term.strip().lower() in fixed:
            return (notice(f"{term.strip()!r} comes from the settings (PERSONABOT_BASE_IDENTITY_TERMS); change it "
                           "there", ok=False), *self.base_terms(), term)
        try:
            if action == "add":
                self.ctx.store.add_base_term(model, term, actor=actor(request))
            else:
                self.ctx.store.remove_base_term(model, term, actor=actor(request))
        except StoreError as error:
            return (notice(f"not {'added' if action == 'add' else 'removed'}: {error}", ok=False),
                    *self.base_terms(), term)
        done = "added" if action == "add" else "removed"
        return (notice(f"{done} {term.strip()!r}; the next evaluation uses the new list"), *self.base_terms(), "")

    def on_load(self) -> tuple[Any, ...]:
        return (*self.table(), *self.base_terms())

    def build(self) -> list[Any]:
        summary = gr.Markdown(elem_id="adapters-summary")
        table = gr.Dataframe(headers=ADAPTER_COLUMNS, interactive=False, wrap=True, label="Adapter versions",
                             elem_id="adapters-table")
        with gr.Row():
            chosen = gr.Dropdown(label="Adapter version", choices=self.choices(), value=None, scale=3,
                                 allow_custom_value=True, elem_id="adapters-choice")
            refresh = gr.Button("Refresh", scale=1, elem_id="adapters-refresh")
        with gr.Row():
            activate = gr.Button("Activate", variant="primary", elem_id="adapters-activate")
            rollback = gr.Button("Roll back to this version", elem_id="adapters-rollback")
            delete = gr.Button("Delete", variant="stop", elem_id="adapters-delete")
        note = gr.HTML(elem_id="adapters-note")
        gate = gr.Dataframe(headers=GATE_COLUMNS, interactive=False, wrap=True, label="Gate results (per item)",
                            elem_id="adapters-gate")
        chosen.change(self.gate_rows, chosen, gate, api_name="adapter_gate_rows")

        gr.Markdown("### Base-identity terms")
        terms_summary = gr.Markdown(elem_id="terms-summary")
        terms_table = gr.Dataframe(headers=TERM_COLUMNS, interactive=False, wrap=True, label="Terms",
                                   elem_id="terms-table")
        with gr.Row():
            term = gr.Textbox(label="Term", placeholder="a name the base model calls itself, e.g. SmolLM", scale=3,
                              max_lines=1, elem_id="terms-term")
            add_term = gr.Button("Add term", scale=1, elem_id="terms-add")
            remove_term = gr.Button("Remove term", scale=1, elem_id="terms-remove")
            reload_terms = gr.Button("Reload", scale=1, elem_id="terms-refresh")
        terms_note = gr.HTML(elem_id="terms-note")
        term_outputs = [terms_note, terms_summary, terms_table, term]
        add_term.click(self.add_base_term, term, term_outputs, api_name="add_base_term")
        remove_term.click(self.remove_base_term, term, term_outputs, api_name="remove_base_term")
        reload_terms.click(self.base_terms, None, [terms_summary, terms_table], api_name="base_terms")
        listing = [table, chosen, summary]
        refresh.click(self.table, None, listing, api_name="list_adapters")
        activate.click(self.activate, chosen, [note, *listing], api_name="activate_adapter")
        rollback.click(self.rollback, chosen, [note, *listing], api_name="rollback_adapter")
        delete.click(self.delete, chosen, [note, *listing], api_name="delete_adapter")
        return [*listing, terms_summary, terms_table]
