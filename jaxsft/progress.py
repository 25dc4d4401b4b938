"""Progress of the long waits: tokenising, the data cache, the Hugging Face export, bin/convert_to_hf.

On an interactive console (stderr is a terminal) a tqdm bar on stderr with the rate and the time
left, gone when the phase ends; in a log (stderr not a terminal) nothing while it runs. Either way
a phase ends with one line saying what it did and how long it took (where the caller has no such
summary line of its own).
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator


def interactive() -> bool:
    """Whether a person watches: stderr (where bars go) is a terminal."""
    return sys.stderr.isatty()


def _nothing(n: int = 1) -> None:
    pass


@contextmanager
def phase(desc: str, *, total: int | None = None, unit: str = "it", unit_scale: bool = False,
          done: Callable[[float], str] | None = None, say=print, show: bool = True) -> Iterator[Callable[[int], None]]:
    """`with phase("tokenising a.parquet", total=rows, unit="row") as advance: ... advance(k)`.

    `done(seconds)`: the line said when the phase ends without an error (None: none). `show`:
    False for a process that reports nothing (not process 0)."""
    bar = None
    if show and interactive():
        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, dynamic_ncols=True, leave=False,
                   file=sys.stderr)
    t0 = time.perf_counter()
    try:
        yield bar.update if bar is not None else _nothing
    finally:
        if bar is not None:
            bar.close()
    if show and done is not None:
        say(done(time.perf_counter() - t0))
