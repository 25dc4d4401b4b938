"""Packing one step's samples into rows of a fixed capacity, without reordering steps.

grain's FirstFit/BestFit packers work on a stream: a sample may wait in an open bin and come out in
a later batch, so a step would no longer hold exactly its `train_batch_size` samples. Here every
step is packed on its own, which keeps verl's step membership, epochs and LR schedule.
"""

from __future__ import annotations

from typing import Sequence

METHODS = ("first_fit", "best_fit")


def pack(lengths: Sequence[int], capacity: int, method: str) -> list[list[int]]:
    """Rows of positions into `lengths`, each row's total <= capacity, in the order rows were
    opened; within a row, samples keep their order. first_fit: the first open row with room;
    best_fit: the open row with the least room that fits (first such on ties)."""
    if method not in METHODS:
        raise ValueError(f"data.packing={method!r} is not one of none, {', '.join(METHODS)}")
    rows: list[list[int]] = []
    free: list[int] = []
    for i, n in enumerate(lengths):
        if n > capacity:
            raise ValueError(f"a sample of {n} tokens does not fit a row of {capacity}")
        target = -1
        for r, f in enumerate(free):
            if f >= n and (target < 0 or (method == "best_fit" and f < free[target])):
                target = r
                if method == "first_fit":
                    break
        if target < 0:
            rows.append([])
            free.append(capacity)
            target = len(rows) - 1
        rows[target].append(i)
        free[target] -= n
    return rows
