"""The base model as one local directory, from the hub that settings.use_hf / USE_HF picks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from personabot.training.model_source import hub_env, resolve_model_dir
from tests.training.conftest import REPO

RESOLVE = """
import json
from personabot.core.settings import load_settings
from personabot.training.model_source import ModelUnavailableError, resolve_model_dir
out = {}
for model in ("acme/tiny-persona", "acme/not-there"):
    try:
        out[model] = str(resolve_model_dir(load_settings(model=model)))
    except ModelUnavailableError as error:
        out[model] = "error: " + str(error)
print(json.dumps(out))
"""


def _fake_hf_cache(root: Path) -> Path:
    repo = root / "models--acme--tiny-persona"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    return snapshot


def _resolve_in_child(tmp_path: Path, **env: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PERSONABOT_") and k != "USE_HF"}
    base.update({"HF_HUB_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
                 "PERSONABOT_DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(REPO), **env})
    out = subprocess.run([sys.executable, "-c", RESOLVE], env=base, cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_local_directory_is_used_as_is(tiny_model: Path, settings_env) -> None:
    assert resolve_model_dir(settings_env(model=str(tiny_model))) == tiny_model.resolve()


def test_hugging_face_is_used_when_use_hf_or_USE_HF_is_set(tmp_path: Path) -> None:
    snapshot = _fake_hf_cache(tmp_path / "hf")
    for env in ({"PERSONABOT_USE_HF": "true"}, {"USE_HF": "1"}):
        found = _resolve_in_child(tmp_path, **env)
        assert found["acme/tiny-persona"] == str(snapshot.resolve()), env
        missing = found["acme/not-there"]
        assert missing.startswith("error: cannot get the model 'acme/not-there' from Hugging Face"), missing
        assert "PERSONABOT_MODEL" in missing


def test_the_children_get_the_same_hub(settings_env, monkeypatch) -> None:
    monkeypatch.delenv("USE_HF", raising=False)
    assert hub_env(settings_env(use_hf=True)) == {"USE_HF": "1"}
    assert hub_env(settings_env(use_hf=False)) == {"USE_HF": "0"}
    monkeypatch.setenv("USE_HF", "1")
    assert hub_env(settings_env(use_hf=False)) == {"USE_HF": "1"}
