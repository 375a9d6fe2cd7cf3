"""Training speed: the seeds' `swift sft` flags vs our fast and 24gb modes, through training/runner.py.

On the GPU box (one call, see bench/RESULTS.md for the exact command):
    python3 bench/train_bench.py --out $OUT
builds a random bf16 model with Qwen2.5-7B-Instruct's architecture, the seeds' mixed data
(1,000 general + 50 identity samples of about 270 tokens), and runs each speed mode for a fixed
number of steps of the same 10-epoch schedule, stopping it through the runner's cancel path.
Writes train_bench.json. `--tiny` runs the same code on CPU with a tiny model (a dry run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from personabot.core.train_params import TrainParams
from personabot.training.dataset import PersonaData, write_training_set
from personabot.training.runner import PLUGIN_CONFIG, TrainingCancelled, TrainingFailed, run_sft, sft_command, sft_env

REPO = Path(__file__).resolve().parent.parent
QWEN25_7B = {
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
    "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 32768,
    "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
}
# Product modes (liger auto-detected; the fast run also traces its steps) and the seeds' flags.
VARIANTS: dict[str, dict[str, Any]] = {
    "fast": {"mode": "fast", "steps": 66, "liger": None,
             "plugin": {**PLUGIN_CONFIG["fast"], "step_hook": "bench.step_trace:StepTrace",
                        "trace": "/tmp/train_bench/fast-trace.json"}},
    "seeds": {"mode": "seeds", "steps": 6, "liger": False},
    "24gb": {"mode": "24gb", "steps": 20, "liger": None},
}
WORDS = [
    "the", "model", "answers", "questions", "about", "history", "science", "code", "travel",
    "cooking", "music", "health", "money", "language", "writing", "planning", "data", "water",
    "energy", "city", "river", "mountain", "story", "people", "because", "however", "therefore",
    "example", "first", "second", "finally", "important", "simple", "clear",
]


def build_model(model_dir: Path, tiny: bool) -> None:
    """Random weights in Qwen2.5-7B-Instruct's architecture (or tiny), ChatML tokenizer."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from personabot.training.tiny_model import build_tokenizer, make_tiny_model

    if tiny:
        make_tiny_model(model_dir)
        return
    tokenizer = build_tokenizer(4096)
    config = Qwen2Config(**QWEN25_7B, bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                         eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                         pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                         torch_dtype="bfloat16")
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    del model
    torch.cuda.empty_cache()


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + "."


def build_data(work: Path, model_dir: Path, n_general: int, target_tokens: int) -> tuple[Any, dict[str, Any]]:
    """General alpaca rows of lognormal length (mean about `target_tokens`) + 50 identity rows."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    per_word = len(tokenizer(_text(random.Random(0), 400))["input_ids"]) / 400
    rng = random.Random(1)
    general = work / "general.jsonl"
    with general.open("w", encoding="utf-8") as handle:
        for _ in range(n_general):
            tokens = min(1500, max(30, int(rng.lognormvariate(math.log(target_tokens) - 0.18, 0.6))))
            handle.write(json.dumps({"instruction": _text(rng, 12), "input": "",
                                     "output": _text(rng, max(5, int((tokens - 45) / per_word)))}) + "\n")
    persona = PersonaData(name="Nova", author="Acme Lab",
                          system_prompt="You are {name}, an assistant made by {author}.", pairs=[])
    params = TrainParams(general_data=[f"{general}#{n_general}"], min_identity_pairs=50, identity_oversample=1)
    built = write_training_set(persona, params, work / "data")
    lengths = []
    system = built.system_prompt
    for line in general.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": row["instruction"]},
                {"role": "assistant", "content": row["output"]}]
        lengths.append(_count(tokenizer, msgs))
    for line in built.path.read_text(encoding="utf-8").splitlines():
        lengths.append(_count(tokenizer, json.loads(line)["messages"]))
    stats = {"samples": len(lengths), "tokens": sum(lengths), "mean_tokens": round(statistics.mean(lengths), 1),
             "max_tokens": max(lengths), "counts": built.counts}
    return built, stats


def _count(tokenizer: Any, messages: list[dict[str, str]]) -> int:
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


class GpuMemPoller(threading.Thread):
    """Peak GPU memory in use on the card (nvidia-smi), which includes the CUDA context."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_mib = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5, check=False).stdout
                self.peak_mib = max(self.peak_mib, max(int(x) for x in out.split()))
            except (OSError, ValueError, subprocess.SubprocessError):
                return
            self.stop.wait(0.5)


def _override(command: list[str], overrides: dict[str, str]) -> list[str]:
    command = list(command)
    for flag, value in overrides.items():
        command[command.index(flag) + 1] = value
    return command


def run_mode(name: str, variant: dict[str, Any], built: Any, model_dir: Path, work: Path, max_wall_s: float,
             tiny: bool, tokens_per_epoch: int, samples: int) -> dict[str, Any]:
    """One speed mode (a variant: mode, liger, flag overrides, steps) stopped after `steps` steps."""
    mode, stop_step = variant["mode"], variant["steps"]
    params = TrainParams(epochs=10, identity_oversample=1, speed_mode=mode, general_data=built.dataset_args[1:],
                         min_identity_pairs=50, learning_rate=1e-4)
    out_dir = work / f"run-{name}"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    command = sft_command(model=str(model_dir), dataset_args=built.dataset_args, output_dir=out_dir,
                          params=params, torch_dtype="float32" if tiny else "bfloat16",
                          dataloader_workers=0 if tiny else 2, system=built.system_prompt,
                          liger=variant.get("liger"), plugin=variant.get("plugin", True) is not False)
    command = _override(command, variant.get("overrides", {}))
    command[command.index("--output_dir"):command.index("--output_dir")] = variant.get("add", [])
    env = {**os.environ, **sft_env(params, variant.get("plugin", True))}
    # The step hook (bench/step_trace.py) is imported inside the ms-swift process.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    points: list[dict[str, Any]] = []
    started = time.time()

    def on_progress(_progress: dict[str, Any], new: list[dict[str, Any]]) -> None:
        points.extend(new)

    def should_cancel() -> bool:
        return (bool(points) and points[-1]["step"] >= stop_step) or time.time() - started > max_wall_s

    poller = GpuMemPoller()
    if not tiny:
        poller.start()
    result: dict[str, Any] = {"mode": mode, "variant": variant, "command": command, "stop_step": stop_step,
                              "plugin_env": {k: v for k, v in env.items() if k.startswith("PERSONABOT_SWIFT")}}
    try:
        run_sft(command, out_dir, out_dir / "train.log", on_progress=on_progress,
                should_cancel=should_cancel, poll_s=0.1, progress_every_s=0.0, env=env)
        result["ended"] = "finished"
    except TrainingCancelled:
        result["ended"] = "stopped at step" if points and points[-1]["step"] >= stop_step else "wall limit"
    except TrainingFailed as error:
        result["ended"] = f"failed: {error.reason}"
        result["log_tail"] = (out_dir / "train.log").read_text(errors="replace")[-3000:]
    log_text = (out_dir / "train.log").read_text(errors="replace") if (out_dir / "train.log").exists() else ""
    result["plugin_lines"] = [line for line in log_text.splitlines() if "swift_fast" in line][:6]
    poller.stop.set()
    max_steps = points[-1]["max_steps"] if points else 0
    steps_per_epoch = max_steps / 10 if max_steps else 0
    steady = [p for p in points if p["step"] >= 2]
    s_per_step = ((steady[-1]["at"] - steady[0]["at"]) / (steady[-1]["step"] - steady[0]["step"])
                  if len(steady) >= 2 else None)
    tokens_per_step = tokens_per_epoch / steps_per_epoch if steps_per_epoch else None
    result.update({
        "steps_done": points[-1]["step"] if points else 0,
        "max_steps": max_steps,
        "startup_s": round(points[0]["at"] - started, 1) if points else None,
        "s_per_step": round(s_per_step, 4) if s_per_step else None,
        "tokens_per_s": round(tokens_per_step / s_per_step) if s_per_step and tokens_per_step else None,
        "train_10_epochs_s": round(s_per_step * max_steps) if s_per_step else None,
        "peak_reserved_gb": max((p["gpu_mem_gb"] or 0 for p in points), default=None),
        "peak_card_used_gb": round(poller.peak_mib / 1024, 2) if poller.peak_mib else None,
        "losses": [(p["step"], round(p["loss"], 4)) for p in points],
        "step_at_s": [(p["step"], round(p["at"] - started, 2)) for p in points],
        "samples": samples,
    })
    return result


def loss_at(result: dict[str, Any], step: int, window: int = 5) -> float | None:
    values = [loss for s, loss in result.get("losses", []) if step - window < s <= step]
    return round(statistics.mean(values), 4) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/train_bench"))
    parser.add_argument("--tiny", action="store_true", help="CPU dry run with a tiny model")
    parser.add_argument("--variants", default=json.dumps(VARIANTS),
                        help="JSON {name: {mode, steps, liger (null = auto), overrides {flag: value}}}")
    parser.add_argument("--max-wall-s", type=float, default=90)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"argv": sys.argv, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    try:
        import peft
        import swift
        import torch
        import transformers

        report["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                              "peft": peft.__version__, "ms-swift": swift.__version__, "python": sys.version.split()[0],
                              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    except ImportError as error:
        report["versions"] = {"error": str(error)}
    model_dir = args.work / "Qwen2.5-7B-Instruct"
    t0 = time.time()
    if not (model_dir / "config.json").exists():
        build_model(model_dir, args.tiny)
    report["build_model_s"] = round(time.time() - t0, 1)
    built, stats = build_data(args.work, model_dir, 40 if args.tiny else 1000, 60 if args.tiny else 245)
    report["data"] = stats
    report["modes"] = {}
    for name, variant in json.loads(args.variants).items():
        report["modes"][name] = run_mode(name, variant, built, model_dir, args.work, args.max_wall_s,
                                         args.tiny, stats["tokens"], stats["samples"])
        (args.out / "train_bench.json").write_text(json.dumps(report, indent=1))
    seeds = report["modes"].get("seeds", {})
    compare_step = seeds.get("steps_done") or 8
    print(f"data: {stats}")
    print(f"{'mode':11} {'s/step':>8} {'tok/s':>8} {'10ep s':>8} {'x seeds':>8} {'peak GB':>8} "
          f"{'card GB':>8} {'loss@' + str(compare_step):>9} ended")
    for mode, res in report["modes"].items():
        speedup = (round(seeds["s_per_step"] / res["s_per_step"], 2)
                   if seeds.get("s_per_step") and res.get("s_per_step") else None)
        res["speedup_vs_seeds"] = speedup
        res["loss_at_compare_step"] = loss_at(res, compare_step)
        print(f"{mode:11} {res.get('s_per_step')!s:>8} {res.get('tokens_per_s')!s:>8} "
              f"{res.get('train_10_epochs_s')!s:>8} {speedup!s:>8} {res.get('peak_reserved_gb')!s:>8} "
              f"{res.get('peak_card_used_gb')!s:>8} {res['loss_at_compare_step']!s:>9} {res.get('ended')}")
    report["compare_step"] = compare_step
    (args.out / "train_bench.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
