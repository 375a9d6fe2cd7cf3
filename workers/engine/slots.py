"""The engine's resident adapter slots: which version each holds, its users, its last use, a copy under way."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

_LOADS = itertools.count(1)


@dataclass
class _Slot:
    name: str | None = None
    refs: int = 0  # requests waiting or running on this slot
    used: float = 0.0  # time.monotonic() of the last load or submit
    busy: bool = False  # an adapter is being copied in
    load: int = 0  # which load put the current weights here (KV computed under them is keyed by it)


class AdapterSlots:
    """A small LRU over the decoder's LoRA slots. Not thread-safe: the engine holds its lock around it."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._slots = [_Slot() for _ in range(count)]

    def __contains__(self, name: object) -> bool:
        return any(slot.name == name for slot in self._slots)

    def index(self, name: str) -> int:
        """The slot that holds `name` (ValueError if none does)."""
        return [slot.name for slot in self._slots].index(name)

    def free(self, active: str | None) -> list[int]:
        """Slots no request uses, no copy fills, and that do not hold the active adapter."""
        return [i for i, slot in enumerate(self._slots)
                if slot.refs == 0 and not slot.busy and (slot.name is None or slot.name != active)]

    def claim_for_write(self, free: list[int]) -> int:
        """Pick an empty slot, else the least recently used one, and mark it as being filled."""
        index = min(free, key=lambda i: (self._slots[i].name is not None, self._slots[i].used))
        self._slots[index].name = None
        self._slots[index].busy = True
        return index

    def end_write(self, index: int, name: str | None) -> None:
        """The copy into `index` ended: it now holds `name` (None: the copy failed, the slot stays empty)."""
        slot = self._slots[index]
        slot.busy = False
        if name is not None:
            slot.name = name
            slot.used = time.monotonic()
            slot.load = next(_LOADS)

    def key(self, index: int | None) -> tuple[str, int] | None:
        """The identity of the weights in a slot (None = the base model): the same name loaded
        again from other files gets another key, so KV computed under the old weights never matches."""
        if index is None:
            return None
        slot = self._slots[index]
        return (slot.name or "", slot.load)

    def acquire(self, name: str) -> int:
        """One more request runs on `name`'s slot; returns the slot."""
        index = self.index(name)
        self._slots[index].refs += 1
        self._slots[index].used = time.monotonic()
        return index

    def release(self, index: int | None) -> None:
        if index is not None:
            self._slots[index].refs -= 1

    def forget_all(self) -> None:
        """The model was unloaded: no slot holds an adapter any more."""
        for slot in self._slots:
            slot.name = None
