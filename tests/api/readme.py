"""The README's openai-client example, read from the README itself (so the test runs what users copy)."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
MARKER = "<!-- api-example -->"


def readme_example() -> str:
    """The python block right after the marker in README.md."""
    text = README.read_text(encoding="utf-8").split(MARKER, 1)[1]
    return text.split("```python\n", 1)[1].split("```", 1)[0]
