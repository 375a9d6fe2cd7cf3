"""API keys tab: create a key for the OpenAI-compatible API (shown once), list keys by prefix, revoke one."""

from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd

from personabot.core.store import StoreError, isoformat
from personabot.ui.context import AdminContext, actor, notice

KEY_COLUMNS = ["id", "name", "prefix", "state", "rate limit / min", "requests", "prompt tokens",
               "completion tokens", "created", "last used"]


class KeysTab:
    """The API keys tab; keys live in the store (only their sha256), usage is counted by the API."""

    def __init__(self, ctx: AdminContext) -> None:
        self.ctx = ctx

    def table(self) -> tuple[pd.DataFrame, Any]:
        keys = self.ctx.store.list_api_keys()
        default = self.ctx.settings.api_rate_limit_per_minute
        rows = [[k.id, k.name, f"{k.prefix}…", f"revoked {isoformat(k.revoked_at)}" if k.revoked_at else "active",
                 k.rate_limit_per_minute or f"{default} (default)", k.requests, k.prompt_tokens, k.completion_tokens,
                 isoformat(k.created_at), isoformat(k.last_used_at) or "never"] for k in keys]
        choices = [(f"{k.id}: {k.name} ({k.prefix}…)", k.id) for k in keys if k.revoked_at is None]
        return pd.DataFrame(rows, columns=KEY_COLUMNS), gr.update(choices=choices, value=None)

    def create(self, name: str, rate_limit: float | None, request: gr.Request | None = None) -> tuple[Any, ...]:
        limit = int(rate_limit) if rate_limit else None
        try:
            key, secret = self.ctx.store.create_api_key(name or "", rate_limit_per_minute=limit, actor=actor(request))
        except StoreError as error:
            return (notice(str(error), ok=False), gr.update(value="", visible=False), *self.table())
        return (notice(f"key {key.id} ({key.name}) created: copy it now, it is not shown again"),
                gr.update(value=secret, visible=True), *self.table())

    def revoke(self, key_id: Any, request: gr.Request | None = None) -> tuple[Any, ...]:
        if key_id in (None, ""):
            return (notice("choose a key to revoke first", ok=False), gr.update(), *self.table())
        try:
            key = self.ctx.store.revoke_api_key(int(key_id), actor=actor(request))
        except (StoreError, ValueError) as error:
            return (notice(str(error), ok=False), gr.update(), *self.table())
        return (notice(f"key {key.id} ({key.prefix}…) revoked; requests with it now get 401"),
                gr.update(value="", visible=False), *self.table())

    def on_load(self) -> tuple[Any, ...]:
        return self.table()

    def build(self) -> list[Any]:
        gr.Markdown("Keys for the OpenAI-compatible API (`personabot api`, base URL `http://HOST:"
                    f"{self.ctx.settings.api_port}/v1`). A key is shown once; only its hash is stored.")
        with gr.Row():
            name = gr.Textbox(label="Name (who or what uses the key)", scale=3, elem_id="keys-name")
            rate = gr.Number(label="Requests per minute (empty = default)", precision=0, minimum=1, scale=1,
                             elem_id="keys-rate")
            create = gr.Button("Create key", variant="primary", scale=1, elem_id="keys-create")
        secret = gr.Textbox(label="New key (copy it now)", visible=False, interactive=False, buttons=["copy"],
                            elem_id="keys-secret")
        note = gr.HTML(elem_id="keys-note")
        table = gr.Dataframe(headers=KEY_COLUMNS, interactive=False, wrap=True, label="API keys",
                             elem_id="keys-table")
        with gr.Row():
            chosen = gr.Dropdown(label="Key", choices=[], value=None, scale=3, elem_id="keys-choice")
            revoke = gr.Button("Revoke", variant="stop", scale=1, elem_id="keys-revoke")
        listing = [table, chosen]
        create.click(self.create, [name, rate], [note, secret, *listing], api_name="create_api_key")
        revoke.click(self.revoke, chosen, [note, secret, *listing], api_name="revoke_api_key")
        return listing
