"""Run `swift sft` (LoRA) in its own process: the flags per speed mode, progress from logging.jsonl, cancel."""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from personabot.core.processes import stop_process
from personabot.core.train_params import TrainParams

# Flags per speed mode; each was measured in bench/train_bench.py (see bench/RESULTS.md).
# seeds: the ms-swift self-cognition recipe's flags exactly (batch 1 x accumulation 16, checkpointing).
# fast:  the same effective batch of 16 as one micro-batch of 16, no LoRA dropout, batches of similar
#        length (little compute spent on padding) and training/swift_fast.py loaded into ms-swift:
#        lean LoRA GEMMs in the base model's dtype, no cuDNN attention (it plans every new shape),
#        and activation checkpointing only for the layers a long micro-batch needs to stay under the
#        GPU's memory. liger-kernel's fused cross-entropy never materialises the 152k-vocabulary
#        logits; without it (CPU, or no `gpu` extra) the micro-batches are those measured before.
# 24gb:  micro-batches of 4 with every layer checkpointed, lean LoRA and no cuDNN attention, so that
#        peak memory stays < 22 GB (adaptive checkpointing under a 19 GB ceiling peaked at 22.6 GB
#        reserved: the allocator's cache of odd-sized blocks is not under the plugin's control).
_COMMON_FAST = ["--lora_dropout", "0", "--group_by_length", "true"]
SPEED_FLAGS: dict[str, dict[bool, list[str]]] = {
    "seeds": {
        liger: ["--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "16",
                "--gradient_checkpointing", "true"]
        for liger in (False, True)
    },
    "fast": {
        True: ["--per_device_train_batch_size", "16", "--gradient_accumulation_steps", "1",
               "--gradient_checkpointing", "false", *_COMMON_FAST, "--use_liger_kernel", "true"],
        False: ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "4",
                "--gradient_checkpointing", "false", *_COMMON_FAST],
    },
    "24gb": {
        True: ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "4",
               "--gradient_checkpointing", "true", *_COMMON_FAST, "--use_liger_kernel", "true"],
        False: ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "8",
                "--gradient_checkpointing", "true", *_COMMON_FAST],
    },
}
# What training/swift_fast.py does per mode (PERSONABOT_SWIFT_FAST); None = no plugin.
PLUGIN_CONFIG: dict[str, dict[str, Any] | None] = {
    "seeds": None,
    "fast": {"lean_lora": True, "cudnn_attention": False, "adaptive_checkpointing": True, "mem_ceiling_gb": None},
    "24gb": {"lean_lora": True, "cudnn_attention": False, "adaptive_checkpointing": False, "mem_ceiling_gb": None},
}
PLUGIN_PATH = Path(__file__).resolve().parent / "swift_fast.py"


def sft_env(params: TrainParams, plugin: dict[str, Any] | None | bool = True) -> dict[str, str]:
    """Environment for the `swift sft` process of `sft_command`: the plugin's configuration.

    `plugin` True = the mode's PLUGIN_CONFIG; a dict overrides it; False/None = none.
    """
    if plugin is True:
        config = PLUGIN_CONFIG[params.speed_mode]
    else:
        config = plugin or None
    return {"PERSONABOT_SWIFT_FAST": json.dumps(config)} if config else {}


def liger_available() -> bool:
    """liger-kernel (fused Triton kernels) is importable and a CUDA GPU is there to run it."""
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None or importlib.util.find_spec("triton") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


_DATASET_FAILED = re.compile(r"Dataset (\S+) load failed")
_ERROR_LINE = re.compile(r"^\s*(?:[\w.]+\.)?(\w*(?:Error|Exception|Exit)\w*):\s*(.+)$")
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def die_with_parent() -> Callable[[], None] | None:
    """A Popen `preexec_fn` that makes the child get SIGKILL when the process starting it dies.

    The children run in their own session (so a cancel can stop their whole group), which keeps
    them out of the worker's process group; without this a killed worker would leave ms-swift
    holding the GPU. Linux ties the signal to the starting thread, which here waits for the child
    anyway. None where prctl does not exist (not Linux).
    """
    if _LIBC is None:
        return None
    parent = os.getpid()
    prctl = _LIBC.prctl

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


class TrainingCancelled(Exception):
    """The run was cancelled; the ms-swift process was stopped and nothing was kept."""


class TrainingFailed(Exception):
    """ms-swift failed; `reason` is one line, `log_path` holds the whole output."""

    def __init__(self, reason: str, log_path: Path | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.log_path = log_path


@dataclass
class SftResult:
    """What a finished run left behind."""

    adapter_dir: Path
    output_dir: Path
    log_path: Path
    final_loss: float | None
    steps: int
    elapsed_s: float
    peak_gpu_mem_gb: float | None
    points: list[dict[str, Any]] = field(default_factory=list)


class UnsupportedModelError(ValueError):
    """The base model's architecture or chat template has no ms-swift mapping; the message says what to do."""


_MODEL_TYPES = {"qwen2": "qwen2"}


def _chat_template(model_dir: Path) -> str:
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = model_dir / "tokenizer_config.json"
    template = json.loads(config.read_text(encoding="utf-8")).get("chat_template") if config.is_file() else None
    return template if isinstance(template, str) else ""


def model_flags(model: str) -> list[str]:
    """`--model_type` and `--template` read from a local model's config.json and chat template.

    Qwen2.5's template (its default system prompt) maps to `qwen2_5`, any other ChatML template to
    `chatml`. A hub id is left to ms-swift's own lookup.
    """
    model_dir = Path(model)
    if not (model_dir / "config.json").is_file():
        return []
    model_type = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("model_type")
    if model_type not in _MODEL_TYPES:
        raise UnsupportedModelError(
            f"{model} is a {model_type!r} model; training and serving support {sorted(_MODEL_TYPES)} "
            "(convert it to the Qwen2 layout, as `personabot make-small-model` does for SmolLM2)")
    template = _chat_template(model_dir)
    if "You are Qwen" in template:
        name = "qwen2_5"
    elif "<|im_start|>" in template:
        name = "chatml"
    else:
        raise UnsupportedModelError(f"{model} has no ChatML chat template (chat_template.jinja or "
                                    "tokenizer_config.json); add one, serving renders prompts with it")
    return ["--model_type", _MODEL_TYPES[model_type], "--template", name]


def sft_command(
    *,
    model: str,
    dataset_args: list[str],
    output_dir: Path,
    params: TrainParams,
    system: str,
    torch_dtype: str = "bfloat16",
    dataloader_workers: int = 2,
    liger: bool | None = None,
    plugin: bool = True,
) -> list[str]:
    """The `swift sft` command line for one run: only typed parameters become flags.

    `system` (the persona's rendered system prompt) is the default for rows without one, so the
    general data trains under the same system prompt that serving uses. `liger` None = use the
    fused kernels when `liger_available()`. `plugin` loads training/swift_fast.py in the fast and
    24gb modes (its configuration travels in `sft_env`).
    """
    plugin_args = (["--external_plugins", str(PLUGIN_PATH)]
                   if plugin and PLUGIN_CONFIG[params.speed_mode] is not None else [])
    if liger is None:
        liger = params.speed_mode != "seeds" and liger_available()
    return [
        sys.executable, "-m", "swift.cli.sft",
        "--model", model,
        *model_flags(model),
        "--check_model", "false",
        "--tuner_type", "lora",
        "--dataset", *dataset_args,
        f"--system={system}",
        "--split_dataset_ratio", "0",
        "--eval_strategy", "no",
        "--torch_dtype", torch_dtype,
        "--num_train_epochs", str(params.epochs),
        "--learning_rate", repr(params.learning_rate),
        "--lora_rank", str(params.lora_rank),
        "--lora_alpha", str(params.lora_alpha),
        "--target_modules", "all-linear",
        "--max_length", str(params.max_length),
        "--warmup_ratio", "0.05",
        "--seed", str(params.seed),
        "--data_seed", str(params.seed),
        *SPEED_FLAGS[params.speed_mode][liger],
        *plugin_args,
        "--dataloader_num_workers", str(dataloader_workers),
        "--logging_steps", "1",
        "--save_strategy", "steps",
        "--save_steps", "1000000",
        "--save_total_limit", "1",
        "--save_only_model", "true",
        "--add_version", "false",
        "--report_to", "none",
        "--output_dir", str(output_dir),
    ]


def _duration_s(text: Any) -> float | None:
    """'1h 2m 3s' / '45s' (ms-swift's remaining_time) in seconds."""
    if not isinstance(text, str):
        return None
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([dhms])", text)
    if not parts:
        return None
    scale = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    return sum(float(value) * scale[unit] for value, unit in parts)


class LogFollower:
    """Reads new complete lines of a log as they are written (ms-swift's logging.jsonl, its stdout)."""

    def __init__(self, path: Path, offset: int = 0) -> None:
        self.path = path
        self._offset = offset

    def lines(self) -> list[bytes]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as handle:
            handle.seek(self._offset)
            chunk = handle.read()
        end = chunk.rfind(b"\n")
        if end < 0:
            return []
        self._offset += end + 1
        return chunk[: end + 1].splitlines()

    def read(self) -> list[dict[str, Any]]:
        entries = []
        for line in self.lines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue
        return entries


# A run's phases while ms-swift runs, in order. Until the first step is logged, lines of ms-swift's
# own log (4.6) mark the boundaries: imports and arguments done (the model load begins), model
# loaded (template, dataset encoding, LoRA), LoRA attached (the trainer is built, steps begin); the
# last step marks the save. A marker missing (another ms-swift) only skips its phase.
SFT_PHASES = ("starting", "loading model", "preparing", "training", "saving")
_SFT_MARKERS = ((b"model_kwargs:", "loading model"), (b"model_info:", "preparing"),
                (b"model_parameter_info:", "training"))


def _enter(entered: dict[str, float], phase: str) -> None:
    """Move on to `phase` (never back to an earlier one) and remember when."""
    if SFT_PHASES.index(phase) > SFT_PHASES.index(next(reversed(entered))):
        entered[phase] = round(time.time(), 3)


def _step_point(entry: dict[str, Any]) -> dict[str, Any] | None:
    steps = entry.get("global_step/max_steps")
    if "loss" not in entry or not isinstance(steps, str) or "/" not in steps:
        return None
    step, max_steps = (int(x) for x in steps.split("/", 1))
    return {
        "step": step,
        "max_steps": max_steps,
        "epoch": float(entry.get("epoch") or 0),
        "loss": float(entry["loss"]),
        "learning_rate": float(entry.get("learning_rate") or 0),
        "token_acc": entry.get("token_acc"),
        "gpu_mem_gb": entry.get("memory(GiB)"),
        "eta_s": _duration_s(entry.get("remaining_time")),
        "at": time.time(),
    }


def failure_reason(log_path: Path, returncode: int | None) -> str:
    """One line that says why ms-swift failed, taken from the end of its log."""
    try:
        lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-200:]
    except OSError:
        lines = []
    for line in lines:
        match = _DATASET_FAILED.search(line)
        if match:
            return (f"the dataset {match.group(1)} could not be loaded (no network or an unknown id); "
                    "use a reachable hub id or a local .jsonl file")
    for line in reversed(lines):
        match = _ERROR_LINE.match(line)
        if match:
            return f"{match.group(1)}: {match.group(2).strip()}"[:500]
    return f"ms-swift exited with code {returncode}; see the run log {log_path}"


def find_adapter(output_dir: Path) -> Path | None:
    """The checkpoint directory with the saved LoRA weights, if ms-swift wrote one."""
    candidates = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[-1])
                        if p.name.rsplit("-", 1)[-1].isdigit() else -1)
    for candidate in reversed(candidates):
        if (candidate / "adapter_config.json").exists():
            return candidate
    return None


def run_sft(
    command: list[str],
    output_dir: Path,
    log_path: Path,
    *,
    on_progress: Callable[[dict[str, Any], list[dict[str, Any]]], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    env: dict[str, str] | None = None,
    poll_s: float = 0.5,
    progress_every_s: float = 2.0,
) -> SftResult:
    """Run ms-swift, report progress every `progress_every_s`, stop it when `should_cancel()`.

    Raises TrainingCancelled (process stopped within a few seconds) or TrainingFailed.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    child_env = dict(env if env is not None else os.environ)
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    child_env.setdefault("TOKENIZERS_PARALLELISM", "false")
    child_env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    follower = LogFollower(output_dir / "logging.jsonl")
    swift_log = LogFollower(log_path, log_path.stat().st_size if log_path.exists() else 0)
    points: list[dict[str, Any]] = []
    progress: dict[str, Any] = {"phase": "starting", "step": 0, "max_steps": 0}
    entered = {"starting": round(time.time(), 3)}  # phase -> when it began, in the progress as "phases"
    started = time.monotonic()
    last_report = 0.0
    reported = 0
    reported_phase = ""
    peak_mem: float | None = None
    with log_path.open("ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=child_env,
                                   cwd=output_dir, start_new_session=True, preexec_fn=die_with_parent())
        try:
            while True:
                returncode = process.poll()
                for line in swift_log.lines():
                    for marker, marked in _SFT_MARKERS:
                        if marker in line:
                            _enter(entered, marked)
                new = [p for p in map(_step_point, follower.read()) if p is not None]
                if new:
                    points.extend(new)
                    latest = new[-1]
                    mems = [p["gpu_mem_gb"] for p in new if p["gpu_mem_gb"] is not None]
                    peak_mem = max([*mems, *([peak_mem] if peak_mem is not None else [])], default=None)
                    _enter(entered, "saving" if latest["step"] >= latest["max_steps"] else "training")
                    progress = {**{k: v for k, v in latest.items() if k != "at"}, "gpu_mem_gb": peak_mem}
                phase = progress["phase"] = next(reversed(entered))
                progress["phases"] = dict(entered)
                now = time.monotonic()
                progress["elapsed_s"] = round(now - started, 1)
                if on_progress is not None and (now - last_report >= progress_every_s or returncode is not None
                                                or phase != reported_phase):
                    on_progress(dict(progress), points[reported:])
                    reported = len(points)
                    last_report = now
                    reported_phase = phase
                if returncode is not None:
                    break
                if should_cancel is not None and should_cancel():
                    stop_process(process)
                    raise TrainingCancelled("the run was cancelled")
                time.sleep(poll_s)
        except BaseException:
            if process.poll() is None:
                stop_process(process)
            raise
    if returncode != 0:
        raise TrainingFailed(failure_reason(log_path, returncode), log_path)
    adapter = find_adapter(output_dir)
    if adapter is None:
        raise TrainingFailed(f"ms-swift finished but saved no adapter in {output_dir}", log_path)
    return SftResult(
        adapter_dir=adapter,
        output_dir=output_dir,
        log_path=log_path,
        final_loss=points[-1]["loss"] if points else None,
        steps=points[-1]["step"] if points else 0,
        elapsed_s=round(time.monotonic() - started, 1),
        peak_gpu_mem_gb=peak_mem,
        points=points,
    )

