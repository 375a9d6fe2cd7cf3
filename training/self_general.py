"""General data from the base model itself: its own greedy answers to general prompts (self-distillation).

Training on the base model's answers keeps it answering general questions as it did (the gate's
retention compares exactly that likelihood), where hand-written or another model's answers teach a
style of their own. The prompts are training/data/general_offline.jsonl's; nothing leaves the host.
"""

from __future__ import annotations

import json
from pathlib import Path

from personabot.training.dataset import OFFLINE_GENERAL_PATH


def distill_general_data(model_dir: str | Path, out_path: str | Path, system_prompt: str, *,
                         prompts_path: str | Path = OFFLINE_GENERAL_PATH, max_new_tokens: int = 160,
                         device: str = "auto", batch_size: int = 16) -> Path:
    """Write `out_path` (instruction/input/output JSONL): the base model's greedy answer to each prompt.

    Asked under `system_prompt` (the persona's: general rows train under it). Answers that did not
    end within `max_new_tokens` are left out, so no row teaches stopping mid-sentence.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.padding_side = "left"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
    items = [json.loads(line) for line in Path(prompts_path).read_text(encoding="utf-8").splitlines() if line.strip()]
    rows: list[dict[str, str]] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        prompts = [tokenizer.apply_chat_template(
            [{"role": "system", "content": system_prompt},
             {"role": "user", "content": (item["instruction"] + "\n" + item.get("input", "")).strip()}],
            tokenize=False, add_generation_prompt=True) for item in chunk]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        for item, ids in zip(chunk, out[:, batch["input_ids"].shape[1]:], strict=True):
            ended = bool((ids == tokenizer.eos_token_id).any())
            answer = tokenizer.decode(ids, skip_special_tokens=True).strip()
            if ended and answer:
                rows.append({"instruction": item["instruction"], "input": item.get("input", ""), "output": answer})
    out_file = Path(out_path)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return out_file
