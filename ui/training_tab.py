"""Training tab: run parameters, Start/Cancel, live progress, loss chart and log tail, retrain schedule."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
from pydantic import ValidationError

from personabot.core.models import TrainingRun
from personabot.core.store import StoreError, isoformat
from personabot.core.train_params import RECIPE_FIELDS, RECIPES
from personabot.training.schedule import CronError, current_cron, next_retrain_time, set_retrain_cron
from personabot.training.service import TrainingRequestError, cancel_training, request_training
from personabot.ui.context import AdminContext, actor, notice
from personabot.workers.client import TrainingNotQueuedError, queue_training

MIX_COLUMNS = ["dataset", "samples"]
RUN_COLUMNS = ["id", "status", "trigger", "created", "finished", "adapter", "error"]
LOG_TAIL_BYTES = 16_384
LOG_TAIL_LINES = 12
CUSTOM = "custom"


def recipe_line(name: str) -> str:
    r = RECIPES[name]
    return (f"{name}: {r['epochs']} epoch(s) at {r['learning_rate']:g}, rank {r['lora_rank']}, identity pairs "
            f"x{r['identity_oversample']}, FAQ pairs x{r['faq_oversample']}")


RECIPE_INFO = "; ".join(recipe_line(name) for name in RECIPES) + (
    " (default chosen on SmolLM2-135M; 7b: expected for 7B models, see the README's training recipe)")


def mix_frame(general_data: list[str]) -> pd.DataFrame:
    rows = []
    for spec in general_data:
        name, _, count = spec.partition("#")
        rows.append([name, int(count) if count.isdigit() else None])
    return pd.DataFrame(rows, columns=MIX_COLUMNS)


def mix_specs(table: pd.DataFrame) -> list[str]:
    """The mix table as ms-swift dataset specs ('id#N'); empty rows are dropped."""
    specs = []
    for record in table.to_dict("records"):
        name = str(record.get("dataset") or "").strip()
        if not name or name == "nan":
            continue
        count = record.get("samples")
        if count in (None, "") or pd.isna(count):
            specs.append(name)
        else:
            specs.append(f"{name}#{int(float(count))}")
    return specs


def params_error(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in item['loc'])}: {item['msg']}" for item in error.errors())


def log_tail(path: str) -> str:
    if not path:
        return ""
    file = Path(path)
    if not file.is_file():
        return f"(log {path} is not readable from this host)"
    with file.open("rb") as handle:
        size = handle.seek(0, 2)
        handle.seek(max(0, size - LOG_TAIL_BYTES))
        text = handle.read().decode("utf-8", errors="replace")
    # Progress bars redraw with carriage returns; keep only what a terminal would still show.
    lines = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]
    return "\n".join([line for line in lines if line.strip()][-LOG_TAIL_LINES:])


def _fraction(progress: dict[str, Any]) -> float | None:
    if progress.get("percent") is not None:
        return float(progress["percent"]) / 100
    step, total = progress.get("step"), progress.get("max_steps")
    if step is not None and total:
        return float(step) / float(total)
    return None


def _eta(seconds: Any) -> str:
    if seconds is None:
        return ""
    seconds = int(float(seconds))
    return f"ETA {seconds // 3600}h {seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"ETA {seconds // 60}m {seconds % 60:02d}s"


def run_html(run: TrainingRun | None) -> str:
    if run is None:
        return '<div id="run-state">no training run yet</div>'
    progress = run.progress or {}
    fraction = _fraction(progress)
    parts = [f"<b>run {run.id}</b> · {html.escape(run.status)} · {html.escape(run.trigger)}"]
    if progress.get("phase") and run.status == "running":
        parts.append(html.escape(str(progress["phase"])))
    step, total = progress.get("step"), progress.get("max_steps")
    if step is not None and total:
        parts.append(f"step {step}/{total}")
    if progress.get("loss") is not None:
        parts.append(f"loss {float(progress['loss']):.4f}")
    if progress.get("gpu_mem_gb") is not None:
        parts.append(f"GPU {float(progress['gpu_mem_gb']):.1f} GiB")
    if run.status == "running":
        parts.append(_eta(progress.get("eta_s")))
    bar = ""
    if fraction is not None or run.status in ("running", "succeeded"):
        value = 1.0 if run.status == "succeeded" else (fraction or 0.0)
        bar = (f'<progress class="pb-progress" id="run-progress" max="1" value="{value:.4f}"></progress>'
               f' <span id="run-percent">{value:.0%}</span>')
    error = f'<div class="pb-note pb-error">{html.escape(run.error)}</div>' if run.error else ""
    return (f'<div id="run-state" data-status="{html.escape(run.status)}">'
            f'{" · ".join(p for p in parts if p)}<br>{bar}{error}</div>')


class TrainingTab:
    """The Training tab. Everything shown is read from the store, so every admin sees the same run."""

    def __init__(self, ctx: AdminContext, refresh_s: float = 2.0) -> None:
        self.ctx = ctx
        self.refresh_s = refresh_s

    def _shown_run(self) -> TrainingRun | None:
        run = self.ctx.store.current_run()
        if run is None:
            latest = self.ctx.store.list_runs(limit=1)
            run = latest[0] if latest else None
        return run

    def refresh(self) -> tuple[str, pd.DataFrame, str, pd.DataFrame, Any]:
        run = self._shown_run()
        points = self.ctx.store.run_points(run.id) if run is not None else []
        # Explicit dtypes: an empty frame would otherwise fix the chart's axes as categorical.
        loss = pd.DataFrame([[p.step, p.loss] for p in points if p.loss is not None],
                            columns=["step", "loss"]).astype({"step": "int64", "loss": "float64"})
        names = {a.id: a.name for a in self.ctx.store.list_adapters()}
        runs = pd.DataFrame(
            [[r.id, r.status, r.trigger, isoformat(r.created_at), isoformat(r.finished_at),
              names.get(r.adapter_id, "") if r.adapter_id else "", r.error[:200]]
             for r in self.ctx.store.list_runs(limit=20)],
            columns=RUN_COLUMNS)
        cancellable = run is not None and run.status in ("queued", "running")
        return (run_html(run), loss, log_tail(run.log_path if run else ""), runs,
                gr.update(interactive=cancellable))

    @staticmethod
    def recipe_fields(name: str) -> tuple[Any, ...]:
        """A named recipe's values into the fields it sets (the rest of the form is kept)."""
        if name not in RECIPES:
            return tuple(gr.skip() for _ in RECIPE_FIELDS)
        return tuple(RECIPES[name][field] for field in RECIPE_FIELDS)

    def start(self, mix: pd.DataFrame, epochs: float, learning_rate: float, rank: float, alpha: float,
              identity_oversample: float, faq_oversample: float, speed_mode: str,
              request: gr.Request | None = None) -> str:
        """Validate the parameters, create the queued run in the store, enqueue it on `train`."""
        try:
            params = self.ctx.settings.training.updated(
                epochs=int(epochs), learning_rate=float(learning_rate), lora_rank=int(rank),
                lora_alpha=int(alpha), identity_oversample=int(identity_oversample),
                faq_oversample=int(faq_oversample), speed_mode=speed_mode, general_data=mix_specs(mix))
        except ValidationError as error:
            return notice(f"not started: {params_error(error)}", ok=False)
        except (TypeError, ValueError) as error:
            return notice(f"not started: {error}", ok=False)
        try:
            run = queue_training(self.ctx.store, lambda: request_training(self.ctx.store, params, actor=actor(request)),
                                 app=self.ctx.celery)
        except (TrainingRequestError, StoreError) as error:
            return notice(f"not started: {error}", ok=False)
        except TrainingNotQueuedError as error:
            return notice(str(error), ok=False)
        return notice(f"run {run.id} queued")

    def cancel(self, request: gr.Request | None = None) -> str:
        run = self.ctx.store.current_run()
        if run is None:
            return notice("no run is queued or running", ok=False)
        try:
            cancel_training(self.ctx.store, run.id, actor(request))
        except StoreError as error:
            return notice(str(error), ok=False)
        return notice(f"cancel requested for run {run.id}")

    def next_run_text(self) -> str:
        when = next_retrain_time(self.ctx.store, self.ctx.settings)
        if when is None:
            return "scheduled retraining is off"
        return f"next check: {when:%Y-%m-%d %H:%M} UTC (retrains only if the persona changed)"

    def save_schedule(self, cron: str, request: gr.Request | None = None) -> tuple[str, str]:
        try:
            cron = set_retrain_cron(self.ctx.store, cron, actor=actor(request))
        except CronError as error:
            return notice(str(error), ok=False), self.next_run_text()
        return notice("schedule saved" if cron else "scheduled retraining turned off"), self.next_run_text()

    def on_load(self) -> tuple[Any, ...]:
        return (*self.refresh(), current_cron(self.ctx.store, self.ctx.settings), self.next_run_text())

    def build(self) -> list[Any]:
        defaults = self.ctx.settings.training
        with gr.Row():
            with gr.Column(scale=3):
                mix = gr.Dataframe(value=mix_frame(defaults.general_data), headers=MIX_COLUMNS,
                                   datatype=["str", "number"], interactive=True, row_count=1,
                                   label="General data mixed in (dataset id or /abs/path.jsonl, samples)",
                                   elem_id="train-mix")
            with gr.Column(scale=2):
                recipe = gr.Dropdown([*RECIPES, CUSTOM], value=CUSTOM, label="Recipe (fills the fields below)",
                                     info=RECIPE_INFO, elem_id="train-recipe")
                epochs = gr.Number(defaults.epochs, label="Epochs", precision=0, minimum=1, maximum=100,
                                   elem_id="train-epochs")
                learning_rate = gr.Number(defaults.learning_rate, label="Learning rate", elem_id="train-lr")
                with gr.Row():
                    rank = gr.Number(defaults.lora_rank, label="LoRA rank", precision=0, minimum=1, maximum=256)
                    alpha = gr.Number(defaults.lora_alpha, label="LoRA alpha", precision=0, minimum=1,
                                      maximum=1024)
                with gr.Row():
                    identity_oversample = gr.Number(defaults.identity_oversample, label="Identity pairs x",
                                                    precision=0, minimum=1, maximum=100, elem_id="train-identity-x")
                    faq_oversample = gr.Number(defaults.faq_oversample, label="FAQ pairs x", precision=0,
                                               minimum=1, maximum=200, elem_id="train-faq-x")
                speed_mode = gr.Radio(["fast", "24gb", "seeds"], value=defaults.speed_mode, label="Speed mode")
        with gr.Row():
            start = gr.Button("Start training", variant="primary", elem_id="train-start")
            cancel = gr.Button("Cancel", variant="stop", interactive=False, elem_id="train-cancel")
        action_note = gr.HTML(elem_id="train-note")
        state = gr.HTML(elem_id="train-state")
        loss = gr.LinePlot(x="step", y="loss", title="Training loss", height=260, elem_id="train-loss")
        log = gr.Textbox(label="Log tail", lines=LOG_TAIL_LINES, max_lines=LOG_TAIL_LINES, interactive=False,
                         autoscroll=True,
                         elem_id="train-log")
        runs = gr.Dataframe(headers=RUN_COLUMNS, interactive=False, wrap=True, label="Runs", max_height=300)
        gr.Markdown("### Retraining schedule")
        with gr.Row():
            cron = gr.Textbox(label="Cron (UTC; empty = never)", max_lines=1, scale=2, elem_id="train-cron")
            save_cron = gr.Button("Save schedule", scale=1)
        next_run = gr.Markdown(elem_id="train-next")
        timer = gr.Timer(self.refresh_s)

        live = [state, loss, log, runs, cancel]
        recipe.change(self.recipe_fields, recipe, [epochs, learning_rate, rank, alpha, identity_oversample,
                                                    faq_oversample], api_name="recipe_fields")
        start.click(self.start, [mix, epochs, learning_rate, rank, alpha, identity_oversample, faq_oversample,
                                 speed_mode], action_note,
                    api_name="start_training").then(self.refresh, None, live, api_visibility="private")
        cancel.click(self.cancel, None, action_note, api_name="cancel_training").then(
            self.refresh, None, live, api_visibility="private")
        timer.tick(self.refresh, None, live, api_name="training_state", show_progress="hidden")
        save_cron.click(self.save_schedule, cron, [action_note, next_run], api_name="save_schedule")
        return [*live, cron, next_run]
