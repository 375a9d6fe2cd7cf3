"""A training run's parameters: one typed object the UI fills, the store saves, the runner uses."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, Field, field_validator

# A general dataset spec: hub id ("owner/name"), optionally ":subset", optionally "#N" samples;
# or an absolute path to a local .json/.jsonl/.csv file, optionally "#N".
_DATASET_RE = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/[\w.-]+(?::[\w.-]+)?|/[\w./ -]+\.(?:jsonl|json|csv))(?:#\d{1,7})?$")


class TrainParamsError(ValueError):
    """A training parameter is out of range; the message names it and what is allowed."""


class TrainParams(BaseModel):
    """Everything an admin may set for one run. Never free-form flags: each field maps to one flag."""

    epochs: int = Field(10, ge=1, le=100, description="Passes over the training set.")
    learning_rate: float = Field(1e-4, gt=0, le=1, description="Peak learning rate.")
    lora_rank: int = Field(8, ge=1, le=256, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, le=1024, description="LoRA alpha.")
    speed_mode: Literal["fast", "24gb", "seeds"] = Field(
        "fast", description="fast: big GPUs; 24gb: under 22 GB peak; seeds: the blog's exact flags."
    )
    general_data: list[str] = Field(
        default_factory=list, description="General datasets 'id#N' or local file paths mixed in."
    )
    identity_oversample: int = Field(1, ge=1, le=100, description="Repeat identity pairs N times.")
    min_identity_pairs: int = Field(
        62, ge=0, le=1000, description="Below this many own identity pairs, the built-in set (62) tops up."
    )
    max_length: int = Field(2048, ge=64, le=32768, description="Longest sample in tokens.")
    seed: int = Field(42, ge=0, description="Random seed for sampling and training.")

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

    @classmethod
    def from_settings(cls, settings: object, **overrides: object) -> TrainParams:
        """The settings' training defaults with `overrides` (None = keep the default), validated."""
        base = cls.model_construct(
            epochs=settings.train_epochs,  # type: ignore[attr-defined]
            learning_rate=settings.train_learning_rate,  # type: ignore[attr-defined]
            lora_rank=settings.train_lora_rank,  # type: ignore[attr-defined]
            lora_alpha=settings.train_lora_alpha,  # type: ignore[attr-defined]
            speed_mode=settings.train_speed_mode,  # type: ignore[attr-defined]
            general_data=list(settings.general_data),  # type: ignore[attr-defined]
            identity_oversample=settings.identity_oversample,  # type: ignore[attr-defined]
            min_identity_pairs=settings.min_identity_pairs,  # type: ignore[attr-defined]
        ).model_dump()
        return cls(**{**base, **{key: value for key, value in overrides.items() if value is not None}})
