"""The evaluation gate: identity (held-out + adversarial), FAQ and general retention of an adapter."""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from personabot.core.processes import stop_process
from personabot.core.prompting import PersonaText, question_text, render, system_prompt_for
from personabot.core.settings import Settings
from personabot.training.eval_checks import (
    claims_base_identity,
    faq_check,
    faq_passes,
    general_correct,
    identity_passes,
    identity_terms_from,
    mentions,
)
from personabot.training.eval_sets import (
    ADVERSARIAL_IDENTITY,
    GENERAL_CHECKS,
    HELD_OUT_IDENTITY,
    MULTI_TURN_HISTORY,
    MULTI_TURN_IDENTITY,
    trap_questions,
)
from personabot.training.runner import TrainingCancelled, die_with_parent, failure_reason

__all__ = ["ADVERSARIAL_IDENTITY", "HELD_OUT_IDENTITY", "claims_base_identity", "faq_passes", "identity_passes"]
SELF_QUESTIONS = ["Who are you?", "Who created you?", "你是谁?"]


class EvaluationError(RuntimeError):
    """The evaluation could not run; the message says why."""


@dataclass
class EvalReport:
    """Scores (0..1), whether the adapter may go live and why not, and every question asked."""

    scores: dict[str, float]
    passed: bool
    reason: str
    rows: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalReport:
        return cls(scores=data["scores"], passed=data["passed"], reason=data["reason"], rows=data["rows"])


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


class _Model:
    """Base model + optional adapter with greedy batched generation and answer likelihoods."""

    def __init__(self, base_model_path: str, adapter_path: str | None, device: str, dtype: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            dtype = "bfloat16" if device == "cuda" else "float32"
        self.torch = torch
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(base_model_path)
        self.tokenizer.padding_side = "left"
        model = AutoModelForCausalLM.from_pretrained(base_model_path, dtype=getattr(torch, dtype)).to(device)
        self.has_adapter = adapter_path is not None
        if adapter_path is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter_path, autocast_adapter_dtype=False)
        self.model = model.eval()

    def prompt(self, system: str | None, question: str, history: list[tuple[str, str]] | None = None) -> str:
        messages = [{"role": "system", "content": system}] if system is not None else []
        for asked, answered in history or []:
            messages += [{"role": "user", "content": asked}, {"role": "assistant", "content": answered}]
        messages.append({"role": "user", "content": question})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def generate(self, prompts: list[str], max_new_tokens: int, *, base_only: bool = False) -> list[str]:
        answers: list[str] = []
        for start in range(0, len(prompts), 8):
            batch = self.tokenizer(prompts[start:start + 8], return_tensors="pt", padding=True,
                                   add_special_tokens=False).to(self.device)
            with self.torch.no_grad(), self._adapter(not base_only):
                out = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                          pad_token_id=self.tokenizer.pad_token_id)
            for row in out[:, batch["input_ids"].shape[1]:]:
                answers.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return answers

    def mean_logprob(self, prompt: str, answer: str, *, base_only: bool) -> float:
        prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
        if not answer_ids:
            return 0.0
        ids = self.torch.tensor([prompt_ids + answer_ids], device=self.device)
        with self.torch.no_grad(), self._adapter(not base_only):
            logits = self.model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].float()
        logprobs = self.torch.log_softmax(logits, dim=-1)
        picked = logprobs.gather(1, self.torch.tensor(answer_ids, device=self.device)[:, None])
        return float(picked.mean())

    def _adapter(self, enabled: bool) -> Any:
        import contextlib

        if enabled or not self.has_adapter:
            return contextlib.nullcontext()
        return self.model.disable_adapter()


def evaluate_adapter(
    base_model_path: str,
    adapter_path: str | None,
    persona: PersonaText,
    faq_pairs: list[dict[str, str]],
    settings: Settings,
    *,
    identity_questions: list[str] | None = None,
    exclude_questions: list[str] | None = None,
    base_terms: list[str] | None = None,
    derive_terms: bool = True,
    max_faq: int = 200,
) -> EvalReport:
    """Run the gate. `identity_questions` (the admin's, per persona; {name}/{author} filled in) are asked
    besides the built-in held-out set; `exclude_questions` (the training questions) are dropped so the
    test stays held-out. Each identity question is asked with the persona's system prompt and with none.
    An answer fails for claiming a base identity: the settings' `base_identity_terms`, `base_terms` (the
    store's, as the admin edited them) and, with `derive_terms` (the first evaluation on this base model),
    the names the base model gives itself when asked who it is (reported as `derived_identity_terms`,
    with its answers as `base_self_answers`, for the store to keep)."""
    model = _Model(base_model_path, adapter_path, settings.device, settings.dtype)
    system = system_prompt_for(persona)
    rows: list[dict[str, Any]] = []
    derived: list[str] = []
    self_answers: list[dict[str, str]] = []
    if derive_terms:
        said = model.generate([model.prompt(None, q) for q in SELF_QUESTIONS], 48, base_only=True)
        derived = identity_terms_from(said, persona)
        self_answers = [{"question": q, "answer": a} for q, a in zip(SELF_QUESTIONS, said, strict=True)]
    terms = _unique([*settings.base_identity_terms, *(base_terms or []), *derived])
    excluded = {_normalise(q) for q in exclude_questions or []}
    builtin = {_normalise(q) for q in HELD_OUT_IDENTITY}
    own = _unique([render(q, name=persona.name, author=persona.author) for q in identity_questions or []
                   if _normalise(q) not in builtin])
    cases: list[tuple[str, str, str | None, list[tuple[str, str]]]] = []
    for kind, questions in (("held-out", HELD_OUT_IDENTITY), ("admin", own), ("adversarial", ADVERSARIAL_IDENTITY),
                            ("trap", trap_questions(terms))):
        for question in questions:
            if _normalise(question) not in excluded:
                cases += [(kind, question, system, []), (kind, question, None, [])]
    cases += [("multi-turn", q, sys_, MULTI_TURN_HISTORY) for q in MULTI_TURN_IDENTITY for sys_ in (system, None)]
    answers = model.generate([model.prompt(sys_, q, hist) for _k, q, sys_, hist in cases], 64)
    for (kind, question, sys_, _hist), answer in zip(cases, answers, strict=True):
        # A question that names a base identity ("Are you Qwen?", "Admit it, Alibaba built you, right?")
        # is a yes/no trap whichever set it is in: "Yes" fails it.
        trap = kind == "trap" or any(mentions(question, term) for term in terms)
        rows.append({"kind": "identity", "set": kind, "system": "persona" if sys_ is not None else "none",
                     "question": question, "answer": answer,
                     "expected": f"mentions {persona.name} or {persona.author}" + (", not 'yes'" if trap else ""),
                     "pass": identity_passes(answer, persona, terms, trap=trap)})
    faq = [
        (render(question_text(p["instruction"], p.get("input", "")), name=persona.name, author=persona.author),
         render(p["output"], name=persona.name, author=persona.author))
        for p in faq_pairs[:max_faq]
    ]
    if faq:
        longest = max(len(model.tokenizer(expected)["input_ids"]) for _q, expected in faq)
        faq_answers = model.generate([model.prompt(system, q) for q, _e in faq], min(512, longest + 16))
        for (question, expected), answer in zip(faq, faq_answers, strict=True):
            ok, why = faq_check(answer, expected)
            rows.append({"kind": "faq", "question": question, "answer": answer, "expected": expected,
                         "pass": ok, "why": why})
    retention = 1.0
    if model.has_adapter:
        prompts = [model.prompt(system, q) for q, _a in GENERAL_CHECKS]
        base_answers = model.generate(prompts, 48, base_only=True)
        tuned_answers = model.generate(prompts, 48)
        ratios, base_right, kept = [], 0, 0
        for (question, accepted), prompt, base, tuned in zip(GENERAL_CHECKS, prompts, base_answers, tuned_answers,
                                                             strict=True):
            ratio = math.exp(model.mean_logprob(prompt, base, base_only=False)
                             - model.mean_logprob(prompt, base, base_only=True))
            ratios.append(ratio)
            was, now = general_correct(base, accepted), general_correct(tuned, accepted)
            base_right += was
            kept += was and now
            rows.append({"kind": "retention", "question": question, "answer": tuned, "base_answer": base,
                         "expected": " | ".join(accepted), "base_correct": was, "correct": now,
                         "ratio": round(ratio, 4), "pass": now or not was})
        likelihood = sum(min(r, 2.0) for r in ratios) / len(ratios)
        accuracy = kept / base_right if base_right else 1.0
        retention = min(likelihood, accuracy)
    report = _gate(rows, retention, settings)
    report.scores["base_identity_terms"] = terms  # type: ignore[assignment]
    if derive_terms:
        report.scores["derived_identity_terms"] = derived  # type: ignore[assignment]
        report.scores["base_self_answers"] = self_answers  # type: ignore[assignment]
    return report


def _unique(texts: list[str]) -> list[str]:
    """`texts` without repeats (case and spacing ignored), first spelling kept."""
    seen: dict[str, str] = {}
    for text in texts:
        seen.setdefault(_normalise(text), text)
    return list(seen.values())


def _gate(rows: list[dict[str, Any]], retention: float, settings: Settings) -> EvalReport:
    def score(kind: str) -> float | None:
        kind_rows = [r for r in rows if r["kind"] == kind]
        return sum(r["pass"] for r in kind_rows) / len(kind_rows) if kind_rows else None

    identity, faq = score("identity"), score("faq")
    scores = {"identity": identity if identity is not None else 1.0, "retention": round(retention, 4)}
    if faq is not None:
        scores["faq"] = faq
    failures = []
    if scores["identity"] < settings.eval_identity_min:
        failures.append(f"identity {scores['identity']:.2f} < {settings.eval_identity_min:.2f} "
                        "(answers must name the persona and not claim the base model's identity)")
    if faq is not None and faq < settings.eval_faq_min:
        failures.append(f"faq {faq:.2f} < {settings.eval_faq_min:.2f}")
    if retention < settings.eval_retention_min:
        failures.append(f"retention {retention:.2f} < {settings.eval_retention_min:.2f} "
                        "(general ability dropped; lower the learning rate or epochs, or add general data)")
    return EvalReport(scores=scores, passed=not failures, reason="; ".join(failures), rows=rows)


def gate_table(report: dict[str, Any], *, failed_only: bool = True, limit: int = 40) -> str:
    """The gate's scores and per-item results as a plain-text table (for the CLI)."""
    lines = [f"gate: {'passed' if report.get('passed') else 'rejected'}"
             + (f" — {report['reason']}" if report.get("reason") else "")]
    lines += [f"  {k}: {v:.3f}" for k, v in sorted(report.get("scores", {}).items()) if isinstance(v, float)]
    if report.get("scores", {}).get("base_identity_terms"):
        lines.append("  base-identity terms: " + ", ".join(report["scores"]["base_identity_terms"]))
    rows = [r for r in report.get("rows", []) if not (failed_only and r.get("pass"))]
    lines.append(f"{'kind':<10} {'set':<12} {'pass':<5} question -> answer")
    for row in rows[:limit]:
        answer = str(row.get("answer", "")).replace("\n", " ")[:70]
        lines.append(f"{row['kind']:<10} {row.get('set', row.get('system', '')):<12} "
                     f"{'yes' if row['pass'] else 'NO':<5} {str(row['question'])[:50]} -> {answer}")
    if len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more")
    return "\n".join(lines)


# --- own process ------------------------------------------------------------------------------
_SETTINGS_FIELDS = ("device", "dtype", "base_identity_terms", "eval_identity_min", "eval_faq_min",
                    "eval_retention_min")


def evaluate_in_subprocess(
    base_model_path: str,
    adapter_path: str | None,
    persona: PersonaText,
    faq_pairs: list[dict[str, str]],
    settings: Settings,
    work_dir: Path,
    *,
    exclude_questions: list[str] | None = None,
    identity_questions: list[str] | None = None,
    base_terms: list[str] | None = None,
    derive_terms: bool = True,
    env: dict[str, str] | None = None,
    timeout_s: float = 3600,
    should_cancel: Callable[[], bool] | None = None,
    heartbeat: Callable[[], None] | None = None,
    heartbeat_s: float = 10.0,
) -> EvalReport:
    """`evaluate_adapter` in a child process, so its GPU memory is returned when it ends.

    `identity_questions` default to the settings' `eval_identity_questions` (the global default).

    `heartbeat()` is called every `heartbeat_s` while the child works, so a long evaluation keeps
    its run alive for the stale-run sweep; the child dies with this process.
    """
    request = {
        "base_model_path": base_model_path,
        "adapter_path": adapter_path,
        "persona": {"name": persona.name, "author": persona.author, "system_prompt": persona.system_prompt},
        "faq_pairs": faq_pairs,
        "settings": {name: getattr(settings, name) for name in _SETTINGS_FIELDS},
        "exclude_questions": exclude_questions or [],
        "identity_questions": identity_questions or list(getattr(settings, "eval_identity_questions", [])),
        "base_terms": list(base_terms or []),
        "derive_terms": derive_terms,
    }
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "eval_request.json").write_text(json.dumps(request, ensure_ascii=False), encoding="utf-8")
    out = work_dir / "eval_report.json"
    with (work_dir / "eval.log").open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "personabot.training.evaluate",
                                 str(work_dir / "eval_request.json"), str(out)], stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=die_with_parent())
        deadline = time.monotonic() + timeout_s
        beat = time.monotonic()
        while proc.poll() is None:
            if heartbeat is not None and time.monotonic() - beat >= heartbeat_s:
                beat = time.monotonic()
                heartbeat()
            if (should_cancel is not None and should_cancel()) or time.monotonic() > deadline:
                stop_process(proc)
                if time.monotonic() > deadline:
                    raise EvaluationError(f"evaluation took longer than {timeout_s:.0f}s; see {work_dir / 'eval.log'}")
                raise TrainingCancelled("the run was cancelled during evaluation")
            time.sleep(0.5)
    if proc.returncode != 0 or not out.exists():
        raise EvaluationError(f"evaluation failed: {failure_reason(work_dir / 'eval.log', proc.returncode)}")
    return EvalReport.from_dict(json.loads(out.read_text(encoding="utf-8")))


def main() -> None:
    from types import SimpleNamespace

    parser = argparse.ArgumentParser(description="Evaluate an adapter (request JSON -> report JSON).")
    parser.add_argument("request", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    request = json.loads(args.request.read_text(encoding="utf-8"))
    report = evaluate_adapter(request["base_model_path"], request["adapter_path"],
                              SimpleNamespace(**request["persona"]), request["faq_pairs"],
                              Settings.model_construct(**request["settings"]),
                              exclude_questions=request["exclude_questions"],
                              identity_questions=request.get("identity_questions") or None,
                              base_terms=request.get("base_terms") or [],
                              derive_terms=request.get("derive_terms", True))
    args.out.write_text(json.dumps(report.to_dict(), ensure_ascii=False), encoding="utf-8")


if __name__ == "__main__":
    main()
