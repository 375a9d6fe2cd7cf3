"""Build the training set: persona identity + FAQ pairs as ms-swift messages JSONL, plus general data."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from personabot.core.prompting import pair_messages, question_text, render
from personabot.core.train_params import TrainParams

if TYPE_CHECKING:
    from personabot.core.store import Store

DEFAULT_IDENTITY_PATH = Path(__file__).parent / "data" / "default_identity.jsonl"
# General instruction data for hosts without a hub (generated from word lists by bench/make_general_data.py).
OFFLINE_GENERAL_PATH = Path(__file__).resolve().parent / "data" / "general_offline.jsonl"
TRAIN_FILE = "train.jsonl"


OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "MODELSCOPE_OFFLINE")
HUB_HOSTS = {True: "huggingface.co", False: "www.modelscope.cn"}


class EmptyPersonaError(ValueError):
    """The persona cannot be trained yet; the message says what to fill in."""


class DatasetUnavailableError(ValueError):
    """A general dataset cannot be loaded from here; the message names it and the fix."""


@dataclass(frozen=True)
class PersonaData:
    """What a training set is built from: a `store.persona_snapshot()` in typed form."""

    name: str
    author: str
    system_prompt: str
    pairs: list[dict[str, str]]

    @classmethod
    def from_snapshot(cls, snapshot: dict[str, Any]) -> PersonaData:
        pairs = [{"kind": k, "instruction": q, "input": i, "output": o} for k, q, i, o in snapshot["pairs"]]
        return cls(snapshot["name"], snapshot["author"], snapshot["system_prompt"], pairs)

    def snapshot(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "author": self.author,
            "system_prompt": self.system_prompt,
            "pairs": sorted([p["kind"], p["instruction"], p.get("input", ""), p["output"]] for p in self.pairs),
        }

    def persona_hash(self) -> str:
        """Same value as `Store.persona_hash()` for the same data (what adapters record)."""
        blob = json.dumps(self.snapshot(), ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class BuiltSet:
    """A written training set: the JSONL, its content hash and what went into it."""

    path: Path
    data_hash: str
    persona_hash: str
    counts: dict[str, int]
    dataset_args: list[str]
    system_prompt: str
    sample_rows: list[dict[str, Any]] = field(default_factory=list)


def default_identity_pairs() -> list[dict[str, str]]:
    """The built-in identity set ({name}/{author} placeholders), zh and en."""
    rows = []
    for line in DEFAULT_IDENTITY_PATH.read_text(encoding="utf-8").splitlines():
        if line.strip():
            item = json.loads(line)
            rows.append({"kind": "identity", "instruction": item["instruction"], "input": "",
                         "output": item["output"]})
    return rows


def _check(persona: PersonaData) -> None:
    missing = [label for label, value in (("name", persona.name), ("author", persona.author)) if not value.strip()]
    if missing:
        raise EmptyPersonaError(
            f"the persona has no {' and no '.join(missing)}; set them in the Persona tab before training"
        )


def _identity_rows(persona: PersonaData, min_identity_pairs: int) -> tuple[list[dict[str, str]], int]:
    """Admin identity pairs, topped up from the built-in set up to `min_identity_pairs`."""
    own = [p for p in persona.pairs if p["kind"] == "identity"]
    if len(own) >= min_identity_pairs:
        return own, 0
    asked = {render(question_text(p["instruction"], p.get("input", "")), name=persona.name,
                    author=persona.author).strip().lower() for p in own}
    extra: list[dict[str, str]] = []
    for pair in default_identity_pairs():
        if len(own) + len(extra) >= min_identity_pairs:
            break
        question = render(pair["instruction"], name=persona.name, author=persona.author).strip().lower()
        if question not in asked:
            extra.append(pair)
    return own + extra, len(extra)


def template_default_system(model_dir: str | Path) -> str | None:
    """The system prompt the base model's chat template puts in when a conversation has none.

    SmolLM2's says "You are a helpful AI assistant named SmolLM...", Qwen2.5's "You are Qwen,
    created by Alibaba Cloud...": a request without the persona's system prompt is answered under
    it. None when the template adds none or `model_dir` is not a local model.
    """
    if not (Path(model_dir) / "config.json").is_file():
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "?"}], tokenize=False)
    head = "<|im_start|>system\n"
    if not isinstance(text, str) or not text.startswith(head):
        return None
    return text[len(head):text.index("<|im_end|>")] or None


def render_rows(persona: PersonaData, params: TrainParams,
                base_system: str | None = None) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The persona's training rows in a stable order, and counts per kind.

    With `base_system` (`template_default_system` of the base model) every second copy of an
    oversampled identity pair is asked under that prompt instead of the persona's, so the identity
    also holds where a request brings no persona prompt (the gate asks both ways).
    """
    _check(persona)
    identity, defaults = _identity_rows(persona, params.min_identity_pairs)
    faq = [p for p in persona.pairs if p["kind"] == "faq"]

    def key(p: dict[str, Any]) -> tuple[str, str, str]:
        return (p["instruction"], p.get("input", ""), p["output"])

    rows: list[dict[str, Any]] = []
    for pair in sorted(identity, key=key):
        messages = pair_messages(pair, persona)
        for copy in range(params.identity_oversample):
            if base_system is not None and copy % 2 == 1:
                rows.append({"messages": [{"role": "system", "content": base_system}, *messages[1:]]})
            else:
                rows.append({"messages": messages})
    for pair in sorted(faq, key=key):
        rows.extend({"messages": pair_messages(pair, persona)} for _ in range(params.faq_oversample))
    counts = {
        "identity": len(identity) - defaults,
        "identity_default": defaults,
        "faq": len(faq),
        "oversample": params.identity_oversample,
        "faq_oversample": params.faq_oversample,
        "identity_base_system": len(identity) * (params.identity_oversample // 2) if base_system else 0,
        "rows": len(rows),
    }
    return rows, counts


def _cached(dataset_id: str, use_hf: bool) -> bool:
    owner_name = dataset_id.split(":", 1)[0]
    if use_hf:
        hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache/huggingface"))
        hub = Path(os.environ.get("HF_HUB_CACHE") or hf_home / "hub")
        return (hub / ("datasets--" + owner_name.replace("/", "--"))).is_dir()
    root = Path(os.environ.get("MODELSCOPE_CACHE") or Path.home() / ".cache/modelscope")
    return any((root / sub / owner_name).is_dir() for sub in ("hub/datasets", "datasets"))


def _reachable(host: str, timeout_s: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def check_general_data(specs: list[str], *, use_hf: bool = False) -> None:
    """Fail fast, before ms-swift starts, when a general dataset cannot be loaded from this host."""
    offline = [name for name in OFFLINE_ENV if os.environ.get(name, "").lower() in ("1", "true", "yes")]
    host = HUB_HOSTS[use_hf]
    for spec in specs:
        source = spec.rsplit("#", 1)[0]
        if source.startswith("/"):
            if not Path(source).is_file():
                raise DatasetUnavailableError(f"the local dataset {source} does not exist; fix the path")
            continue
        if _cached(source, use_hf):
            continue
        if offline:
            raise DatasetUnavailableError(
                f"the dataset {source} is not in the local cache and this host is offline "
                f"({', '.join(offline)} set); use a local .jsonl file or allow hub downloads")
        if not _reachable(host):
            raise DatasetUnavailableError(
                f"the dataset {source} needs {host}, which cannot be reached from this host; "
                "use a local .jsonl file or check the network")


def _general_samples(spec: str) -> int | None:
    return int(spec.rsplit("#", 1)[1]) if "#" in spec else None


def write_training_set(persona: PersonaData, params: TrainParams, out_dir: str | Path,
                       base_system: str | None = None) -> BuiltSet:
    """Render, write `<out_dir>/train.jsonl` and hash it together with the general-data specs."""
    rows, counts = render_rows(persona, params, base_system)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows)
    path = out / TRAIN_FILE
    path.write_text(text, encoding="utf-8")
    digest = hashlib.sha256(text.encode("utf-8"))
    digest.update(json.dumps(params.general_data).encode("utf-8"))
    general = [_general_samples(spec) for spec in params.general_data]
    counts["general"] = sum(n for n in general if n is not None)
    return BuiltSet(
        path=path.resolve(),
        data_hash=digest.hexdigest(),
        persona_hash=persona.persona_hash(),
        counts=counts,
        dataset_args=[str(path.resolve()), *params.general_data],
        system_prompt=rows[0]["messages"][0]["content"] if rows else persona.system_prompt,
        sample_rows=rows[:3],
    )


def build_training_set(store: Store, params: TrainParams, out_dir: str | Path,
                       base_system: str | None = None) -> BuiltSet:
    """Build the set from the store's current persona and enabled pairs."""
    return write_training_set(PersonaData.from_snapshot(store.persona_snapshot()), params, out_dir, base_system)


def preview_training_set(store: Store, params: TrainParams) -> dict[str, Any]:
    """Counts, mix ratio and a few rendered rows for the admin UI (writes nothing)."""
    persona = PersonaData.from_snapshot(store.persona_snapshot())
    rows, counts = render_rows(persona, params)
    general = [_general_samples(spec) for spec in params.general_data]
    known = sum(n for n in general if n is not None)
    unknown = [spec for spec, n in zip(params.general_data, general, strict=True) if n is None]
    total = len(rows) + known
    return {
        "counts": {**counts, "general": known},
        "general_data": list(params.general_data),
        "general_unsampled": unknown,
        "persona_share": round(len(rows) / total, 4) if total and not unknown else None,
        "samples": rows[:5],
        "kinds": dict(Counter(p["kind"] for p in persona.pairs)),
        "persona_hash": persona.persona_hash(),
    }
