"""The OpenAI-compatible API (`personabot api`): /v1/models, /v1/chat/completions and /metrics behind API keys."""
