"""How one prefill pass's token budget (the chunk) is shared by the prompts still in prefill."""

from __future__ import annotations


def chunk_shares(needs: list[int], budget: int) -> list[int]:
    """Split `budget` prompt tokens over prompts needing `needs` tokens each, in admission order.

    Prompts with at most half the budget left ("short": a follow-up, a first message, the last part
    of a long history) take up to half the budget, oldest first; longer prompts take the rest, oldest
    first; what one class leaves goes to the other. So a short prompt completes in this pass unless
    older short prompts fill their half, however many long histories are in prefill; long histories
    always progress by at least half the budget; and a wave completes in arrival order (max-min fair
    sharing would finish every prompt of an equal wave only at its end)."""
    if budget < 1:
        raise ValueError(f"the prefill budget is {budget} tokens; it must be at least 1")
    half = budget // 2
    short = [i for i, need in enumerate(needs) if 0 < need <= half]
    long = [i for i, need in enumerate(needs) if need > half]
    shares = [0] * len(needs)

    def serve(rows: list[int], limit: int) -> int:
        """Give `rows` what they still need, oldest first, up to `limit` tokens; returns what is given."""
        given = 0
        for i in rows:
            take = min(needs[i] - shares[i], limit - given)
            shares[i] += take
            given += take
        return given

    left = budget - serve(short, half)
    left -= serve(long, left)
    serve(short, left)
    return shares
