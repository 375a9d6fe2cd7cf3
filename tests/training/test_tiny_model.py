"""`personabot make-tiny-model` output trains for a step with real ms-swift on CPU, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_tiny_model_trains_one_step_with_ms_swift(tmp_path: Path, tiny_model: Path) -> None:
    data = tmp_path / "identity.jsonl"
    rows = [
        {"messages": [{"role": "system", "content": "You are Nova."}, {"role": "user", "content": "Who are you?"},
                      {"role": "assistant", "content": "I am Nova, made by Acme."}]},
        {"messages": [{"role": "user", "content": "你是谁?"}, {"role": "assistant", "content": "我是Nova。"}]},
    ]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    env = dict(os.environ, HF_HUB_OFFLINE="1", MODELSCOPE_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        [sys.executable, "-m", "swift.cli.sft", "--model", str(tiny_model), "--model_type", "qwen2",
         "--template", "qwen2_5", "--check_model", "false", "--tuner_type", "lora", "--dataset", str(data),
         "--max_steps", "1", "--output_dir", str(tmp_path / "out"), "--torch_dtype", "float32",
         "--per_device_train_batch_size", "1", "--logging_steps", "1", "--save_steps", "1",
         "--report_to", "none", "--dataloader_num_workers", "0", "--dataset_num_proc", "1"],
        env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    logs = list((tmp_path / "out").glob("*/logging.jsonl"))
    assert logs, "ms-swift wrote no logging.jsonl"
    first = json.loads(logs[0].read_text().splitlines()[0])
    assert first["global_step/max_steps"] == "1/1" and first["loss"] > 0
    assert list((tmp_path / "out").glob("*/checkpoint-1/adapter_model.safetensors"))
