"""Row-resident prefix cache: finished requests' KV rows stay parked with their token ids for reuse.

The decoder's KV cache is one contiguous row of `max_len` positions per request, so the unit of
reuse is a row: a finished request leaves its row parked (token ids whose KV is written + the key
of the weights that computed it). A new request always runs in the lowest free decode row (decode
steps run rows [0, bucket), so running rows stay packed as without reuse): the chat's previous
turn is swapped into it, or the longest matching prefix of any resident row (parked or running:
the persona's system prompt) is copied into it, device to device; parked KV that held the row moves
to an empty row or replaces the least recently used parked row. Rows past the decode rows ("spare
rows") only keep parked KV. Not thread-safe: the engine's loop owns it.
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

    target: int  # the decode row it runs in: always the lowest free one, so decode steps stay small
    reuse: int  # prompt tokens whose KV is in `target` once `ops` ran (prefill starts here)
    # ("copy", from row, to row, tokens) or ("swap", row, row, tokens), run in order before the prefill
    ops: list[tuple[str, int, int, int]] = field(default_factory=list)
    source: int | None = None  # the row the reused prefix came from (None: nothing reused)
    updates: dict[int, Entry | None] = field(default_factory=dict)  # parked entries after the ops


def common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """Length of the longest common prefix of a and b, at most `limit`: slice compares (C speed)
    of growing chunks, then one by one inside the first chunk that differs."""
    high = min(len(a), len(b), limit)
    done, step = 0, 16
    while done < high:
        end = min(high, done + step)
        if a[done:end] != b[done:end]:
            while a[done] == b[done]:
                done += 1
            return done
        done, step = end, step * 2
    return high


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
        """Plan `prompt` into the lowest of `free` (decode rows not running and not taken this round,
        ascending); `running` gives (row, ids, tokens written, key) of running rows (copy sources)."""
        target = free[0]
        if not self.enabled:
            return Plan(target=target, reuse=0)
        limit = len(prompt) - 1  # the last prompt token is always computed: its logits give the first token
        source, best, rank = None, 0, (0, False)
        for row, entry in self.entries.items():
            n = common_prefix(entry.ids, prompt, limit) if entry.key == key else 0
            if n and (n, row == target) > rank:
                source, best, rank = row, n, (n, row == target)
        for row, ids, written, row_key in running:
            if row_key == key and (n := common_prefix(ids, prompt, min(limit, written))) > best:
                source, best, rank = row, n, (n, False)
        held = self.entries.get(target)
        plan = Plan(target=target, reuse=best, source=source, updates={target: None})
        if source != target and source in self.entries and best == len(self.entries[source].ids):
            # The chat's own previous turn: swap it into the target row; the target's parked KV
            # (if any) takes the chat's old row.
            plan.ops.append(("swap", source, target, max(best, len(held.ids) if held else 0)))
            plan.updates[source] = held
            return plan
        if held is not None and not (source == target and best == len(held.ids)):
            if (home := self._home_for(held, free, avoid={source, target})) is not None:
                plan.ops.append(("copy", target, home, len(held.ids)))  # before the target is written
                plan.updates[home] = held
        if best and source != target:
            plan.ops.append(("copy", source, target, best))  # type: ignore[arg-type]
        return plan

    def _home_for(self, moved: Entry, free: list[int], avoid: set[int | None]) -> int | None:
        """A row for parked KV that must leave its row: an empty spare row, else the highest empty
        free decode row, else the least recently used parked row if it is older (None: drop it)."""
        spares = range(self.decode_rows, self.decode_rows + self.spare_rows)
        rows = [r for r in (*spares, *reversed(free)) if r not in avoid]
        for row in rows:
            if row not in self.entries:
                return row
        older = [r for r in rows if self.entries[r].used < moved.used]
        return min(older, key=lambda r: self.entries[r].used) if older else None

    def commit(self, plan: Plan) -> None:
        """The plan's request takes its row; parked entries follow the plan's copies and swaps."""
        for row, entry in plan.updates.items():
            if entry is None:
                self.entries.pop(row, None)
            else:
                self.entries[row] = entry
        if plan.source in self.entries and plan.source not in plan.updates:
            self.entries[plan.source].used = next(self._clock)  # a shared prefix stays resident

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
