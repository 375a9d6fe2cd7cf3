"""Every Redis key and channel personabot uses, by prefix, so that no two parts collide and none is spelt twice.

Keys of one request, host or key are the prefix plus that id (`REPLY + request_id`); Celery's own
keys (the `chat` and `train` lists, `unacked`, `celery-task-meta-*`) are not ours and not here.
"""

from __future__ import annotations

NAMESPACE = "personabot:"

# Events (core.events): the pub/sub channel and the capped stream that keeps the recent ones.
EVENTS_CHANNEL = NAMESPACE + "events"
EVENT_LOG = NAMESPACE + "event-log"

# Chat (core.streams, workers.chat_reply): one reply stream, its cancel flag and its owner's claim per request.
REPLY = NAMESPACE + "reply:"
CANCEL = NAMESPACE + "cancel:"
CLAIM = NAMESPACE + "claim:"
CHAT_WORKERS = NAMESPACE + "chat-workers"  # hash: one stats record per chat worker (for /metrics)

# GPU sharing (core.gpu_share): the trainer's lease and the chat workers' holder entries, per GPU host.
GPU_LEASE = NAMESPACE + "gpu-released:"
GPU_HOLDERS = NAMESPACE + "gpu-holders:"

# OpenAI-compatible API (api.auth): a fixed-window request counter per key and minute.
API_RATE = NAMESPACE + "api-rate:"

# Telegram bot (bot/): per-user rate buckets, per-chat memory, replies that are still being delivered.
BOT_RATE = NAMESPACE + "bot:rate:"
BOT_HISTORY = NAMESPACE + "bot:history:"
BOT_PENDING = NAMESPACE + "bot:pending"

ALL = (EVENTS_CHANNEL, EVENT_LOG, REPLY, CANCEL, CLAIM, CHAT_WORKERS, GPU_LEASE, GPU_HOLDERS, API_RATE,
       BOT_RATE, BOT_HISTORY, BOT_PENDING)
