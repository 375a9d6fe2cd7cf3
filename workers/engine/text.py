"""From generated token ids to reply text: incremental detokenizing that holds back partial stop strings."""

from __future__ import annotations

from collections.abc import Callable


class ReplyText:
    """Turns token batches into text deltas; cuts the text at the first stop string.

    A delta never ends in a half-decoded character (U+FFFD) nor in text that may still become a
    stop string, so nothing sent has to be taken back.
    """

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str]) -> None:
        self._decode = decode
        self._stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.sent = ""
        self.stopped_at: int | None = None

    @property
    def stopped(self) -> bool:
        """A stop string was found; later tokens are ignored."""
        return self.stopped_at is not None

    def feed(self, tokens: list[int]) -> str:
        """Take new tokens; returns the text that may go out now ("" if none)."""
        if not tokens or self.stopped:
            return ""
        self.ids.extend(tokens)
        text = self._decode(self.ids)
        for stop in self._stops:
            index = text.find(stop, max(0, len(self.sent) - len(stop)))
            if index >= 0 and (self.stopped_at is None or index < self.stopped_at):
                self.stopped_at = index
        if self.stopped_at is not None:
            text = text[:self.stopped_at]
        self.text = text
        ready = text if self.stopped else text[:len(text) - self._hold] if self._hold else text
        if ready.endswith("\ufffd"):
            ready = ready.rstrip("\ufffd")
        if len(ready) > len(self.sent) and ready.startswith(self.sent):
            delta, self.sent = ready[len(self.sent):], ready
            return delta
        return ""

    def finish(self) -> str:
        """The generation ended: the final text (decoded once more, whole) and what is still unsent of it."""
        if not self.stopped and self.ids:
            self.text = self._decode(self.ids)
        if self.text.startswith(self.sent) and len(self.text) > len(self.sent):
            return self.text[len(self.sent):]
        return ""
