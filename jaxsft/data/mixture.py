"""Weighted mixing of the training files (`data.train_weights`), as a pure function of the epoch.

An epoch has as many samples as its steps take: `steps_per_epoch × train_batch_size`, with
`steps_per_epoch = floor(N / train_batch_size)` over all N rows — the step count, and so the
learning-rate schedule, of the same files concatenated. Source i contributes
`quota_i = round(used × w_i / Σw)` of them (largest remainders, so the quotas add up exactly).

Each source is read as an endless stream of its own shuffles (cycle c of source i is a
permutation of its rows seeded by (seed, i, c)); epoch e takes positions `[e·quota_i,
(e+1)·quota_i)` of that stream. So a source weighted below its size is down-sampled without
repeats until all its rows were seen (a different part each epoch; the epoch that reaches the end
of a shuffle continues with the next, and may hold a row twice), and one weighted above its size
is repeated evenly (each shuffle is used whole before the next, so up to any step every row of it
was drawn k or k+1 times). The epoch's samples of all sources are then
shuffled together (seeded by (seed, e)) and the steps take them in that order.

Nothing here depends on the position of an iterator: step s of the run holds the same samples in
every launch, so resuming needs only the step index (also across an epoch boundary).
"""

from __future__ import annotations

import collections
import functools
import re
from pathlib import PurePath

import numpy as np

_TAG = 0x6D6978  # "mix": keeps these seeds apart from the unweighted order's [seed, epoch]


def quotas(sizes: tuple[int, ...], weights: tuple[float, ...], total: int) -> np.ndarray:
    """Samples per source in an epoch of `total` samples, in proportion to `weights`."""
    w = np.asarray(weights, np.float64)
    exact = total * w / w.sum()
    out = np.floor(exact).astype(np.int64)
    rest = total - int(out.sum())
    out[np.argsort(-(exact - out), kind="stable")[:rest]] += 1
    return out


def _stream(n: int, seed: int, source: int, start: int, count: int) -> np.ndarray:
    """Positions [start, start + count) of source `source`'s endless sequence of shuffles of range(n)."""
    out, at = [], start
    while at < start + count:
        cycle, offset = divmod(at, n)
        take = min(n - offset, start + count - at)
        out.append(np.random.default_rng([seed, _TAG, source, cycle]).permutation(n)[offset:offset + take])
        at += take
    return np.concatenate(out) if out else np.zeros(0, np.int64)


@functools.lru_cache(maxsize=4)
def epoch_order(sizes: tuple[int, ...], weights: tuple[float, ...], seed: int, epoch: int, total: int) -> np.ndarray:
    """Data-set indices (the sources back to back, in `sizes` order) of the `total` samples of epoch
    `epoch`, in the order the steps take them."""
    q = quotas(sizes, weights, total)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    parts = [starts[i] + _stream(n, seed, i, epoch * int(q[i]), int(q[i])) for i, n in enumerate(sizes) if q[i]]
    mixed = np.concatenate(parts)
    return mixed[np.random.default_rng([seed, _TAG, epoch]).permutation(total)]


_GLOB = re.compile(r"[*?\[]")


def source_names(files) -> list[str]:
    """The name of each training file entry in the per-source metrics (`train/loss/NAME`): its last
    path part without the extension (`data/math.parquet` → `math`); for a glob, the last part
    without glob characters (`data/math/*.parquet` → `math`); other characters than letters,
    digits, `_`, `-` and `.` become `_`. Names that two entries share get the entry's position in
    data.train_files (1-based): `a/train.parquet`, `b/train.parquet` → `train_1`, `train_2`."""
    names = []
    for entry in files:
        parts = [p for p in PurePath(str(entry)).parts if p not in ("/", ".", "..") and not _GLOB.search(p)]
        last = str(entry).rstrip("/").split("/")[-1]
        name = PurePath(parts[-1]).stem if parts and parts[-1] == last else (parts[-1] if parts else "")
        names.append(re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "source")
    counts = collections.Counter(names)
    return [f"{n}_{i + 1}" if counts[n] > 1 else n for i, n in enumerate(names)]
