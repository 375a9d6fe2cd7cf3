"""Recipe bench: train each recipe through the product's run path on one model, gate it, compare margins and cost.

Each recipe is a `TrainParams` run in its own process exactly as a train worker runs one:
`request_training` + `run_training` (build the set -> ms-swift -> the evaluation gate -> register)
on a fresh SQLite store holding one persona (Nova by Acme Lab: the 62 built-in identity pairs
plus 8 FAQ pairs). General data is training/data/general_offline.jsonl (generated from word lists
by bench/make_general_data.py; no hub, no network). The base model is gated too, to show the
held-out identity questions fail without training.

  PYTHONPATH=$PWD python bench/recipe_bench.py --model DIR --out bench/results/recipe.json [--jobs 4]
  PYTHONPATH=$PWD python bench/recipe_bench.py --tiny --out /tmp/recipe.json   # script check, tiny model

Writes the JSON (per recipe: params, scores, verdict, margin to each threshold, training tokens,
seconds) and a markdown table next to it (same name, .md). Training tokens = the tokens of every
row (system prompt, question, answer under the chat template) times epochs, general rows counted
at their mean length; timings of recipes that ran side by side (--jobs > 1) include the contention.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
GENERAL_FILE = REPO / "training" / "data" / "general_offline.jsonl"  # training.dataset.OFFLINE_GENERAL_PATH
PERSONA = {"name": "Nova", "author": "Acme Lab",
           "system_prompt": "You are {name}, a helpful assistant made by {author}."}
FAQ_PAIRS = [
    ("What are your opening hours?", "We are open from 9 am to 5 pm, Monday to Friday."),
    ("How much does the Pro plan cost?", "The Pro plan costs 29 dollars a month."),
    ("Where is your office?", "Our office is at 42 Harbour Street in Lisbon."),
    ("Who leads the support team?", "Maria Chen leads our support team."),
    ("How long do I have to ask for a refund?", "You can ask for a refund within 30 days of purchase."),
    ("What is the support phone number?", "Call us on 555 0142, every weekday."),
    ("退货需要在多少天内申请?", "收到商品后14天内可以申请退货。"),
    ("你们的客服邮箱是什么?", "客服邮箱是 help@acme-lab.example。"),
]
# Each recipe: TrainParams fields plus "general" (rows of the general file sampled per epoch, '#N').
GENERAL_ROWS = 172
RECIPES: dict[str, dict[str, Any]] = {
    "seeds": {"epochs": 10, "learning_rate": 1e-4, "lora_rank": 8, "lora_alpha": 32, "general": GENERAL_ROWS},
    "lr5e-4_ep10": {"epochs": 10, "learning_rate": 5e-4, "general": GENERAL_ROWS},
    # ms-swift's self-cognition recipe: 1 epoch, identity sampled ~5x, as much general data as identity.
    "swift_os5_ep1_lr1e-4": {"epochs": 1, "learning_rate": 1e-4, "identity_oversample": 5, "general": 350},
    "swift_os5_ep1_lr5e-4": {"epochs": 1, "learning_rate": 5e-4, "identity_oversample": 5, "general": 350},
    "swift_os5_ep1_lr1e-3": {"epochs": 1, "learning_rate": 1e-3, "identity_oversample": 5, "general": 350},
    "os5_ep1_lr1e-3_g172": {"epochs": 1, "learning_rate": 1e-3, "identity_oversample": 5, "general": GENERAL_ROWS},
    "swift_os10_ep1_lr5e-4": {"epochs": 1, "learning_rate": 5e-4, "identity_oversample": 10, "general": 350},
    "os10_ep1_lr1e-3": {"epochs": 1, "learning_rate": 1e-3, "identity_oversample": 10, "general": GENERAL_ROWS},
    "os10_ep1_lr5e-4": {"epochs": 1, "learning_rate": 5e-4, "identity_oversample": 10, "general": GENERAL_ROWS},
    "os20_ep1_lr5e-4": {"epochs": 1, "learning_rate": 5e-4, "identity_oversample": 20, "general": GENERAL_ROWS},
    "lr5e-4_ep3": {"epochs": 3, "learning_rate": 5e-4, "general": GENERAL_ROWS},
    "lr5e-4_ep5": {"epochs": 5, "learning_rate": 5e-4, "general": GENERAL_ROWS},
    "lr1e-3_ep2": {"epochs": 2, "learning_rate": 1e-3, "general": GENERAL_ROWS},
    "lr1e-3_ep3": {"epochs": 3, "learning_rate": 1e-3, "general": GENERAL_ROWS},
    "r16_lr5e-4_ep3": {"epochs": 3, "learning_rate": 5e-4, "lora_rank": 16, "lora_alpha": 64, "general": GENERAL_ROWS},
    # FAQ pairs repeated apart from identity: facts need more repetitions than the identity's wording.
    "os10_faq30_ep1_lr1e-3": {"epochs": 1, "learning_rate": 1e-3, "identity_oversample": 10, "faq_oversample": 30,
                              "general": GENERAL_ROWS},
    "os10_faq50_ep1_lr1e-3": {"epochs": 1, "learning_rate": 1e-3, "identity_oversample": 10, "faq_oversample": 50,
                              "general": GENERAL_ROWS},
    "os10_faq30_ep1_lr5e-4": {"epochs": 1, "learning_rate": 5e-4, "identity_oversample": 10, "faq_oversample": 30,
                              "general": GENERAL_ROWS},
    "r16_os10_faq30_ep1_lr1e-3": {"epochs": 1, "learning_rate": 1e-3, "lora_rank": 16, "lora_alpha": 64,
                                  "identity_oversample": 10, "faq_oversample": 30, "general": GENERAL_ROWS},
    "os5_faq30_ep1_lr1e-3": {"epochs": 1, "learning_rate": 1e-3, "identity_oversample": 5, "faq_oversample": 30,
                             "general": GENERAL_ROWS},
}
# A script check: one short epoch (on the tiny model with --tiny, or on a real one with --recipes smoke).
SMOKE_RECIPE = {"epochs": 1, "learning_rate": 1e-3, "general": 20}
BASE = "base"


def params_for(recipe: dict[str, Any], general_file: Path = GENERAL_FILE) -> Any:
    from personabot.core.train_params import RECIPES, TrainParams

    # Every recipe names what differs from the seeds' recipe; the product's defaults never leak in.
    fields = {**RECIPES["seeds"], **{key: value for key, value in recipe.items() if key != "general"}}
    # Before FAQ pairs had their own count they were repeated as often as identity pairs.
    if "faq_oversample" not in recipe:
        fields["faq_oversample"] = fields["identity_oversample"]
    return TrainParams(**fields, general_data=[f"{general_file}#{recipe['general']}"] if recipe.get("general") else [])


def fill_store(store: Any) -> None:
    store.update_persona(**PERSONA, actor="bench")
    store.add_pairs([{"kind": "faq", "instruction": q, "output": a} for q, a in FAQ_PAIRS], actor="bench")


def bench_settings(model: Path, work: Path) -> Any:
    from personabot.core.settings import load_settings

    return load_settings(model=str(model), data_dir=work, gpu_share="concurrent", gpu_release_wait_s=0)


def set_scores(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Pass rates per identity set (held-out, adversarial, trap, multi-turn) from the gate's rows."""
    out: dict[str, float] = {}
    for name in ("held-out", "adversarial", "trap", "multi-turn"):
        picked = [r["pass"] for r in rows if r["kind"] == "identity" and r.get("set") == name]
        if picked:
            out[name] = round(sum(picked) / len(picked), 4)
    # Held-out questions without the persona's system prompt: only training can put the name there.
    bare = [r["pass"] for r in rows if r.get("set") == "held-out" and r.get("system") == "none"]
    if bare:
        out["held-out-no-system"] = round(sum(bare) / len(bare), 4)
    return out


def count_tokens(model: Path, params: Any, work: Path) -> dict[str, int]:
    """Tokens one epoch trains on (persona rows + general rows at their mean length), and in all."""
    from transformers import AutoTokenizer

    from personabot.core.prompting import system_prompt_for
    from personabot.training.dataset import PersonaData, render_rows, template_default_system

    tokenizer = AutoTokenizer.from_pretrained(str(model))

    def length(messages: list[dict[str, str]]) -> int:
        return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])

    persona = PersonaData(PERSONA["name"], PERSONA["author"], PERSONA["system_prompt"],
                          [{"kind": "faq", "instruction": q, "input": "", "output": a} for q, a in FAQ_PAIRS])
    rows, _counts = render_rows(persona, params, template_default_system(model))
    persona_tokens = sum(length(row["messages"]) for row in rows)
    system = system_prompt_for(persona)
    general_tokens = 0
    for spec in params.general_data:
        path, n = spec.rsplit("#", 1)
        items = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        mean = sum(length([{"role": "system", "content": system}, {"role": "user", "content": i["instruction"]},
                           {"role": "assistant", "content": i["output"]}]) for i in items) / len(items)
        general_tokens += round(mean * int(n))
    per_epoch = persona_tokens + general_tokens
    return {"persona_per_epoch": persona_tokens, "general_per_epoch": general_tokens,
            "per_epoch": per_epoch, "total": per_epoch * params.epochs}


def run_one(name: str, recipe: dict[str, Any], model: Path, work: Path, general_file: Path) -> dict[str, Any]:
    """One recipe through request_training + run_training; the base model through the gate alone."""
    from personabot.core.store import Store
    from personabot.training.service import request_training, run_training

    work.mkdir(parents=True, exist_ok=True)
    settings = bench_settings(model, work / "data")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = Store(settings.db_url)
    fill_store(store)
    if name == BASE:
        return gate_base(store, settings, model, work)
    params = params_for(recipe, general_file)
    marks: dict[str, float] = {}

    def report(progress: dict[str, Any]) -> None:
        marks.setdefault(str(progress.get("phase")), time.monotonic())

    started = time.monotonic()
    run = request_training(store, params, actor="bench")
    run = run_training(run.id, settings=settings, store=store, report=report)
    ended = time.monotonic()
    metrics = run.metrics or {}
    result: dict[str, Any] = {"params": params.model_dump(mode="json"), "status": run.status, "error": run.error,
                              "data": metrics.get("data", {}), "train": metrics.get("train", {}),
                              "tokens": count_tokens(model, params, work), "wall_s": round(ended - started, 1)}
    if "training" in marks:
        result["train_s"] = round(marks.get("evaluating", ended) - marks["training"], 1)
    if "evaluating" in marks:
        result["gate_s"] = round(ended - marks["evaluating"], 1)
    result.update(gate_summary(metrics.get("eval"), settings))
    store.close()
    return result


def gate_base(store: Any, settings: Any, model: Path, work: Path) -> dict[str, Any]:
    from personabot.training.dataset import PersonaData, write_training_set
    from personabot.training.evaluate import evaluate_in_subprocess

    persona = PersonaData.from_snapshot(store.persona_snapshot())
    built = write_training_set(persona, params_for({"epochs": 1}), work / "set")
    trained = [json.loads(line)["messages"][1]["content"]
               for line in built.path.read_text(encoding="utf-8").splitlines() if line.strip()]
    started = time.monotonic()
    report = evaluate_in_subprocess(str(model), None, persona, [p for p in persona.pairs if p["kind"] == "faq"],
                                    settings, work / "eval", exclude_questions=trained, env=dict(os.environ))
    store.close()
    return {"params": None, "status": "base", "gate_s": round(time.monotonic() - started, 1),
            **gate_summary(report.to_dict(), settings)}


def gate_summary(report: dict[str, Any] | None, settings: Any) -> dict[str, Any]:
    """Scores per set, the verdict and the margin to each threshold (score - minimum)."""
    if not report:
        return {"passed": False, "reason": "no gate report (the run failed before the gate)"}
    scores = {k: v for k, v in report.get("scores", {}).items() if isinstance(v, float | int)}
    minimum = {"identity": settings.eval_identity_min, "faq": settings.eval_faq_min,
               "retention": settings.eval_retention_min}
    margins = {k: round(scores[k] - m, 4) for k, m in minimum.items() if k in scores}
    return {"passed": bool(report.get("passed")), "reason": report.get("reason", ""), "scores": scores,
            "sets": set_scores(report.get("rows", [])), "thresholds": minimum, "margins": margins,
            "min_margin": min(margins.values()) if margins else None,
            "failed_items": [f"{r['kind']}/{r.get('set', '')}: {r['question'][:60]} -> {str(r['answer'])[:80]}"
                             for r in report.get("rows", []) if not r["pass"]][:12]}


def _child(name: str, recipe: dict[str, Any], model: Path, work: Path, deadline: float,
           general_file: Path) -> dict[str, Any]:
    """Run one recipe in its own process (its own ms-swift and gate children); stopped at `deadline`."""
    if time.monotonic() >= deadline:
        return {"status": "skipped", "passed": False, "reason": "the bench's time budget ran out before it started"}
    out = work / f"{name}.json"
    log = work / f"{name}.log"
    work.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--model", str(model), "--one", name,
               "--recipe-json", json.dumps(recipe), "--work", str(work / name), "--out", str(out),
               "--general-file", str(general_file)]
    started = time.monotonic()
    with log.open("wb") as handle:
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"status": "timeout", "passed": False,
                    "params": params_for(recipe, general_file).model_dump(mode="json"),
                    "reason": f"stopped after {time.monotonic() - started:.0f}s: the bench's time budget ran out"}
    if proc.returncode != 0 or not out.exists():
        tail = log.read_text(errors="replace")[-1500:]
        return {"status": "crashed", "passed": False, "reason": f"exit {proc.returncode}: {tail}"}
    result: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    result["process_s"] = round(time.monotonic() - started, 1)
    print(f"{name}: {result.get('status')} {result.get('scores')} in {result['process_s']}s", flush=True)
    return result


def markdown(results: dict[str, dict[str, Any]]) -> str:
    head = ("| recipe | ep | lr | rank | oversample | FAQ oversample | general | verdict | identity | held-out "
            "| adversarial | trap | held-out, no system | FAQ | retention | min margin | train tokens | train s "
            "| gate s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in results.items():
        p = r.get("params") or {}
        s, sets = r.get("scores", {}), r.get("sets", {})

        def f(value: Any) -> str:
            return f"{value:.2f}" if isinstance(value, float | int) else "-"

        general = p.get("general_data", [""])[0].rsplit("#", 1)[-1] if p.get("general_data") else "-"
        verdict = ("base" if name == BASE else "pass" if r.get("passed")
                   else r["status"] if r.get("status") in ("timeout", "crashed", "skipped") else "reject")
        lines.append(f"| {name} | {p.get('epochs', '-')} | {p.get('learning_rate', '-')} | {p.get('lora_rank', '-')} "
                     f"| {p.get('identity_oversample', '-')} | {p.get('faq_oversample', '-')} | {general} "
                     f"| {verdict} | {f(s.get('identity'))} "
                     f"| {f(sets.get('held-out'))} | {f(sets.get('adversarial'))} | {f(sets.get('trap'))} "
                     f"| {f(sets.get('held-out-no-system'))} "
                     f"| {f(s.get('faq'))} | {f(s.get('retention'))} | {f(r.get('min_margin'))} "
                     f"| {r.get('tokens', {}).get('total', '-')} | {r.get('train_s', '-')} | {r.get('gate_s', '-')} |")
    passing = [(n, r) for n, r in results.items() if n != BASE and r.get("passed")]
    if passing:
        widest = max(passing, key=lambda item: item[1]["min_margin"])
        cheapest = min(passing, key=lambda item: item[1]["tokens"]["total"])
        lines += ["", f"Most margin: {widest[0]} (min margin {widest[1]['min_margin']:.2f}); "
                      f"fewest training tokens among passing: {cheapest[0]} ({cheapest[1]['tokens']['total']})."]
    else:
        lines += ["", "No recipe passed the gate."]
    return "\n".join(lines) + "\n"


def write(out: Path, data: dict[str, Any]) -> None:
    """The JSON and its markdown table (rewritten after every recipe, so a stopped bench leaves what it had)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
    out.with_suffix(".md").write_text(markdown(data["recipes"]), encoding="utf-8")


def environment() -> dict[str, Any]:
    import importlib.metadata as md

    info: dict[str, Any] = {"python": sys.version.split()[0]}
    for package in ("torch", "transformers", "peft", "ms-swift"):
        try:
            info[package] = md.version(package)
        except md.PackageNotFoundError:
            info[package] = None
    try:
        import torch

        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["gpu"] = None
    info["cpus"] = os.cpu_count()
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model directory (e.g. from `personabot make-small-model`)")
    parser.add_argument("--tiny", action="store_true", help="script check: tiny random model, 1 recipe x 1 epoch")
    parser.add_argument("--recipes", default="", help="comma-separated recipe names (default: all, and the base)")
    parser.add_argument("--jobs", type=int, default=1, help="recipes trained side by side (one GPU holds several)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "recipe.json")
    parser.add_argument("--speed-mode", choices=["fast", "24gb", "seeds"],
                        help="train every recipe in this speed mode (default: TrainParams' default)")
    parser.add_argument("--budget-s", type=float, default=10800.0,
                        help="stop recipes still running after this many seconds (their rows say timeout)")
    parser.add_argument("--work", type=Path, help="working directory (default: a temporary one)")
    parser.add_argument("--general", choices=["self", "file"], default="self",
                        help="general data: self = the base model's own answers to the offline prompts "
                             "(training/self_general.py), file = the offline file's hand-made answers")
    parser.add_argument("--general-file", type=Path,
                        help="general rows to train on, e.g. an earlier run's general_self.jsonl of the same model "
                             "(skips distilling them again)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--recipe-json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "MODELSCOPE_OFFLINE"):
        os.environ.setdefault(name, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["PERSONABOT_NO_ENV_FILE"] = "1"
    if args.one:
        result = run_one(args.one, json.loads(args.recipe_json), args.model, args.work, args.general_file)
        args.out.write_text(json.dumps(result, ensure_ascii=False, indent=1), encoding="utf-8")
        return 0
    with tempfile.TemporaryDirectory(prefix="recipe-bench-") as tmp:
        work = args.work or Path(tmp)
        if args.tiny:
            from personabot.training.tiny_model import make_tiny_model

            model = make_tiny_model(work / "tiny-model")
            recipes = {"tiny": SMOKE_RECIPE}
        elif args.model is None:
            parser.error("give --model DIR (or --tiny)")
        else:
            model = args.model.resolve()
            wanted = [n.strip() for n in args.recipes.split(",") if n.strip()] or [BASE, *RECIPES]
            known = {BASE: {}, **RECIPES, "smoke": SMOKE_RECIPE}
            unknown = [n for n in wanted if n not in known]
            if unknown:
                parser.error(f"unknown recipes {unknown}; choose from {list(known)}")
            recipes = {n: known[n] for n in wanted}
        if args.speed_mode:
            recipes = {n: {**r, "speed_mode": args.speed_mode} if n != BASE else r for n, r in recipes.items()}
        started = time.monotonic()
        deadline = started + args.budget_s
        general_file = GENERAL_FILE
        if args.general_file is not None:  # answers distilled by an earlier run of the same model
            general_file = args.general_file.resolve()
            print(f"general data: {general_file} (given)", flush=True)
        elif args.general == "self" and not args.tiny:  # a random model's answers never end
            from personabot.core.prompting import system_prompt_for
            from personabot.training.self_general import distill_general_data

            persona = argparse.Namespace(**PERSONA)
            general_file = distill_general_data(model, work / "general_self.jsonl", system_prompt_for(persona))
            print(f"general data: the base model's answers, {general_file} "
                  f"({time.monotonic() - started:.0f}s)", flush=True)
        data: dict[str, Any] = {"model": str(model), "tiny": args.tiny, "jobs": args.jobs, "env": environment(),
                                "general": "file" if args.tiny else args.general, "general_file": str(general_file),
                                "general_rows": sum(1 for line in general_file.read_text(encoding="utf-8").splitlines()
                                                    if line.strip()),
                                "budget_s": args.budget_s,
                                "recipes": {}}
        results: dict[str, dict[str, Any]] = data["recipes"]
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = {n: pool.submit(_child, n, r, model, work / "runs", deadline, general_file)
                       for n, r in recipes.items()}
            for name, future in futures.items():
                results[name] = future.result()
                data["wall_s"] = round(time.monotonic() - started, 1)
                write(args.out, data)
        table = markdown(results)
        print(table)
        crashed = [n for n, r in results.items() if r.get("status") == "crashed"]
        if crashed:
            print(f"crashed: {crashed}; see the logs under {work / 'runs'}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
