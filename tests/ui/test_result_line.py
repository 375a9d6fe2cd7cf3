"""The playground's line under a reply: an empty reply is named as such, not shown as a blank success."""

from __future__ import annotations

from personabot.core.schemas import ChatResult
from personabot.ui.playground_tab import result_line


def test_an_empty_reply_says_so_and_a_normal_one_gives_its_numbers() -> None:
    empty = result_line(ChatResult(request_id="r", text="  ", finish_reason="stop", adapter_version="v2",
                                   worker="w1"))
    assert "empty reply" in empty and "lower temperature" in empty and "v2" in empty
    normal = result_line(ChatResult(request_id="r", text="I am Ava.", finish_reason="stop", adapter_version="v2",
                                    completion_tokens=4, worker="w1"))
    assert "empty reply" not in normal and "4 tokens" in normal
