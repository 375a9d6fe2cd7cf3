"""The one settings object (env prefix PERSONABOT_) read by `up`, the workers, the bot and the UI."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from personabot.core.train_params import TrainingDefaults, split_list

DEFAULT_BASE_IDENTITY_TERMS = ("通义千问", "阿里云", "Qwen", "Alibaba")


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names the variable and the fix."""


# The flat names the training parameters had before they were nested under `training`
# (PERSONABOT_TRAINING__<FIELD>); still read from the environment and .env, below the new names.
LEGACY_TRAINING_ENV = {
    "PERSONABOT_TRAIN_EPOCHS": "epochs",
    "PERSONABOT_TRAIN_LEARNING_RATE": "learning_rate",
    "PERSONABOT_TRAIN_LORA_RANK": "lora_rank",
    "PERSONABOT_TRAIN_LORA_ALPHA": "lora_alpha",
    "PERSONABOT_TRAIN_SPEED_MODE": "speed_mode",
    "PERSONABOT_GENERAL_DATA": "general_data",
    "PERSONABOT_IDENTITY_OVERSAMPLE": "identity_oversample",
    "PERSONABOT_MIN_IDENTITY_PAIRS": "min_identity_pairs",
}


class _LegacyTrainingSource(PydanticBaseSettingsSource):
    """`training` fields from their old flat variable names (the environment wins over .env)."""

    def __init__(self, settings_cls: type[BaseSettings], *readers: EnvSettingsSource) -> None:
        super().__init__(settings_cls)
        self.readers = readers

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for reader in reversed(self.readers):
            for old, new in LEGACY_TRAINING_ENV.items():
                value = reader.env_vars.get(old.lower())
                if value is not None:
                    found[new] = value
        return {"training": found} if found else {}


class Settings(BaseSettings):
    """Every knob of personabot. Each field is documented in .env.example."""

    model_config = SettingsConfigDict(
        env_prefix="PERSONABOT_", env_file=".env", extra="ignore", validate_default=True, env_nested_delimiter="__"
    )

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        readers = [source for source in (env_settings, dotenv_settings) if isinstance(source, EnvSettingsSource)]
        return (init_settings, env_settings, dotenv_settings, _LegacyTrainingSource(settings_cls, *readers),
                file_secret_settings)

    # --- model and hardware -------------------------------------------------------------------
    model: str = Field(
        "Qwen/Qwen2.5-7B-Instruct",
        description="Base model: a hub id (ModelScope, or Hugging Face with USE_HF=1) or a local dir.",
    )
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="Where the chat worker runs.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights dtype: auto = bfloat16 on GPU, float32 on CPU."
    )
    use_hf: bool = Field(False, description="Download from Hugging Face instead of ModelScope.")

    # --- infrastructure -----------------------------------------------------------------------
    redis_url: str = Field("", description="Redis URL; empty starts the embedded redis-server.")
    embedded_redis_port: int = Field(
        6399, ge=1, le=65535, description="Port of the embedded redis-server (127.0.0.1 only)."
    )
    database_url: str = Field(
        "", description="SQLAlchemy URL; empty = SQLite file personabot.db in the data dir."
    )
    data_dir: Path = Field(Path("data"), description="Where the database, logs and runs live.")
    adapter_dir: Path | None = Field(
        None, description="Adapter store; empty = <data_dir>/adapters. Share it across hosts."
    )

    # --- secrets ------------------------------------------------------------------------------
    telegram_token: SecretStr | None = Field(None, description="Bot token from @BotFather.")
    telegram_base_url: str = Field(
        "https://api.telegram.org/bot",
        description="Bot API base URL, e.g. http://host:8081 for a self-hosted server ('/bot' is added).",
    )
    admin_user: str = Field("admin", description="Admin UI login name.")
    admin_session_hours: float = Field(12.0, gt=0, description="Hours an admin UI sign-in lasts.")
    admin_password: SecretStr | None = Field(
        None, description="Admin UI password; empty = generated on first start, printed once."
    )

    # --- training -----------------------------------------------------------------------------
    training: TrainingDefaults = Field(
        default_factory=TrainingDefaults,
        description="Defaults of a training run (the UI and CLI override them per run).",
    )
    retrain_cron: str = Field(
        "0 3 * * *", description="Cron for 'retrain if the persona changed'; empty = never."
    )
    gpu_share: Literal["auto", "release", "concurrent"] = Field(
        "auto",
        description="release: chat worker frees the GPU while training (24 GB cards); "
        "concurrent: both at once; auto picks by GPU memory.",
    )

    gpu_release_wait_s: float = Field(
        5.0, ge=0, le=300,
        description="After publishing gpu.release, how long training waits for chat workers to free memory.",
    )
    gpu_host: str = Field(
        "",
        description="Name of the GPU this process shares (training releases only chat workers with the same "
        "name); empty = this machine's hostname.",
    )

    # --- evaluation gate ----------------------------------------------------------------------
    eval_identity_min: float = Field(0.8, ge=0, le=1, description="Identity pass rate needed.")
    eval_faq_min: float = Field(0.6, ge=0, le=1, description="FAQ pass rate needed.")
    eval_retention_min: float = Field(
        0.8, ge=0, le=1, description="General retention needed: the lower of the share of the base model's right "
        "general answers the adapter keeps and the likelihood it gives the base model's answers."
    )
    base_identity_terms: Annotated[list[str], NoDecode] = Field(
        list(DEFAULT_BASE_IDENTITY_TERMS),
        description="Names an answer must not claim as its own identity (besides the terms stored per base "
        "model: derived from its own answers at the first evaluation, edited in the Adapters tab).",
    )
    eval_identity_questions: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Identity questions the gate asks besides the built-in 30 (comma-separated), for a persona "
        "without its own (Persona tab).",
    )

    # --- limits -------------------------------------------------------------------------------
    max_pairs: int = Field(5000, ge=1, description="Most pairs a persona may hold.")
    max_import_bytes: int = Field(20_000_000, ge=1, description="Largest pairs file an import (UI or CLI) accepts.")
    max_instruction_chars: int = Field(2000, ge=1, description="Longest question.")
    max_output_chars: int = Field(8000, ge=1, description="Longest answer.")
    max_system_prompt_chars: int = Field(4000, ge=1, description="Longest system prompt.")

    # --- chat ---------------------------------------------------------------------------------
    max_new_tokens: int = Field(512, ge=1, le=8192, description="Default reply length cap.")
    temperature: float = Field(0.7, ge=0, le=2, description="Default sampling temperature.")
    top_p: float = Field(0.9, gt=0, le=1, description="Default nucleus sampling.")
    repetition_penalty: float = Field(1.05, ge=1, le=2, description="Default repetition penalty.")
    context_tokens: int = Field(4096, ge=64, description="Prompt + reply token budget.")
    max_batch: int = Field(
        0, ge=0, le=512, description="Concurrent requests per chat worker (its KV rows); 0 = sized from the GPU's "
        "free memory at start (up to 256; 32 on the CPU), the arithmetic in the worker's ready log."
    )
    stream_ttl_s: int = Field(3600, ge=10, description="How long reply streams live in Redis.")
    lora_max_rank: int = Field(
        32, ge=1, le=256, description="Largest LoRA rank the chat worker serves (sizes its adapter buffers)."
    )
    lora_slots: int = Field(
        3, ge=2, le=16, description="Adapters resident at once in a chat worker (active, previous, playground)."
    )
    gpu_memory_gib: float = Field(
        0, ge=0, description="GiB of the GPU a chat worker may use (0 = all of it): its KV rows, merged adapter copy "
        "and allocator are held to it, as on a card of that size (a GPU shared with other programs)."
    )
    prefill_chunk: int = Field(
        512, ge=1, le=65536, description="Prompt tokens a chat worker computes between two decode steps, shared "
        "fairly by the prompts in prefill: a long new history delays running replies by one chunk at a time "
        "(512 tokens of a 7B model are about 10-15 ms on an H200)."
    )
    chat_prefix_cache: bool = Field(
        True, description="Keep finished replies' KV cache so a chat's next message (and a shared system prompt) "
        "prefills only its new tokens."
    )
    chat_prefix_rows: int = Field(
        0, ge=0, description="Most finished chats whose KV is kept (0 = every KV row no running request holds)."
    )
    chat_prefix_spare_rows: int = Field(
        0, ge=0, le=4096, description="KV rows beyond PERSONABOT_MAX_BATCH that only keep finished chats' KV "
        "(each holds PERSONABOT_CONTEXT_TOKENS tokens of GPU memory); raise it where the GPU has room."
    )

    # --- bot ----------------------------------------------------------------------------------
    history_turns: int = Field(20, ge=0, description="Turns of memory kept per chat.")
    history_tokens: int = Field(2000, ge=0, description="Approximate tokens of memory per chat.")
    history_ttl_s: int = Field(7 * 86400, ge=60, description="Chat memory expiry.")
    rate_limit_per_minute: int = Field(20, ge=1, description="Messages per user per minute.")
    reply_timeout_s: float = Field(60, gt=0, description="Busy message after this long.")
    allow_users: Annotated[list[int], NoDecode] = Field(
        [], description="Allowed Telegram user ids; empty = everyone."
    )
    allow_chats: Annotated[list[int], NoDecode] = Field(
        [], description="Allowed Telegram chat ids; empty = every chat."
    )
    webhook_url: str = Field("", description="Public HTTPS URL for webhook mode; empty = polling.")
    webhook_listen: str = Field("127.0.0.1", description="Webhook mode: local address to listen on.")
    webhook_port: int = Field(8443, ge=1, le=65535, description="Webhook mode: local port.")
    draft_interval_s: float = Field(
        0.5, ge=0.4,
        description="Private chats: least time between two draft updates of a reply (Telegram does "
        "not document a draft limit; about 3/s is assumed).",
    )
    edit_interval_s: float = Field(
        1.0, ge=1.0,
        description="Groups: least time between two messages or edits of the bot in one group.",
    )
    flood_wait_max_s: float = Field(
        900, gt=0,
        description="Longest a finished reply waits out Telegram's flood control (429 retry_after); "
        "past it the reply stays pending and is delivered when the bot next starts.",
    )

    # --- admin UI -----------------------------------------------------------------------------
    ui_host: str = Field("127.0.0.1", description="Admin UI bind address.")
    ui_port: int = Field(7860, ge=1, le=65535, description="Admin UI port.")

    # --- OpenAI-compatible API -------------------------------------------------------------------
    api_host: str = Field("127.0.0.1", description="OpenAI-compatible API (`personabot api`) bind address.")
    api_port: int = Field(8000, ge=1, le=65535, description="OpenAI-compatible API port.")
    api_system_messages: Literal["append", "refuse", "replace"] = Field(
        "append",
        description="A client's system message: append = after the persona's system prompt; refuse = 400; "
        "replace = instead of the persona's system prompt.",
    )
    api_rate_limit_per_minute: int = Field(
        60, ge=1, description="Requests per API key per minute (a key's own limit overrides it)."
    )
    api_timeout_s: float = Field(120, gt=0, le=3600, description="API: longest wait for a reply to start or go on.")
    metrics_enabled: bool = Field(True, description="Serve Prometheus metrics (GET /metrics) from the API process.")
    metrics_host: str = Field(
        "", description="Empty = /metrics on the API port behind an API key; else its own bind address (no auth)."
    )
    metrics_port: int = Field(9464, ge=1, le=65535, description="Port of the separate metrics address.")

    @field_validator("base_identity_terms", "eval_identity_questions", "allow_users", "allow_chats",
                     mode="before")
    @classmethod
    def _lists(cls, value: object) -> object:
        return split_list(value)

    @field_validator("telegram_token", "admin_password", "adapter_dir", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("telegram_base_url")
    @classmethod
    def _telegram_base_url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if not value.startswith(("http://", "https://")) or "://" == value[-3:] or " " in value:
            raise ValueError("must be an http(s) URL such as https://api.telegram.org/bot or http://host:8081")
        if "{" in value or "?" in value or "#" in value:
            raise ValueError("must be a plain http(s) URL without query, fragment or placeholders")
        return value if value.endswith("/bot") else value + "/bot"

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix:// (or be empty)")
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        if value and not value.startswith(("sqlite", "postgresql")):
            raise ValueError("must be a sqlite:/// or postgresql+psycopg:// URL (or be empty)")
        if value.startswith("postgresql://"):
            value = "postgresql+psycopg://" + value[len("postgresql://") :]
        return value

    @field_validator("retrain_cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        value = value.strip()
        if value:
            from croniter import croniter

            if not croniter.is_valid(value):
                raise ValueError("is not a 5-field cron expression like '0 3 * * *'")
        return value

    # --- derived ------------------------------------------------------------------------------
    @property
    def adapters_path(self) -> Path:
        return (self.adapter_dir or self.data_dir / "adapters").resolve()

    @property
    def effective_redis_url(self) -> str:
        """The configured Redis, else the embedded one `personabot up` starts."""
        return self.redis_url or f"redis://127.0.0.1:{self.embedded_redis_port}/0"

    @property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'personabot.db').resolve()}"

    @property
    def runs_path(self) -> Path:
        return (self.data_dir / "runs").resolve()


def _describe(error: ValidationError) -> str:
    lines = []
    legacy = {new: old for old, new in LEGACY_TRAINING_ENV.items()}
    for item in error.errors():
        loc = [str(part) for part in item["loc"]]
        name = "PERSONABOT_" + "__".join(loc).upper()
        if loc[0] == "training" and len(loc) > 1 and loc[1] in legacy:
            name += f" (or {legacy[loc[1]]})"
        lines.append(f"{name}: {item['msg']}")
    return "; ".join(lines)


def load_settings(**overrides: object) -> Settings:
    """Build Settings from env/.env plus overrides; raise SettingsError naming the bad variable."""
    env_file = None if os.environ.get(NO_ENV_FILE) == "1" else ".env"
    try:
        return Settings(_env_file=env_file, **overrides)  # type: ignore[arg-type]
    except ValidationError as error:
        raise SettingsError(_describe(error)) from None


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (cached); call `reset_settings()` after changing the env."""
    return load_settings()


def reset_settings() -> None:
    get_settings.cache_clear()


NO_ENV_FILE = "PERSONABOT_NO_ENV_FILE"  # set for children: their settings come only from the environment


def _env_value(value: Any) -> str:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, BaseModel):
        return value.model_dump_json()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict, tuple)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def env_for_children(settings: Settings) -> dict[str, str]:
    """Environment for child processes so that they see the same resolved settings.

    Every setting is passed explicitly and the children do not read `.env` again, so a secret
    that `up` withholds from a part (by leaving it out of that part's environment) stays withheld.
    """
    env = dict(os.environ)
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if value is not None:
            env[f"PERSONABOT_{name.upper()}"] = _env_value(value)
    env[NO_ENV_FILE] = "1"
    env["PERSONABOT_DATA_DIR"] = str(settings.data_dir.resolve())
    env["PERSONABOT_DATABASE_URL"] = settings.db_url
    env["PERSONABOT_ADAPTER_DIR"] = str(settings.adapters_path)
    if settings.redis_url:
        env["PERSONABOT_REDIS_URL"] = settings.redis_url
    env["PERSONABOT_MODEL"] = settings.model
    return env
