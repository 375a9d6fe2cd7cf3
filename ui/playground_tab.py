"""Playground tab: streamed chat with any adapter, a side-by-side compare, the identity test on demand."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterator
from typing import Any

import gradio as gr
import pandas as pd

from personabot.core.prompting import PersonaText, render
from personabot.core.schemas import ChatRequest, ChatResult, Message, SamplingParams
from personabot.training.evaluate import (
    ADVERSARIAL_IDENTITY,
    HELD_OUT_IDENTITY,
    claims_base_identity,
    identity_passes,
)
from personabot.ui.context import LIVE_ERRORS, AdminContext, notice
from personabot.workers.client import ChatClient

IDENTITY_COLUMNS = ["question", "answer", "passed", "why"]
REPLY_TIMEOUT_S = 120.0
IDENTITY_MAX_TOKENS = 64
COMPARE_POLL_S = 0.2


def result_line(result: ChatResult) -> str:
    version = result.adapter_version or "base model"
    if result.finish_reason == "error":
        return notice(f"error from the chat worker: {result.error}", ok=False)
    if not result.text.strip() and result.finish_reason == "stop":
        return notice(f"{version} · empty reply: the model ended it at once (try again, or a lower temperature) · "
                      f"{result.worker}", ok=False)
    return notice(f"{version} · {result.completion_tokens} tokens · first token {result.first_token_s:.2f}s · "
                  f"total {result.total_s:.2f}s · {result.worker}")


def identity_failure(answer: str, persona: PersonaText, terms: list[str]) -> str:
    if claims_base_identity(answer, terms):
        return "claims the base model's identity"
    return f"names neither {persona.name!r} nor {persona.author!r}"


def sampling(temperature: float, max_new_tokens: float) -> SamplingParams:
    return SamplingParams(temperature=float(temperature), max_new_tokens=int(max_new_tokens))


class PlaygroundTab:
    """The Playground tab: requests go through the `chat` queue, replies stream from Redis."""

    def __init__(self, ctx: AdminContext) -> None:
        self.ctx = ctx

    @property
    def client(self) -> ChatClient:
        return ChatClient(self.ctx.redis, self.ctx.celery)

    def choices(self) -> list[tuple[str, str]]:
        versions = [(f"{a.name}" + ("" if a.eval_passed else " (failed gate)"), a.name)
                    for a in self.ctx.store.list_adapters()]
        return [("active adapter", "active"), ("base model", "base"), *versions]

    def submit(self, messages: list[dict[str, str]], adapter: str, params: SamplingParams) -> str:
        request = ChatRequest(messages=[Message(**m) for m in messages], adapter=adapter or "active",
                              sampling=params, source="admin")
        return self.client.submit(request)

    def stream(self, request_id: str) -> Iterator[tuple[str, ChatResult | None]]:
        """Yield (text so far, None) per token, then (text, final result)."""
        for update in self.client.stream(request_id, timeout_s=REPLY_TIMEOUT_S):
            yield update.text, update.result
            if update.result is not None:
                return

    def chat(self, message: str, history: list[dict[str, str]], adapter: str, temperature: float,
             max_new_tokens: float) -> Iterator[tuple[Any, ...]]:
        message = message.strip()
        if not message:
            yield gr.skip(), history, history, notice("type a message first", ok=False)
            return
        history = [*history, {"role": "user", "content": message}]
        shown = [*history, {"role": "assistant", "content": ""}]
        yield "", shown, history, ""
        try:
            request_id = self.submit(history, adapter, sampling(temperature, max_new_tokens))
            for text, result in self.stream(request_id):
                shown[-1] = {"role": "assistant", "content": text}
                if result is not None:
                    history = [*history, {"role": "assistant", "content": result.text}]
                    yield "", shown, history, result_line(result)
                    return
                yield "", shown, history, ""
        except LIVE_ERRORS as error:
            yield "", shown, history, notice(f"no reply: {error}", ok=False)

    @staticmethod
    def clear() -> tuple[list[Any], list[Any], str]:
        return [], [], ""

    def compare(self, question: str, adapter_a: str, adapter_b: str, temperature: float,
                max_new_tokens: float) -> Iterator[tuple[str, str, str, str]]:
        question = question.strip()
        if not question:
            yield "", "", notice("type a question first", ok=False), ""
            return
        texts = {"a": "", "b": ""}
        notes = {"a": "", "b": ""}
        done = {"a": threading.Event(), "b": threading.Event()}

        def follow(side: str, adapter: str) -> None:
            try:
                request_id = self.submit([{"role": "user", "content": question}], adapter,
                                         sampling(temperature, max_new_tokens))
                for text, result in self.stream(request_id):
                    texts[side] = text
                    if result is not None:
                        notes[side] = result_line(result)
            except LIVE_ERRORS as error:
                notes[side] = notice(f"no reply: {error}", ok=False)
            finally:
                done[side].set()

        for side, adapter in (("a", adapter_a), ("b", adapter_b)):
            threading.Thread(target=follow, args=(side, adapter), daemon=True).start()
        while not (done["a"].is_set() and done["b"].is_set()):
            yield texts["a"], texts["b"], notes["a"], notes["b"]
            time.sleep(COMPARE_POLL_S)
        yield texts["a"], texts["b"], notes["a"], notes["b"]

    def identity_test(self, adapter: str) -> Iterator[tuple[str, pd.DataFrame]]:
        """The gate's identity questions (held-out, the persona's own, adversarial) and base-identity terms (the
        settings' and the base model's stored ones), answered greedily by the chat workers."""
        persona = self.ctx.store.get_persona()
        stored = self.ctx.store.base_identity(self.ctx.settings.model)
        terms = [*self.ctx.settings.base_identity_terms, *(stored.terms if stored else [])]
        own = ([q.question for q in self.ctx.store.list_identity_questions()]
               or list(self.ctx.settings.eval_identity_questions))
        questions = list(dict.fromkeys(render(q, name=persona.name, author=persona.author)
                                       for q in HELD_OUT_IDENTITY + own + ADVERSARIAL_IDENTITY))
        rows = [[q, "", "…", ""] for q in questions]
        yield notice(f"asking {len(questions)} questions…"), pd.DataFrame(rows, columns=IDENTITY_COLUMNS)
        greedy = SamplingParams(temperature=0.0, max_new_tokens=IDENTITY_MAX_TOKENS)
        try:
            request_ids = [self.submit([{"role": "user", "content": q}], adapter, greedy) for q in questions]
            for index, request_id in enumerate(request_ids):
                answer, result = collections.deque(self.stream(request_id), maxlen=1).pop()
                if result is not None and result.finish_reason == "error":
                    rows[index][1:] = [result.error, "FAIL", "the chat worker returned an error"]
                else:
                    passed = identity_passes(answer, persona, terms)
                    rows[index][1:] = [answer, "pass" if passed else "FAIL",
                                       "" if passed else identity_failure(answer, persona, terms)]
                yield notice(f"{index + 1}/{len(questions)} answered"), pd.DataFrame(rows, columns=IDENTITY_COLUMNS)
        except LIVE_ERRORS as error:
            yield notice(f"the identity test stopped: {error}", ok=False), pd.DataFrame(rows, columns=IDENTITY_COLUMNS)
            return
        passes = sum(1 for row in rows if row[2] == "pass")
        gate = self.ctx.settings.eval_identity_min
        yield (notice(f"{passes}/{len(rows)} passed (gate needs {gate:.0%}) with {adapter or 'active'}",
                      ok=passes / len(rows) >= gate),
               pd.DataFrame(rows, columns=IDENTITY_COLUMNS))

    def selector(self, label: str, value: str, **kwargs: Any) -> gr.Dropdown:
        """An adapter picker; custom values let API clients name any version (the chat worker checks it)."""
        return gr.Dropdown(label=label, choices=self.choices(), value=value, allow_custom_value=True, **kwargs)

    def on_load(self) -> tuple[Any, ...]:
        choices = self.choices()
        return (gr.update(choices=choices, value="active"), gr.update(choices=choices, value="active"),
                gr.update(choices=choices, value="base"), gr.update(choices=choices, value="active"))

    def build(self) -> list[Any]:
        with gr.Row():
            adapter = self.selector("Chat with", "active", scale=3, elem_id="play-adapter")
            reload = gr.Button("Reload versions", scale=1)
        with gr.Accordion("Sampling", open=False, elem_id="play-sampling"), gr.Row():
            temperature = gr.Slider(0, 2, value=self.ctx.settings.temperature, step=0.05,
                                    label="Temperature (0 = greedy)", elem_id="play-temperature")
            max_new_tokens = gr.Number(min(self.ctx.settings.max_new_tokens, 256), label="Max new tokens",
                                       precision=0, minimum=1, maximum=8192, elem_id="play-max-tokens")
        chatbot = gr.Chatbot(label="Chat", height=360, elem_id="play-chat")
        history = gr.State([])
        with gr.Row():
            message = gr.Textbox(placeholder="Ask something…", show_label=False, scale=5, elem_id="play-input")
            send = gr.Button("Send", variant="primary", scale=1, elem_id="play-send")
            clear = gr.Button("Clear", scale=1)
        chat_note = gr.HTML(elem_id="play-note")

        gr.Markdown("### Side by side")
        with gr.Row():
            adapter_a = self.selector("Left", "active", elem_id="compare-left")
            adapter_b = self.selector("Right", "base", elem_id="compare-right")
        question = gr.Textbox(label="Question", elem_id="compare-question")
        compare = gr.Button("Ask both", elem_id="compare-run")
        with gr.Row():
            with gr.Column():
                answer_a = gr.Textbox(label="Left answer", lines=5, interactive=False, elem_id="compare-a")
                note_a = gr.HTML()
            with gr.Column():
                answer_b = gr.Textbox(label="Right answer", lines=5, interactive=False, elem_id="compare-b")
                note_b = gr.HTML()

        gr.Markdown("### Identity test")
        with gr.Row():
            test_adapter = self.selector("Adapter", "active", scale=3, elem_id="identity-adapter")
            run_test = gr.Button("Run identity test", scale=1, elem_id="identity-run")
        test_note = gr.HTML(elem_id="identity-note")
        test_table = gr.Dataframe(headers=IDENTITY_COLUMNS, interactive=False, wrap=True,
                                  column_widths=["30%", "45%", "8%", "17%"], elem_id="identity-table")

        chat_io = ([message, history, adapter, temperature, max_new_tokens],
                   [message, chatbot, history, chat_note])
        send.click(self.chat, *chat_io, api_name="chat")
        message.submit(self.chat, *chat_io, api_visibility="private")
        clear.click(self.clear, None, [chatbot, history, chat_note], api_visibility="private")
        compare.click(self.compare, [question, adapter_a, adapter_b, temperature, max_new_tokens],
                      [answer_a, answer_b, note_a, note_b],
                      api_name="compare")
        run_test.click(self.identity_test, test_adapter, [test_note, test_table], api_name="identity_test")
        selectors = [adapter, adapter_a, adapter_b, test_adapter]
        reload.click(self.on_load, None, selectors, api_visibility="private")
        return selectors
