"""How one prefill pass's token budget is shared by the prompts still in prefill (chunked prefill)."""

from __future__ import annotations


def fair_shares(needs: list[int], budget: int) -> list[int]:
    """Max-min fair split of `budget` tokens over prompts needing `needs` tokens, oldest first: each
    gets an equal share, a prompt needing less gives what it leaves to the others, and the tokens
    that do not divide evenly go to the oldest. So a prompt needing at most budget / len(needs)
    tokens completes in this pass however long the others are, and the whole budget is used while
    any prompt needs it."""
    if budget < 1:
        raise ValueError(f"the prefill budget is {budget} tokens; it must be at least 1")
    shares = [0] * len(needs)
    left = budget
    open_ = [i for i, need in enumerate(needs) if need > 0]
    while left and open_:
        share = max(1, left // len(open_))
        for i in list(open_):
            take = min(needs[i] - shares[i], share, left)
            shares[i] += take
            left -= take
            if shares[i] == needs[i]:
                open_.remove(i)
            if not left:
                break
    return shares
