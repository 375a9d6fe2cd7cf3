"""The chat worker's engine: the Engine protocol and its types (here), one Qwen2 implementation in the modules.

protocol: the Engine interface, requests, streams, finish reasons. scheduler: HFEngine, the decode
loop with continuous batching. prefix_cache: finished requests' KV kept for reuse. slots /
merge_policy: resident adapters and when one is merged.
qwen2 / layout / fused / graphs / lora_buffers: the forward, its shapes, compiled parts, CUDA graphs
and LoRA buffers. decode_attention / decode_kernels: decode attention over each row's own length
(Triton split-KV on CUDA, torch elsewhere). adapter_files: reading a peft adapter. sampling: per-row token choice.
text: token ids to reply text with stop strings.
"""

from personabot.workers.engine.protocol import (
    ACTIVE,
    FINISH_CANCELLED,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    FINISH_UPDATING,
    AdapterRefusedError,
    Engine,
    EngineError,
    GenerationDone,
    GenerationRequest,
    GenerationStream,
)
from personabot.workers.engine.text import ReplyText

__all__ = [
    "ACTIVE", "FINISH_CANCELLED", "FINISH_ERROR", "FINISH_LENGTH", "FINISH_STOP", "FINISH_UPDATING",
    "AdapterRefusedError", "Engine", "EngineError", "GenerationDone", "GenerationRequest", "GenerationStream",
    "ReplyText",
]
