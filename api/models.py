"""The model ids the API serves: `persona` (the active adapter), `persona:<version>` (each stored version), `base`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from personabot.api.errors import APIError
from personabot.core.store import Store

PERSONA = "persona"
BASE = "base"
VERSION_PREFIX = "persona:"


def _epoch(value: datetime | None) -> int:
    return int(value.replace(tzinfo=UTC).timestamp()) if value else 0


def list_models(store: Store, base_model: str) -> list[dict[str, Any]]:
    """Every id a request may name, the default (`persona`) first."""
    adapters = store.list_adapters()
    active = next((a for a in adapters if a.active), None)
    models = [{"id": PERSONA, "object": "model", "created": _epoch(active.activated_at if active else None),
               "owned_by": "personabot", "adapter": active.name if active else None}]
    models += [{"id": VERSION_PREFIX + a.name, "object": "model", "created": _epoch(a.created_at),
                "owned_by": "personabot", "adapter": a.name, "active": a.active} for a in adapters]
    models.append({"id": BASE, "object": "model", "created": 0, "owned_by": "personabot", "adapter": None,
                   "base_model": base_model})
    return models


def resolve_model(store: Store, model: str) -> str:
    """The ChatRequest.adapter for a model id ("active", "base" or a version name); 404 for others."""
    if model == PERSONA:
        return "active"
    if model == BASE:
        return "base"
    if model.startswith(VERSION_PREFIX) and store.find_adapter(model[len(VERSION_PREFIX):]) is not None:
        return model[len(VERSION_PREFIX):]
    raise APIError(404, f"the model {model!r} does not exist; GET /v1/models lists the ids "
                   "(persona, persona:<version>, base)", param="model", code="model_not_found")


def find_model(store: Store, base_model: str, model: str) -> dict[str, Any]:
    for entry in list_models(store, base_model):
        if entry["id"] == model:
            return entry
    raise APIError(404, f"the model {model!r} does not exist; GET /v1/models lists the ids", param="model",
                   code="model_not_found")
