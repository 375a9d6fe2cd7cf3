"""Row-resident prefix cache: finished requests' KV rows stay parked with their token ids for reuse.

The decoder's KV cache is one contiguous row of `max_len` positions per request, so the unit of
reuse is a row: a finished request leaves its row parked (token ids whose KV is written + the key
of the weights that computed it). A new request takes the parked row its prompt extends (the
chat's previous turn), or a free row into which the longest matching prefix of any resident row
(parked or running: the persona's system prompt) is copied device to device. Rows past the decode
rows ("spare rows") only store parked KV: an evicted decode row moves there, and a request whose
prefix sits there copies it back into a decode row. Not thread-safe: the engine's loop owns it.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field


@dataclass
class Entry:
    ids: list[int]  # tokens whose KV is in the row, from position 0
    key: Hashable  # the weights that computed it: None = base model, else (adapter, load generation)
    used: int  # logical clock of the last park or reuse (LRU)


@dataclass
class Plan:
    """Where one request runs and what KV it starts from."""

    target: int  # the decode row it runs in
    reuse: int  # prompt tokens whose KV is in `target` once `copies` ran (prefill starts here)
    copies: list[tuple[int, int, int]] = field(default_factory=list)  # (from row, to row, tokens), in order
    source: int | None = None  # the row the reused prefix came from (target itself: in place)
    spill: int | None = None  # the spare row the target's parked KV moves to


def common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """Length of the longest common prefix of a and b, at most `limit` (C-speed slice compares)."""
    high = min(len(a), len(b), limit)
    if high <= 0 or a[0] != b[0]:
        return 0
    if a[:high] == b[:high]:
        return high
    low = 1  # a[:low] == b[:low] holds, a[:high] == b[:high] does not
    while high - low > 1:
        mid = (low + high) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid
    return low


class PrefixPool:
    """Which rows hold parked KV, and the admission plan that reuses it."""

    def __init__(self, decode_rows: int, spare_rows: int = 0, *, enabled: bool = True, max_rows: int = 0) -> None:
        """`max_rows`: most parked rows at once (0 = every row no running request holds)."""
        self.decode_rows, self.spare_rows = decode_rows, spare_rows
        self.enabled = enabled
        self.max_rows = max_rows
        self.entries: dict[int, Entry] = {}
        self._clock = itertools.count(1)

    # --- admission --------------------------------------------------------------------------------
    def plan(self, prompt: list[int], key: Hashable, free: list[int],
             running: Iterable[tuple[int, list[int], int, Hashable]]) -> Plan:
        """Choose a row among `free` (decode rows not running and not taken this round, ascending)
        for `prompt`; `running` gives (row, ids, tokens written, key) of running rows (copy sources)."""
        if not self.enabled:
            return Plan(target=next((r for r in free if r not in self.entries), free[0]), reuse=0)
        limit = len(prompt) - 1  # the last prompt token is always computed: its logits give the first token
        source, best = None, 0
        in_place, in_place_n = None, 0
        free_set = set(free)
        for row, entry in self.entries.items():
            if entry.key != key or (row < self.decode_rows and row not in free_set):
                continue
            n = common_prefix(entry.ids, prompt, limit)
            if n > best:
                source, best = row, n
            if row in free_set and n == len(entry.ids) and n > in_place_n:
                in_place, in_place_n = row, n
        for row, ids, written, row_key in running:
            if row_key == key and (n := common_prefix(ids, prompt, min(limit, written))) > best:
                source, best = row, n
        if in_place is not None and in_place_n == best:
            return Plan(target=in_place, reuse=best, source=in_place)
        target = self._victim(free, keep=source)
        if target == source:
            return Plan(target=target, reuse=best, source=source)
        plan = Plan(target=target, reuse=best, source=source if best else None)
        if target in self.entries and (spill := self._spare_for(self.entries[target], keep=source)) is not None:
            plan.spill = spill
            plan.copies.append((target, spill, len(self.entries[target].ids)))
        if best:
            plan.copies.append((source, target, best))  # type: ignore[arg-type]
        return plan

    def _victim(self, free: list[int], keep: int | None) -> int:
        """An empty free row (lowest first), else the least recently used parked one, `keep` last."""
        for row in free:
            if row not in self.entries:
                return row
        return min(free, key=lambda r: (r == keep, self.entries[r].used))

    def _spare_for(self, evicted: Entry, keep: int | None) -> int | None:
        """A spare row for an evicted decode row's KV: an empty one, else one holding older KV."""
        spares = [r for r in range(self.decode_rows, self.decode_rows + self.spare_rows) if r != keep]
        for row in spares:
            if row not in self.entries:
                return row
        older = [r for r in spares if self.entries[r].used < evicted.used]
        return min(older, key=lambda r: self.entries[r].used) if older else None

    def commit(self, plan: Plan) -> None:
        """The plan's request takes its row: its parked entry leaves (or moves to the spill row)."""
        entry = self.entries.pop(plan.target, None)
        if plan.spill is not None and entry is not None:
            self.entries[plan.spill] = entry
        if plan.source is not None and plan.source in self.entries:
            self.entries[plan.source].used = next(self._clock)

    # --- parking ----------------------------------------------------------------------------------
    def park(self, row: int, ids: list[int], key: Hashable) -> None:
        """A request finished in `row` with KV written for `ids`; keep it (LRU beyond `max_rows`)."""
        if not self.enabled or not ids:
            return
        self.entries[row] = Entry(ids, key, next(self._clock))
        while self.max_rows and len(self.entries) > self.max_rows:
            del self.entries[min(self.entries, key=lambda r: self.entries[r].used)]

    def drop_key(self, key: Hashable) -> None:
        """The weights behind `key` are gone (their slot was rewritten): their KV can never match."""
        for row in [r for r, e in self.entries.items() if e.key == key]:
            del self.entries[row]

    def clear(self) -> None:
        self.entries.clear()

    def capacity(self, row_tokens: int) -> dict[str, int]:
        """KV rows in all, and how many finished chats (and their tokens) the pool keeps at most."""
        rows = self.decode_rows + self.spare_rows
        chats = min(self.max_rows or rows, rows) if self.enabled else 0
        return {"kv_rows": rows, "prefix_chats": chats, "prefix_tokens": chats * (row_tokens - 1)}

    def stats(self) -> dict[str, int]:
        return {"parked_rows": len(self.entries), "parked_tokens": sum(len(e.ids) for e in self.entries.values())}
