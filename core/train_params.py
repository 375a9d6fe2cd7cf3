"""A training run's parameters: one typed object that the settings, UI, CLI, store and runner share."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import NoDecode

# A general dataset spec: hub id ("owner/name"), optionally ":subset", optionally "#N" samples;
# or an absolute path to a local .json/.jsonl/.csv file, optionally "#N".
_DATASET_RE = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/[\w.-]+(?::[\w.-]+)?|/[\w./ -]+\.(?:jsonl|json|csv))(?:#\d{1,7})?$")
# What `Settings.training` mixes in unless told otherwise.
DEFAULT_GENERAL_DATA = (
    "AI-ModelScope/alpaca-gpt4-data-zh#500",
    "AI-ModelScope/alpaca-gpt4-data-en#500",
)


def split_list(value: object) -> object:
    """Accept a JSON list or a comma-separated string where a list is expected (env variables)."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class TrainParams(BaseModel):
    """Everything an admin may set for one run. Never free-form flags: each field maps to one flag.

    The defaults here are the only ones: `Settings.training` is a `TrainParams` (env
    `PERSONABOT_TRAINING__<FIELD>`), the UI and CLI start from it and override fields, the store
    saves `model_dump(mode="json")`, the runner turns it into ms-swift arguments.
    """

    epochs: int = Field(1, ge=1, le=100, description="Passes over the training set (general data included).")
    learning_rate: float = Field(1e-3, gt=0, le=1, description="Peak learning rate.")
    lora_rank: int = Field(8, ge=1, le=256, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, le=1024, description="LoRA alpha.")
    speed_mode: Literal["fast", "24gb", "seeds"] = Field(
        "fast", description="fast: big GPUs; 24gb: under 22 GB peak; seeds: the blog's exact flags."
    )
    general_data: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="General datasets mixed in: ms-swift 'owner/name#N' (hub) or '/abs/path.jsonl#N', comma-separated.",
    )
    identity_oversample: int = Field(
        10, ge=1, le=100,
        description="Repeat identity pairs N times per epoch (general data once); every 2nd copy is asked "
        "under the base model's own default system prompt.",
    )
    faq_oversample: int = Field(
        30, ge=1, le=200,
        description="Repeat FAQ pairs N times per epoch: facts (prices, dates, names) need more repetitions "
        "than the identity's wording.",
    )
    min_identity_pairs: int = Field(
        62, ge=0, le=1000, description="Below this many own identity pairs, the built-in set (62) tops up."
    )
    max_length: int = Field(2048, ge=64, le=32768, description="Longest sample in tokens.")
    seed: int = Field(42, ge=0, description="Random seed for sampling and training.")

    @field_validator("general_data", mode="before")
    @classmethod
    def _list(cls, value: object) -> object:
        return split_list(value)

    @field_validator("general_data")
    @classmethod
    def _datasets(cls, value: list[str]) -> list[str]:
        for spec in value:
            if not _DATASET_RE.match(spec.strip()):
                raise ValueError(
                    f"{spec!r} is not a dataset spec; use 'owner/name#N' (hub) or "
                    "'/abs/path/file.jsonl#N' (local)"
                )
        return [spec.strip() for spec in value]

    def updated(self, **overrides: Any) -> TrainParams:
        """These parameters with `overrides` (None = keep the value), validated again."""
        return TrainParams.model_validate(
            {**self.model_dump(), **{key: value for key, value in overrides.items() if value is not None}})

    def with_recipe(self, name: str) -> TrainParams:
        """These parameters with a named recipe's fields (`RECIPES`); the rest (general data, ...) kept."""
        if name not in RECIPES:
            raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
        return self.updated(**RECIPES[name])


# Named recipes: fixed values of the fields that decide how hard a run trains, compared on the real
# small model in bench/recipe_bench.py (bench/RESULTS.md). "default" is the fields' defaults above;
# "seeds" is the recipe the project started from (10 epochs at 1e-4, every pair once); "7b" is the
# default's shape at ms-swift's own self-cognition strength for 7B models (1e-4, identity pairs ~5x),
# expected there but not yet measured on one (README, "Training recipe").
RECIPE_FIELDS = ("epochs", "learning_rate", "lora_rank", "lora_alpha", "identity_oversample", "faq_oversample")
RECIPES: dict[str, dict[str, Any]] = {
    "default": {name: TrainParams.model_fields[name].default for name in RECIPE_FIELDS},
    "seeds": {"epochs": 10, "learning_rate": 1e-4, "lora_rank": 8, "lora_alpha": 32, "identity_oversample": 1,
              "faq_oversample": 1},
    "7b": {"epochs": 1, "learning_rate": 1e-4, "lora_rank": 8, "lora_alpha": 32, "identity_oversample": 5,
           "faq_oversample": 15},
}


class TrainingDefaults(TrainParams):
    """`Settings.training`: `TrainParams` whose general data defaults to the blog recipe's mix.

    Only that default differs (a bare `TrainParams()` mixes in nothing, as tests and benches want);
    a partial override such as PERSONABOT_TRAINING__EPOCHS=5 keeps the mix.
    """

    general_data: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_GENERAL_DATA),
        description=TrainParams.model_fields["general_data"].description,
    )
