"""Telegram-like traffic: many multi-turn chats against the bare engine and the real Celery chat path.

Each chat is one user: it sends a message, reads the whole reply, thinks, sends the next one. The
history grows every turn (the model's own replies included) and is trimmed as the bot's memory
trims it (oldest turns first, `--history-tokens`); one persona system prompt is shared by every
chat. Lengths are drawn from stated distributions (see `TrafficSpec`). Arrivals are closed-loop
(all chats start at once, short think time) or Poisson at a given overall message rate.

Run on the GPU box (see bench/RESULTS.md, Traffic):
    python3 bench/traffic_bench.py --out $OUT
`--tiny` runs a small model on the CPU: it checks the script, not the speed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ["PERSONABOT_RETRAIN_CRON"] = ""  # the GPU box has no croniter; no schedule is needed here

from bench.serve_bench import QWEN25_7B, TINY, add_lora, build_model  # noqa: E402
from bench.word_tokenizer import WordVocab, save_tokenizer  # noqa: E402


@dataclass(frozen=True)
class TrafficSpec:
    """What one run sends. Token counts are exact: the bench's tokenizer maps one word to one id."""

    chats: int
    turns: int = 8
    system_tokens: int = 120  # the persona's system prompt, the same for every chat
    message_median: int = 60  # user message length: lognormal around this, clipped to [4, message_max]
    message_sigma: float = 0.9
    message_max: int = 600
    reply_min: int = 48  # reply length: uniform in [reply_min, reply_max], forced (random weights)
    reply_max: int = 256
    history_tokens: int = 2000  # the bot's memory budget (PERSONABOT_HISTORY_TOKENS)
    rate: float | None = None  # overall messages/s (Poisson); None = closed loop
    think_s: float = 0.3  # closed loop: mean think time between reading a reply and the next message
    seed: int = 0


@dataclass
class Turn:
    """One message and its reply, as the user saw them."""

    chat: int
    turn: int
    prompt_tokens: int
    reply_tokens: int
    expected: int
    ttft_s: float
    gaps_s: list[float]
    ok: bool


# A backend answers one turn: (messages as (role, token ids), reply length, request id) ->
# (reply ids, TTFT, inter-token gaps, ok, prompt tokens the engine saw).
Backend = Callable[[list[tuple[str, list[int]]], int, str], tuple[list[int], float, list[float], bool, int]]


PROGRESS_S = 30.0


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def trim(history: list[tuple[str, list[int]]], budget: int) -> list[tuple[str, list[int]]]:
    """Drop the oldest user/assistant pairs until the history fits `budget` (the newest turn stays)."""
    while sum(len(ids) for _, ids in history) > budget and len(history) > 2:
        history = history[2:]
    return history


def run_traffic(spec: TrafficSpec, backend: Backend, vocab: WordVocab) -> dict[str, Any]:
    """Drive `spec.chats` users through `spec.turns` turns each; return the summary."""
    system = vocab.word_ids(random.Random(-1), spec.system_tokens)
    turns: list[Turn] = []
    lock = threading.Lock()
    mean_think = spec.chats / spec.rate if spec.rate else spec.think_s

    errors: list[str] = []

    def user(index: int) -> None:
        try:
            converse(index)
        except Exception as error:  # a user that crashed is counted as failed turns, and reported once
            with lock:
                errors.append(f"chat {index}: {type(error).__name__}: {error}")
            if len(errors) == 1:
                traceback.print_exc()

    def converse(index: int) -> None:
        rng = random.Random(spec.seed * 100_003 + index)
        history: list[tuple[str, list[int]]] = []
        if spec.rate:
            time.sleep(rng.expovariate(1 / mean_think))
        for n in range(spec.turns):
            length = min(spec.message_max, max(4, round(rng.lognormvariate(0, spec.message_sigma)
                                                        * spec.message_median)))
            message = vocab.word_ids(rng, length)
            history = trim([*history, ("user", message)], spec.history_tokens)
            reply_len = rng.randint(spec.reply_min, spec.reply_max)
            messages = [("system", system), *history]
            reply, ttft, gaps, ok, prompt_tokens = backend(messages, reply_len, f"t{spec.seed}-{index}-{n}")
            with lock:
                turns.append(Turn(index, n, prompt_tokens, len(reply), reply_len, ttft, gaps, ok))
            history = [*history, ("assistant", reply)]
            time.sleep(rng.expovariate(1 / mean_think) if mean_think > 0 else 0)

    threads = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(spec.chats)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:  # a progress line every PROGRESS_S, so that a stalled run shows where it stands
        while thread.is_alive():
            thread.join(timeout=PROGRESS_S - (time.monotonic() - started) % PROGRESS_S)
            if thread.is_alive():
                print(f"  {time.monotonic() - started:.0f} s: {len(turns)} of {spec.chats * spec.turns} turns, "
                      f"{len(errors)} users failed", flush=True)
    wall = time.monotonic() - started
    return {**summarize(spec, turns, wall), "errors": errors[:5], "lost_turns": spec.chats * spec.turns - len(turns)}


def summarize(spec: TrafficSpec, turns: list[Turn], wall: float) -> dict[str, Any]:
    def ms(value: float | None) -> float | None:
        return None if value is None else round(1000 * value, 1)

    first = [t.ttft_s for t in turns if t.turn == 0]
    later = [t.ttft_s for t in turns if t.turn > 0]
    every = [t.ttft_s for t in turns]
    gaps = [g for t in turns for g in t.gaps_s]
    return {
        "spec": asdict(spec), "wall_s": round(wall, 2), "turns": len(turns),
        "tok_s": round(sum(t.expected for t in turns if t.ok) / wall, 1),
        "messages_per_s": round(len(turns) / wall, 2),
        "prompt_tokens_mean": round(statistics.mean(t.prompt_tokens for t in turns), 1) if turns else None,
        "prompt_tokens_max": max((t.prompt_tokens for t in turns), default=None),
        "ttft_ms": {"p50": ms(percentile(every, 0.5)), "p95": ms(percentile(every, 0.95)),
                    "p99": ms(percentile(every, 0.99))},
        "ttft_ms_first_message": {"p50": ms(percentile(first, 0.5)), "p95": ms(percentile(first, 0.95))},
        "ttft_ms_follow_up": {"p50": ms(percentile(later, 0.5)), "p95": ms(percentile(later, 0.95))},
        "inter_token_gap_ms": {"p50": ms(percentile(gaps, 0.5)), "p99": ms(percentile(gaps, 0.99))},
        "failed": sum(1 for t in turns if not t.ok) + spec.chats * spec.turns - len(turns),
    }


def reuse_per_reply(before: dict[str, Any], after: dict[str, Any], replies: int) -> dict[str, Any]:
    """Engine counters over one phase: prompt tokens computed vs. taken from the KV reuse pool, per reply."""
    def per(name: str) -> float | None:
        if name not in after or not replies:
            return None
        return round((after[name] - before.get(name, 0)) / replies, 1)

    return {"prefill_tokens_per_reply": per("prefill_tokens"), "prefix_hit_tokens_per_reply": per("prefix_hit_tokens"),
            "parked_rows": after.get("parked_rows")}


# --- backends ---------------------------------------------------------------------------------------------
def engine_backend(engine: Any, tokenizer: Any, vocab: WordVocab) -> Backend:
    """The bare engine, given the prompt the chat worker would build (the same chat template)."""
    from personabot.workers.engine import ACTIVE, GenerationDone, GenerationRequest

    def answer(messages: list[tuple[str, list[int]]], reply_len: int, request_id: str):  # type: ignore[no-untyped-def]
        rendered = tokenizer.apply_chat_template([{"role": role, "content": vocab.text(content)}
                                                  for role, content in messages],
                                                 add_generation_prompt=True, tokenize=True)
        ids = list(rendered["input_ids"] if not isinstance(rendered, list) else rendered)
        sent = time.monotonic()
        stream = engine.submit(GenerationRequest(request_id, ids, reply_len, adapter=ACTIVE,
                                                 min_new_tokens=reply_len))
        reply: list[int] = []
        times: list[float] = []
        while True:
            item = stream.items.get(timeout=600)
            if isinstance(item, GenerationDone):
                break
            reply += item
            times += [time.monotonic()] * len(item)
        ttft = (times[0] if times else time.monotonic()) - sent
        gaps = [b - a for a, b in itertools.pairwise(times) if b > a]
        ok = item.finish_reason == "length" and len(reply) == reply_len
        # The history keeps the text the user saw, as the bot's memory does (special tokens are not shown).
        shown = [t for t in reply if vocab.first_word <= t < vocab.first_word + len(vocab.words)]
        return shown, ttft, gaps, ok, len(ids)

    return answer


def celery_backend(chat: Any, vocab: WordVocab) -> Backend:
    """The product's path: ChatClient -> Celery `chat` queue -> chat worker -> Redis reply stream."""
    from personabot.core.schemas import ChatRequest, Message, SamplingParams

    words = vocab.text

    def answer(messages: list[tuple[str, list[int]]], reply_len: int, request_id: str):  # type: ignore[no-untyped-def]
        request = ChatRequest(request_id=request_id, source="bench",
                              system_prompt=words(messages[0][1]),
                              messages=[Message(role=role, content=words(ids))  # type: ignore[arg-type]
                                        for role, ids in messages[1:]],
                              sampling=SamplingParams(temperature=0, max_new_tokens=reply_len,
                                                      min_new_tokens=reply_len, repetition_penalty=1.0))
        sent = time.monotonic()
        chat.submit(request)
        times: list[float] = []
        result = None
        for update in chat.stream(request_id, timeout_s=600):
            if update.delta:
                times.append(time.monotonic())
            if update.result is not None:
                result = update.result
        # The history keeps the text the user saw, as the bot's memory does.
        reply = vocab.ids(result.text) if result else []
        ttft = (times[0] if times else time.monotonic()) - sent
        # A stream entry may carry several tokens; gaps are between entries the reader saw.
        gaps = [b - a for a, b in itertools.pairwise(times)]
        ok = result is not None and result.finish_reason == "length" and not result.error \
            and result.completion_tokens == reply_len
        if not ok and not getattr(answer, "reported", False):
            answer.reported = True  # type: ignore[attr-defined]
            print(f"celery turn failed: {result!r}", flush=True)
        return reply, ttft, gaps, ok, result.prompt_tokens if result else 0

    return answer


def api_backend(url: str, key: str, chats: int, vocab: WordVocab) -> tuple[Backend, Callable[[], None]]:
    """The OpenAI API path: `personabot api` (SSE) -> the same Celery chat path, read as a client would."""
    import httpx

    http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600,
                        limits=httpx.Limits(max_connections=chats + 8, max_keepalive_connections=chats + 8))
    words = vocab.text

    def answer(messages: list[tuple[str, list[int]]], reply_len: int, request_id: str):  # type: ignore[no-untyped-def]
        body = {"model": "persona", "stream": True, "stream_options": {"include_usage": True},
                "messages": [{"role": role, "content": words(ids)} for role, ids in messages],
                "temperature": 0, "max_tokens": reply_len, "min_tokens": reply_len, "repetition_penalty": 1.0,
                "user": request_id}
        sent = time.monotonic()
        times: list[float] = []
        text, finish, usage = [], None, None
        with http.stream("POST", "/chat/completions", json=body) as response:
            if response.status_code != 200:
                response.read()
                print(f"api turn failed: {response.status_code} {response.text[:300]}", flush=True)
                return [], time.monotonic() - sent, [], False, 0
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices", []):
                    if choice["delta"].get("content"):
                        times.append(time.monotonic())
                        text.append(choice["delta"]["content"])
                    finish = choice.get("finish_reason") or finish
        ttft = (times[0] if times else time.monotonic()) - sent
        gaps = [b - a for a, b in itertools.pairwise(times)]
        ok = finish == "length" and usage is not None and usage["completion_tokens"] == reply_len
        if not ok and not getattr(answer, "reported", False):
            answer.reported = True  # type: ignore[attr-defined]
            print(f"api turn failed: finish={finish} usage={usage}", flush=True)
        return vocab.ids("".join(text)), ttft, gaps, ok, usage["prompt_tokens"] if usage else 0

    return answer, http.close


def start_api(service: dict[str, Any]) -> tuple[str, str, Callable[[], None]]:
    """`personabot api` on a free port over the service's Redis and store; returns its /v1 URL and a key."""
    import httpx

    from personabot.core.processes import stop_process
    from personabot.redis_server import free_port

    _, key = service["store"].create_api_key("traffic-bench", rate_limit_per_minute=10_000_000)
    port = free_port()
    env = {**service["env"], "PERSONABOT_API_PORT": str(port), "PERSONABOT_API_SYSTEM_MESSAGES": "replace",
           "PERSONABOT_API_TIMEOUT_S": "600"}
    log = open(service["work"] / "api.log", "wb")  # noqa: SIM115 - closed by stop()
    process = subprocess.Popen([sys.executable, "-m", "personabot.cli", "api"], env=env, stdout=log,
                               stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1],
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/models", headers={"Authorization": f"Bearer {key}"}, timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process(process)
            raise RuntimeError("the API did not start: " + (service["work"] / "api.log").read_text()[-2000:])
        time.sleep(0.3)

    def stop() -> None:
        stop_process(process)
        log.close()

    return url, key, stop


def card_rows(gib: float, dims: dict[str, Any], work: Path, context: int) -> int:
    """The KV rows a chat worker sizes for itself on a card of `gib` GiB (the product's own plan)."""
    from personabot.workers.engine.kv_plan import GIB, plan_rows, read_shape

    shape_dir = work / "shape"
    shape_dir.mkdir(parents=True, exist_ok=True)
    (shape_dir / "config.json").write_text(json.dumps(dims))
    plan = plan_rows(read_shape(shape_dir), free_bytes=int(gib * GIB), total_bytes=int(gib * GIB), max_len=context)
    print(f"{gib} GiB card: {plan.text}", flush=True)
    return plan.rows


def start_celery(work: Path, model_dir: Path, adapter_dir: Path, *, device: str, max_batch: int,
                 context: int, reuse: bool, gpu_gib: float = 0, log_level: str = "WARNING",
                 extra_env: dict[str, str] | None = None) -> tuple[Any, Callable[[], None], dict[str, Any]]:
    """redis-server + the store + one real chat worker (`extra_env`: more settings for it); returns a
    ChatClient, a stop function and the service's parts (work dir, worker environment, store, for
    `start_api`; `stats`, a reader of the engine stats the worker publishes after each reply)."""
    from personabot.core.events import WorkerOnline, recent
    from personabot.core.keys import CHAT_WORKERS
    from personabot.core.processes import stop_process
    from personabot.core.redis_pool import sync_client
    from personabot.core.store import Store
    from personabot.redis_server import RedisServer
    from personabot.workers.app import make_celery
    from personabot.workers.client import ChatClient

    server = RedisServer(work / "redis", persist=False).start()
    db_url = f"sqlite:///{work / 'store.db'}"
    store = Store(db_url)
    stored = work / "data" / "adapters" / "a"  # the worker serves adapters only from its store
    shutil.copytree(adapter_dir, stored, dirs_exist_ok=True)
    adapter = store.find_adapter("a") or store.add_adapter(
        name="a", path=str(stored), base_model=str(model_dir), data_hash="", eval_scores={}, eval_passed=True)
    store.set_active(adapter.id)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONABOT_")}
    env.update({"PERSONABOT_REDIS_URL": server.url, "PERSONABOT_DATABASE_URL": db_url,
                "PERSONABOT_MODEL": str(model_dir), "PERSONABOT_DATA_DIR": str(work / "data"),
                "PERSONABOT_MAX_BATCH": str(max_batch), "PERSONABOT_CONTEXT_TOKENS": str(context),
                "PERSONABOT_DEVICE": device, "PERSONABOT_RETRAIN_CRON": "",
                "PERSONABOT_CHAT_PREFIX_CACHE": str(reuse).lower(), "PERSONABOT_GPU_MEMORY_GIB": str(gpu_gib),
                "PYTHONPATH": str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", ""),
                **(extra_env or {})})
    client = sync_client(server.url, concurrency=1024)  # one blocking stream read per chat
    log = open(work / "chat-worker.log", "wb")  # noqa: SIM115 - closed by stop()
    worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "personabot.workers.chat_tasks:app", "worker",
                               "-Q", "chat", "--pool", "threads", "--concurrency", str(max_batch),
                               "--prefetch-multiplier", "1", "-n", "traffic@bench", "--without-gossip",
                               "--without-mingle", "--without-heartbeat", "--loglevel", log_level],
                              env=env, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1],
                              start_new_session=True)
    started = time.monotonic()
    deadline = started + 300
    while not any(e.type == WorkerOnline.TYPE for e in recent(client, 1000)):
        failed = b"cannot start its engine" in (work / "chat-worker.log").read_bytes()
        if failed or worker.poll() is not None or time.monotonic() > deadline:
            stop_process(worker)
            raise RuntimeError("chat worker did not come online: " + (work / "chat-worker.log").read_text()[-2000:])
        time.sleep(0.5)
    print(f"chat worker online after {time.monotonic() - started:.1f} s", flush=True)

    def stop() -> None:
        stop_process(worker)
        log.close()
        client.close()
        server.stop()
        store.close()

    def stats() -> dict[str, Any]:
        raw = client.hget(CHAT_WORKERS, "traffic@bench")
        return json.loads(raw) if raw else {}

    return ChatClient(client, make_celery(server.url)), stop, {"work": work, "env": env, "store": store,
                                                               "stats": stats}


REPORTED = ("tok_s", "ttft_ms", "ttft_ms_follow_up", "prefill_tokens_per_reply", "prefix_hit_tokens_per_reply",
            "failed")


# --- the run --------------------------------------------------------------------------------------------
def phases(args: argparse.Namespace, chats: int) -> list[tuple[str, TrafficSpec]]:
    """The first closed-loop run on a freshly started engine, then every load on the warm one."""
    runs = specs(args, chats, seed=chats)
    warm = [(f"{label}/warm", TrafficSpec(**{**asdict(spec), "seed": spec.seed + 50})) for label, spec in runs]
    return [(f"{runs[0][0]}/fresh", runs[0][1]), *warm]


def specs(args: argparse.Namespace, chats: int, seed: int) -> list[tuple[str, TrafficSpec]]:
    shape: dict[str, Any] = {"turns": args.turns, "history_tokens": args.history_tokens}
    if args.tiny:
        shape.update(system_tokens=16, message_median=8, message_max=40, reply_min=4, reply_max=12)
    out = [("closed", TrafficSpec(chats=chats, seed=seed, think_s=args.think_s, **shape))]
    out += [(f"poisson_{rate:g}_per_s", TrafficSpec(chats=chats, seed=seed + 1 + i, rate=rate, **shape))
            for i, rate in enumerate(r * chats for r in args.rates_per_chat)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    parser.add_argument("--tiny", action="store_true", help="small model on the CPU: checks the script only")
    parser.add_argument("--chats", default="32,128,256")
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--history-tokens", type=int, default=2000)
    parser.add_argument("--think-s", type=float, default=0.3)
    parser.add_argument("--rates-per-chat", type=lambda s: [float(x) for x in s.split(",") if x], default=[],
                        help="Poisson rates, in messages/s per chat (e.g. 0.05,0.1)")
    parser.add_argument("--backends", default="bare,celery,api")
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--reuse", default="on", help="KV reuse in the engine: on, off, or on,off to compare")
    parser.add_argument("--gpu-gib", type=float, default=0,
                        help="hold the engines to this many GiB of the GPU (PERSONABOT_GPU_MEMORY_GIB), e.g. 24 "
                        "for a 24 GB card: KV rows sized from it, no merged copy unless it fits; --max-batch ignored")
    parser.add_argument("--worker-log-level", default="INFO", help="the chat worker's Celery log level")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device, dtype, dims = ("cpu", torch.float32, TINY) if args.tiny else ("cuda", torch.bfloat16, QWEN25_7B)
    context = 4096
    import peft
    import transformers

    results: dict[str, Any] = {"versions": {
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "python": sys.version.split()[0], "gpu": torch.cuda.get_device_name(0) if device == "cuda" else "cpu"},
        "command": " ".join(sys.argv)}

    def save() -> None:
        (out / "traffic_bench.json").write_text(json.dumps(results, indent=2))

    work = Path(os.environ.get("PERSONABOT_BENCH_WORK", "/tmp/traffic-bench"))
    model_dir, adapter_dir = work / "Qwen2.5-7B-Instruct", work / "adapter-a"
    from transformers import AutoTokenizer

    from personabot.training.tiny_model import CHAT_TEMPLATE

    vocab = WordVocab(dims["vocab_size"])
    specials = vocab.specials
    model_dir.mkdir(parents=True, exist_ok=True)
    save_tokenizer(model_dir, vocab, CHAT_TEMPLATE)
    (model_dir / "config.json").write_text(json.dumps({"model_type": "qwen2"}))  # Qwen2Tokenizer, as served
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    peft_model = add_lora(build_model(dims, device, dtype), seed=1)
    work.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(adapter_dir)
    del peft_model  # the engine takes the weights it is given: each engine gets a new copy (same seed)
    config_file = adapter_dir / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = str(model_dir)
    config_file.write_text(json.dumps(config))
    chat_counts = [int(c) for c in args.chats.split(",")]
    backends = args.backends.split(",")
    if args.gpu_gib:
        args.max_batch = card_rows(args.gpu_gib, dims, work, context)
        results["gpu_gib"] = {"gib": args.gpu_gib, "rows": args.max_batch}

    from personabot.workers.engine.kv_plan import limit_gpu_memory
    from personabot.workers.engine.scheduler import HFEngine

    def run_bare(chats: int, reuse: bool) -> None:
        started = time.monotonic()
        limit_gpu_memory(args.gpu_gib)
        engine = HFEngine(lambda: build_model(dims, device, dtype), model_name=str(model_dir),
                          max_batch=args.max_batch, max_len=context, lora_slots=3, lora_rank=32,
                          eos_ids=tuple(specials.values()), prefix_cache=reuse)
        engine.load_adapter("a", adapter_dir)
        engine.set_active("a")
        ready = round(time.monotonic() - started, 1)
        path = "bare" if reuse else "bare-no-reuse"
        for label, spec in phases(args, chats):
            key = f"{path}/{chats}/{label}"
            before = engine.stats()
            summary = run_traffic(spec, engine_backend(engine, tokenizer, vocab), vocab)
            results[key] = {**summary, "engine_ready_s": ready,
                            **reuse_per_reply(before, engine.stats(), summary["turns"])}
            print(key, json.dumps({k: results[key][k] for k in REPORTED}), flush=True)
            save()
        results[f"{path}/{chats}/stats"] = engine.stats()
        engine.close()
        if device == "cuda":
            results[f"{path}/{chats}/gpu_reserved_after_close_gib"] = round(torch.cuda.memory_reserved() / 2**30, 2)

    def run_served(backend_name: str, chats: int, reuse: bool) -> None:
        path = backend_name if reuse else f"{backend_name}-no-reuse"
        chat, stop, service = start_celery(work / f"{path}-{chats}", model_dir, adapter_dir,
                                           device=device, max_batch=args.max_batch, context=context, reuse=reuse,
                                           gpu_gib=args.gpu_gib, log_level=args.worker_log_level)
        stops = [stop]
        try:
            if backend_name == "api":
                url, api_key, stop_api = start_api(service)
                stops.insert(0, stop_api)
                backend, close = api_backend(url, api_key, chats, vocab)
                stops.insert(0, close)
            else:
                backend = celery_backend(chat, vocab)
            for label, spec in phases(args, chats):
                key = f"{path}/{chats}/{label}"
                before = service["stats"]()
                summary = run_traffic(spec, backend, vocab)
                results[key] = {**summary, **reuse_per_reply(before, service["stats"](), summary["turns"])}
                print(key, json.dumps({k: results[key][k] for k in REPORTED}), flush=True)
                save()
        finally:
            for stop_one in stops:
                stop_one()

    if {"celery", "api"} & set(backends):
        saved = model_dir / "config.saved.json"  # a later run in the same work dir keeps the weights it wrote
        if saved.exists() and json.loads(saved.read_text()).get("hidden_size") == dims["hidden_size"] \
                and any(model_dir.glob("*.safetensors")):
            shutil.copy(saved, model_dir / "config.json")
        else:
            build_model(dims, "cpu", dtype).save_pretrained(model_dir)
            shutil.copy(model_dir / "config.json", saved)
    # Chat count outermost: a run cut short still compares every path at the counts it reached.
    reuse_modes = [mode == "on" for mode in args.reuse.split(",")]
    for chats, backend_name, reuse in itertools.product(chat_counts, backends, reuse_modes):
        if backend_name == "bare":
            run_bare(chats, reuse)
        elif backend_name in ("celery", "api"):
            run_served(backend_name, chats, reuse)
        else:
            raise SystemExit(f"unknown backend {backend_name!r}: use bare, celery and/or api")
    save()


if __name__ == "__main__":
    main()
