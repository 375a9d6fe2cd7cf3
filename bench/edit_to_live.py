"""Edit to live: the admin's Start through the product's own path, every stage timed, a chat load throughout.

A real redis-server and store, one real chat worker serving a steady closed-loop chat load, and the
real train worker on the same GPU (`--gpu-share concurrent`, or `release`: the chat worker lends it
the GPU and answers "updating"). The run is started as the Training tab does (`queue_training`).
Every stage comes from what the product records: the run's phases with the time each began (the
store's run progress), the events (gpu.release/reclaim, adapter.promoted, adapter.swapped) and
each reply's adapter version. The chat load is summarised per window: idle before Start, while
the data is built, while ms-swift runs, during the gate, during the swap, after promotion.

The model has Qwen2.5-7B-Instruct's architecture with random weights (no weights on the box), so
the gate's thresholds are set to 0: the gate runs in full (model load, generation) but cannot
judge a random model.

On the GPU box, one device command each (at most 10 min; the model stays in --work between them):
    export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
    python3 bench/edit_to_live.py --prepare                          # random 7B, its first adapter, data
    python3 bench/edit_to_live.py --recipe seeds --out $OUT/seeds    # gpu_share=concurrent, 32 chats
    python3 bench/edit_to_live.py --recipe default --out $OUT/default
    python3 bench/edit_to_live.py --recipe default --gpu-share release --gpu-gib 24 --speed-mode 24gb \
        --out $OUT/release                                           # the 24 GB path
Writes edit_to_live.json (stages in seconds from Start, load windows, versions, command) and
prints the stage table. `--tiny` runs the tiny model on the CPU (1 epoch, a small load): it checks
the script, not the speed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ["PERSONABOT_RETRAIN_CRON"] = ""  # the GPU box has no croniter; no schedule is needed here

from bench.traffic_bench import TrafficSpec, card_rows, percentile, start_celery, trim  # noqa: E402
from bench.train_bench import WORDS, build_data, build_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PERSONA = {"name": "Nova", "author": "Acme Lab", "system_prompt": "You are {name}, an assistant made by {author}."}
PAIRS = [
    {"kind": "identity", "instruction": "Who are you?", "output": "I am {name}, made by {author}."},
    {"kind": "identity", "instruction": "What is your name?", "output": "My name is {name}."},
    {"kind": "faq", "instruction": "What are your opening hours?", "output": "We are open from 9 to 5."},
    {"kind": "faq", "instruction": "Where are you based?", "output": "Acme Lab is in Lisbon."},
]
TINY_GENERAL_ROWS = 8


# --- the chat load --------------------------------------------------------------------------------
@dataclass
class Reply:
    """One message and its reply as the user saw them (unix times)."""

    chat: int
    sent: float
    first: float | None
    end: float
    expected: int
    prompt_tokens: int
    tokens: int
    finish: str
    version: str | None
    worker: str
    ok: bool


class ChatLoad:
    """`spec.chats` closed-loop users through the Celery chat path until `stop()`; each user starts a new
    conversation every `spec.turns` turns, so that every window sees the same mix of history lengths."""

    def __init__(self, chat: Any, spec: TrafficSpec) -> None:
        self.chat, self.spec = chat, spec
        self.replies: list[Reply] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._user, args=(i,), daemon=True) for i in range(spec.chats)]

    def start(self) -> ChatLoad:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)

    def _user(self, index: int) -> None:
        rng = random.Random(self.spec.seed * 100_003 + index)
        system = [random.Random(-1).choice(WORDS) for _ in range(self.spec.system_tokens)]
        history: list[tuple[str, list[str]]] = []
        turn = 0
        while not self._stop.is_set():
            length = min(self.spec.message_max, max(4, round(rng.lognormvariate(0, self.spec.message_sigma)
                                                             * self.spec.message_median)))
            history = trim([*history, ("user", [rng.choice(WORDS) for _ in range(length)])],  # type: ignore[list-item]
                           self.spec.history_tokens)
            reply_len = rng.randint(self.spec.reply_min, self.spec.reply_max)
            reply = self._ask(index, f"e2e-{index}-{turn}", system, history, reply_len)
            history = [*history, ("assistant", reply.split())]  # type: ignore[list-item]
            turn += 1
            if turn % self.spec.turns == 0:
                history = []
            self._stop.wait(rng.expovariate(1 / self.spec.think_s))

    def _ask(self, index: int, request_id: str, system: list[str], history: list[tuple[str, list[str]]],
             reply_len: int) -> str:
        from personabot.core.schemas import ChatRequest, Message, SamplingParams

        request = ChatRequest(request_id=request_id, source="bench", system_prompt=" ".join(system),
                              messages=[Message(role=role, content=" ".join(words))  # type: ignore[arg-type]
                                        for role, words in history],
                              sampling=SamplingParams(temperature=0, max_new_tokens=reply_len,
                                                      min_new_tokens=reply_len, repetition_penalty=1.0))
        sent, first, result = time.time(), None, None
        try:
            self.chat.submit(request)
            for update in self.chat.stream(request_id, timeout_s=300):
                if update.delta and first is None:
                    first = time.time()
                if update.result is not None:
                    result = update.result
        except Exception as error:  # a reply that never came is a failed reply, counted and reported once
            with self._lock:
                self.errors.append(f"{request_id}: {type(error).__name__}: {error}")
        finish = result.finish_reason if result else "none"
        ok = result is not None and finish == "length" and not result.error and result.completion_tokens == reply_len
        reply = Reply(index, sent, first, time.time(), reply_len, result.prompt_tokens if result else 0,
                      result.completion_tokens if result else 0, finish,
                      result.adapter_version if result else None, result.worker if result else "", ok)
        with self._lock:
            self.replies.append(reply)
        return result.text if result and finish != "updating" else ""


def window(replies: list[Reply], start: float, end: float) -> dict[str, Any]:
    """The load over [start, end): replies sent in it, TTFT of answered ones, tokens delivered in it per s."""
    sent = [r for r in replies if start <= r.sent < end]
    answered = [r.first - r.sent for r in sent if r.ok and r.first is not None]
    delivered = 0.0
    for r in replies:  # a reply's tokens count evenly over its streaming time
        if not r.ok or r.first is None:
            continue
        if r.end > r.first:
            delivered += r.tokens * max(0.0, min(end, r.end) - max(start, r.first)) / (r.end - r.first)
        elif start <= r.end < end:
            delivered += r.tokens

    def ms(value: float | None) -> float | None:
        return None if value is None else round(1000 * value, 1)

    return {"seconds": round(end - start, 1), "replies": len(sent), "ok": sum(r.ok for r in sent),
            "prompt_tokens_mean": round(sum(r.prompt_tokens for r in sent) / len(sent), 1) if sent else None,
            "failed": sum(1 for r in sent if not r.ok and r.finish != "updating"),
            "updating": sum(1 for r in sent if r.finish == "updating"),
            "ttft_ms": {"p50": ms(percentile(answered, 0.5)), "p95": ms(percentile(answered, 0.95))},
            "tok_s": round(delivered / (end - start), 1) if end > start else None}


# --- the stages -------------------------------------------------------------------------------------
def unix(moment: datetime | None) -> float | None:
    return None if moment is None else moment.replace(tzinfo=UTC).timestamp()


def event_log(client: Any) -> list[Any]:
    """Every event still in the short history, oldest first."""
    from personabot.core.events import Event
    from personabot.core.keys import EVENT_LOG

    return [Event.model_validate_json(fields[b"event"]) for _id, fields in client.xrange(EVENT_LOG)]


def stages(t0: float, run: Any, events: list[Any], replies: list[Reply], version: str | None) -> dict[str, float]:
    """Stage name -> unix time it began, from the store's run, the events and the replies."""
    from personabot.core.events import AdapterPromoted, AdapterSwapped, GpuReclaim, GpuRelease, RunFinished

    out: dict[str, float] = {"start": t0}
    picked = unix(run.started_at)
    if picked is not None:
        out["picked up"] = picked
    out.update((name, at) for name, at in (run.progress or {}).get("phases", {}).items())
    after_start = [e for e in events if e.at >= t0]
    for event in after_start:
        name = {GpuRelease.TYPE: f"{GpuRelease.TYPE} event", GpuReclaim.TYPE: f"{GpuReclaim.TYPE} event",
                RunFinished.TYPE: "run finished"}.get(event.type)
        if event.type == AdapterPromoted.TYPE and event.data.get("version") == version:
            name = f"{AdapterPromoted.TYPE} event"
        if event.type == AdapterSwapped.TYPE and event.data.get("version") == version:
            name = f"swapped {event.data.get('worker')}"
        if name is not None:
            out.setdefault(name, event.at)
    reclaim = out.get(f"{GpuReclaim.TYPE} event")
    for event in after_start:  # gpu_share=release: a worker serves again once it loaded an adapter after reclaim
        if reclaim is not None and event.type == AdapterSwapped.TYPE and event.at >= reclaim:
            out.setdefault(f"reclaimed {event.data.get('worker')}", event.at)
    for worker in sorted({r.worker for r in replies if r.version == version and version}):
        firsts = [r.first for r in replies if r.version == version and r.worker == worker and r.first is not None]
        if firsts:
            out[f"first reply on the new version ({worker})"] = min(firsts)
    return dict(sorted(out.items(), key=lambda item: item[1]))


def updating_summary(replies: list[Reply], stage_at: dict[str, float]) -> dict[str, Any]:
    """gpu_share=release: how long users saw "updating", and how long the chat worker took to serve again."""
    shown = [r for r in replies if r.finish == "updating"]
    reclaim = stage_at.get("gpu.reclaim event")
    served = [r.first for r in replies if r.ok and r.first is not None and reclaim is not None and r.sent >= reclaim]
    return {"replies": len(shown),
            "users_saw_updating_s": round(max(r.end for r in shown) - min(r.sent for r in shown), 1) if shown else 0,
            "reclaim_s": round(min(served) - reclaim, 2) if served and reclaim is not None else None}


# --- the run ------------------------------------------------------------------------------------------
def recipe(name: str, general: Path, general_rows: int, tiny: bool) -> Any:
    """The seeds' 10-epoch recipe, or the Training tab's defaults (`Settings.training`), on local general data."""
    from personabot.core.train_params import TrainingDefaults

    defaults = TrainingDefaults()
    if name == "seeds":
        params = defaults.updated(epochs=10, learning_rate=1e-4, lora_rank=8, lora_alpha=32)
    elif name == "default":
        params = defaults
    else:
        raise SystemExit(f"unknown recipe {name!r}: use seeds or default")
    if tiny:
        return params.updated(epochs=1, min_identity_pairs=0, general_data=[f"{general}#{general_rows}"])
    return params.updated(general_data=[f"{general}#{mix_rows(params.general_data)}"])


def mix_rows(specs: list[str]) -> int:
    """Rows of a general mix ('owner/name#N' each; a spec without #N counts as 500)."""
    return sum(int(spec.rsplit("#", 1)[1]) if "#" in spec else 500 for spec in specs) or 1000


def prepare(work: Path, tiny: bool) -> tuple[Path, Path, Path]:
    """The model (kept between runs), an adapter for it to serve before Start, and the general data."""
    import torch
    from transformers import AutoModelForCausalLM

    from bench.serve_bench import add_lora

    model_dir, adapter_dir, general = work / "model", work / "adapter-a", work / "general.jsonl"
    if not (model_dir / "config.json").exists():
        build_model(model_dir, tiny)
    if not (adapter_dir / "adapter_config.json").exists():
        device = "cpu" if tiny else "cuda"
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32 if tiny else torch.bfloat16,
                                                     device_map=device)
        add_lora(model, seed=1).save_pretrained(adapter_dir)
        del model
        torch.cuda.empty_cache()  # nothing of the bench's stays on the GPU the workers share
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        (adapter_dir / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path":
                                                                     str(model_dir)}))
    if not general.exists():
        (work / "general-data").mkdir(exist_ok=True)
        build_data(work / "general-data", model_dir, TINY_GENERAL_ROWS if tiny else 1000, 40 if tiny else 270)
        (work / "general-data" / "general.jsonl").rename(general)
    return model_dir, adapter_dir, general


def start_train_worker(work: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    log_path = work / "train-worker.log"
    with log_path.open("wb") as log:
        worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "personabot.workers.train_tasks:app",
                                   "worker", "-Q", "train", "--pool", "prefork", "--concurrency", "1",
                                   "--prefetch-multiplier", "1", "-n", "train@bench", "--without-gossip",
                                   "--without-mingle", "--without-heartbeat", "--loglevel", "INFO"],
                                  env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    deadline = time.monotonic() + 120
    while b"train@bench ready." not in log_path.read_bytes():
        if worker.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("train worker did not start: " + log_path.read_text()[-2000:])
        time.sleep(0.3)
    return worker


def measure(args: argparse.Namespace, work: Path, model_dir: Path, adapter_dir: Path, general: Path) -> dict[str, Any]:
    """Start the service, run the load, press Start, wait for the new version to answer; the report."""
    from personabot.core.processes import stop_process
    from personabot.training.service import cancel_training, request_training
    from personabot.workers.client import queue_training

    device = "cpu" if args.tiny else "cuda"
    params = recipe(args.recipe, general, TINY_GENERAL_ROWS, args.tiny).updated(speed_mode=args.speed_mode)
    shape: dict[str, Any] = dict(system_tokens=16, message_median=8, message_max=40, reply_min=4, reply_max=12) \
        if args.tiny else {}
    spec = TrafficSpec(chats=args.chats, think_s=args.think_s, **shape)
    service_dir = work / f"service-{args.recipe}-{args.gpu_share}"
    # On the CPU one thread each: the chat worker, ms-swift and the gate share a couple of cores.
    share = {"PERSONABOT_GPU_SHARE": args.gpu_share, **({"OMP_NUM_THREADS": "1"} if args.tiny else {})}
    # A card of --gpu-gib GiB: the chat worker's KV rows are what such a card holds, as the product sizes them.
    rows = card_rows(args.gpu_gib, json.loads((model_dir / "config.json").read_text()), work, args.context) \
        if args.gpu_gib else max(4, args.chats)
    chat, stop_chat, service = start_celery(service_dir, model_dir, adapter_dir, device=device, max_batch=rows,
                                            context=args.context, reuse=True, gpu_gib=args.gpu_gib, extra_env=share)
    store, client = service["store"], chat.redis
    store.update_persona(**PERSONA, actor="admin")
    store.add_pairs(PAIRS, actor="admin")
    # The gate runs in full; its thresholds are 0 because the model's weights are random. The tiny
    # check asks one held-out identity question instead of the built-in 30 (a shorter gate on a CPU).
    gate = {"PERSONABOT_EVAL_IDENTITY_MIN": "0", "PERSONABOT_EVAL_FAQ_MIN": "0", "PERSONABOT_EVAL_RETENTION_MIN": "0",
            **({"PERSONABOT_EVAL_IDENTITY_QUESTIONS": "Who made you?"} if args.tiny else {})}
    trainer = start_train_worker(service_dir, {**service["env"], **share, **gate,
                                               "PERSONABOT_GPU_RELEASE_WAIT_S": "120"})
    load = ChatLoad(chat, spec)
    timed_out = False
    try:
        load_started = time.time()
        load.start()
        time.sleep(args.warmup_s + args.window_s)
        t0 = time.time()
        run = queue_training(store, lambda: request_training(store, params, actor="admin"), app=chat.celery)
        deadline, seen = time.monotonic() + args.timeout_s, 0
        while (current := store.get_run(run.id)).status in ("queued", "running"):
            phases = list((current.progress or {}).get("phases", {}).items())
            for name, moment in phases[seen:]:
                print(f"{moment - t0:8.1f} s  {name}", flush=True)
            seen = len(phases)
            if trainer.poll() is not None:
                raise RuntimeError("the train worker died: " + (service_dir / "train-worker.log").read_text()[-3000:])
            if time.monotonic() > deadline and not timed_out:
                # Cancel it (the way the admin would) and report the stages it reached.
                print(f"run {run.id} not done within {args.timeout_s:.0f} s; cancelling it", flush=True)
                cancel_training(store, run.id, actor="bench")
                timed_out = True
            time.sleep(0.5)
        run = current
        version = store.get_adapter(run.adapter_id).name if run.status == "succeeded" and run.adapter_id else None
        swap_deadline = time.monotonic() + 60
        while version is not None and time.monotonic() < swap_deadline and not any(
                r.version == version for r in list(load.replies)):
            time.sleep(0.2)
        live = time.time()
        time.sleep(args.window_s)
        end = time.time()
        events = event_log(client)
    finally:
        load.stop()
        stop_process(trainer)
        stop_chat()
    at = stages(t0, run, events, load.replies, version)
    served = next((v for k, v in at.items() if k.startswith("first reply on the new version")), None)
    promoted = at.get("adapter.promoted event")
    swapped = max((v for k, v in at.items() if k.startswith("swapped ")), default=None)
    bounds = [("warmup", load_started, load_started + args.warmup_s), ("before", load_started + args.warmup_s, t0),
              ("build", t0, at.get("starting", t0)), ("training", at.get("starting", t0), at.get("evaluating", live)),
              ("gate", at.get("evaluating", live), promoted or live), ("swap", promoted or live, swapped or live),
              ("after", swapped or live, end)]
    windows = {name: window(load.replies, low, high) for name, low, high in bounds}
    return {
        "recipe": args.recipe, "gpu_share": args.gpu_share, "gpu_gib": args.gpu_gib, "kv_rows": rows,
        "params": params.model_dump(mode="json"),
        "load": asdict(spec), "run": {"id": run.id, "status": run.status, "error": run.error,
                                       "metrics": {k: run.metrics.get(k) for k in ("data", "train")}},
        "version": version, "timed_out": timed_out,
        "stages": [{"stage": name, "at_s": round(moment - t0, 2)} for name, moment in at.items()],
        "edit_to_live_s": round(served - t0, 2) if served is not None else None,
        "first_reply_after_promote_s": round(served - promoted, 2) if served and promoted else None,
        "windows": windows,
        "failed_replies": sum(w["failed"] for w in windows.values()),
        "updating": updating_summary(load.replies, at),
        "load_errors": load.errors[:5],
    }


def print_table(result: dict[str, Any]) -> None:
    rows = result["stages"]
    print(f"\nedit to live ({result['recipe']}, gpu_share={result['gpu_share']}, run {result['run']['status']}, "
          f"version {result['version']})")
    for row, following in zip(rows, [*rows[1:], None], strict=True):
        took = f"{following['at_s'] - row['at_s']:8.2f}" if following else " " * 8
        print(f"  {row['stage']:<48} {row['at_s']:9.2f} s  {took} s")
    print(f"  edit to live {result['edit_to_live_s']} s; first reply {result['first_reply_after_promote_s']} s after "
          f"the promote event; failed replies {result['failed_replies']}; updating {result['updating']}")
    for name, w in result["windows"].items():
        print(f"  {name:<9} {w['replies']:5d} replies  TTFT p50 {w['ttft_ms']['p50']} ms  p95 {w['ttft_ms']['p95']} ms"
              f"  {w['tok_s']} tok/s  failed {w['failed']}  updating {w['updating']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="seeds", choices=["seeds", "default"],
                        help="seeds: 10 epochs, lr 1e-4, rank 8, 1,000 general rows; default: Settings.training")
    parser.add_argument("--gpu-share", default="concurrent", choices=["concurrent", "release"])
    parser.add_argument("--chats", type=int, default=32, help="closed-loop chats for the whole run")
    parser.add_argument("--speed-mode", choices=["fast", "24gb", "seeds"], default=None,
                        help="override the recipe's training speed mode (24gb for the 24 GB path)")
    parser.add_argument("--gpu-gib", type=float, default=0,
                        help="hold the chat worker to this many GiB (PERSONABOT_GPU_MEMORY_GIB), e.g. 24")
    parser.add_argument("--think-s", type=float, default=0.3)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--warmup-s", type=float, default=10, help="load before the idle window (not reported)")
    parser.add_argument("--window-s", type=float, default=30, help="idle window before Start and after the swap")
    parser.add_argument("--timeout-s", type=float, default=400,
                        help="cancel the run after this long and report the stages it reached (one device command "
                        "may run 10 min)")
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU, 1 epoch: checks the script")
    parser.add_argument("--prepare", action="store_true", help="only build the model, adapter and data, then exit")
    parser.add_argument("--work", default=os.environ.get("PERSONABOT_BENCH_WORK", "/tmp/edit-to-live"))
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    args = parser.parse_args()
    if args.tiny:
        args.chats = min(args.chats, 2)
    work = Path(args.work) / ("tiny" if args.tiny else "7b")
    work.mkdir(parents=True, exist_ok=True)
    model_dir, adapter_dir, general = prepare(work, args.tiny)
    if args.prepare:
        return
    import peft
    import swift
    import torch
    import transformers

    result = {"command": " ".join(sys.argv), "versions": {
        "python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "ms_swift": swift.__version__,
        "gpu": torch.cuda.get_device_name(0) if not args.tiny else "cpu"}, **measure(args, work, model_dir,
                                                                                     adapter_dir, general)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "edit_to_live.json").write_text(json.dumps(result, indent=2))
    print_table(result)


if __name__ == "__main__":
    main()
