"""Tokenising the data files slice by slice, in this process or in worker processes.

A file is read in slices (record batches of at most `SLICE_ROWS` rows); each slice is
checked, rendered, tokenised and truncated by `SliceTokenizer`, the same code in this process and
in the workers, and the results are put together in file order. Worker processes are spawned
(`concurrent.futures.ProcessPoolExecutor`; never forked from this process, which may run JAX's
threads); they import only the data layer and the tokenizer, and tokenise with the tokenizer's own
thread pool off, so N workers use N cores.

Any failure of a slice (a bad row, a template error, truncation=error, ...) only means "this
file has a problem": the file is then read and tokenised again the original way, in this
process (`sequential_file`), which raises exactly the error, with exactly the message, that a
build without slices raises (the first problem of the file in that order). The per-file row
warnings are put together from all slices of the file and worded by the same functions.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import sys
import types
from contextlib import contextmanager
from typing import Callable

import numpy as np
import pyarrow as pa

from jaxsft import progress
from jaxsft.data import formats, source
from jaxsft.data.tokenize import CHUNK_ROWS, ChatEncoder, PairEncoder, truncate
from jaxsft.data.whole_chat import WholeChatEncoder

SLICE_ROWS = 4 * CHUNK_ROWS  # rows per slice at most: a few chunks, so a slice's Python objects stay small
# The multi-turn encoder's counters behind the build's warnings, summed over slices.
COUNTERS = ("mismatched_rows", "reasoning_dropped_rows", "unprompted_turns", "untrained_tokens")
PARALLEL_MIN_ROWS = 8192  # fewer rows tokenise faster here than worker processes start (import transformers)


@dataclasses.dataclass
class SliceResult:
    """One slice's samples back to back (after truncation) and what the warnings need."""
    ids: np.ndarray  # int32, all samples of the slice concatenated
    mask: np.ndarray  # int8
    lengths: np.ndarray  # int64 per sample (after truncation)
    raw_lengths: np.ndarray  # int64 per sample, before truncation
    raw_loss_tokens: np.ndarray  # int64 per sample, before truncation
    silent: list[int]  # file rows without an assistant turn
    opted_out: int  # assistant messages with verl's old loss_mask=0
    mismatched_rows: int = 0
    reasoning_dropped_rows: int = 0
    unprompted_turns: int = 0
    untrained_tokens: int = 0
    unprompted_example: tuple[str, int] | None = None
    pid: int = 0  # the process that tokenised it


def make_encoder(tokenizer, data):
    kwargs = dict(data.apply_chat_template_kwargs)
    if data.multiturn:
        encoder = WholeChatEncoder if data.mask_mode == "whole_chat" else ChatEncoder
        return encoder(tokenizer, kwargs, enable_thinking_default=data.enable_thinking_default,
                       ignore_mismatch=data.ignore_input_ids_mismatch)
    return PairEncoder(tokenizer, kwargs)


def columns(data) -> tuple[dict[str, str], tuple[str, ...]]:
    if data.multiturn:
        return source.chat_columns(data.messages_key, data.tools_key, data.enable_thinking_key)
    return source.pair_columns(data.prompt_key, data.response_key)


class SliceTokenizer:
    """Rows of one slice → `SliceResult`, with the data settings `data` (`DataSettings`)."""

    def __init__(self, tokenizer, data, encoder=None):
        self.data = data
        self.encoder = encoder if encoder is not None else make_encoder(tokenizer, data)

    def __call__(self, path: str, table: pa.Table, first_row: int) -> SliceResult:
        d, enc = self.data, self.encoder
        silent, opted_out = [], 0
        if d.multiturn:
            rows, silent, opted_out = source.chats_from_table(path, table, messages_key=d.messages_key,
                                                              tools_key=d.tools_key,
                                                              enable_thinking_key=d.enable_thinking_key)
            before = [getattr(enc, k) for k in COUNTERS]
            enc.unprompted_example = None
        else:
            rows = source.pairs_from_table(path, table, prompt_key=d.prompt_key, response_key=d.response_key,
                                           prompt_dict_keys=d.prompt_dict_keys, response_dict_keys=d.response_dict_keys)
        encoded = enc.encode(rows, path, first_row)
        n = len(encoded)
        raw_lengths, raw_loss, lengths = (np.empty(n, np.int64) for _ in range(3))
        ids, masks = [], []
        for r, (i, m) in enumerate(encoded):
            raw_lengths[r], raw_loss[r] = len(i), int(m[1:].sum())
            i, m = truncate(i, m, d.max_length, d.truncation, path, first_row + r)
            if len(i) != len(m):
                raise AssertionError(f"{path} row {first_row + r}: {len(i)} tokens but {len(m)} loss-mask entries "
                                     f"(a bug in jaxsft's tokenisation, not in the data)")
            ids.append(i)
            masks.append(m)
            lengths[r] = len(i)
        result = SliceResult(np.concatenate(ids).astype(np.int32, copy=False) if ids else np.zeros(0, np.int32),
                             np.concatenate(masks).astype(np.int8, copy=False) if masks else np.zeros(0, np.int8),
                             lengths, raw_lengths, raw_loss, [first_row + i for i in silent], opted_out, pid=os.getpid())
        if d.multiturn:
            for k, b in zip(COUNTERS, before):
                setattr(result, k, getattr(enc, k) - b)
            result.unprompted_example = enc.unprompted_example
        return result


def sequential_file(path: str, data, encoder, limit: int | None) -> None:
    """One file read and tokenised whole, as a build without slices does: raises its first problem."""
    if data.multiturn:
        rows = source.read_chats(path, messages_key=data.messages_key, tools_key=data.tools_key,
                                 enable_thinking_key=data.enable_thinking_key, limit=limit)
    else:
        rows = source.read_pairs(path, prompt_key=data.prompt_key, response_key=data.response_key,
                                 prompt_dict_keys=data.prompt_dict_keys, response_dict_keys=data.response_dict_keys,
                                 limit=limit)
    for r, (ids, mask) in enumerate(encoder.encode(rows, path)):
        truncate(ids, mask, data.max_length, data.truncation, path, r)


# ---- worker processes ---------------------------------------------------------------------------

_worker: SliceTokenizer | None = None


def _init_worker(tokenizer_bytes: bytes, data) -> None:
    global _worker
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops the pool
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker
    _worker = SliceTokenizer(pickle.loads(tokenizer_bytes), data)


def _run_slice(path: str, batch_bytes: bytes, first_row: int) -> SliceResult:
    with pa.ipc.open_stream(batch_bytes) as reader:
        table = reader.read_all()
    return _worker(path, table, first_row)


def _batch_bytes(batch: pa.RecordBatch) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue()


@contextmanager
def _bare_main():
    """Workers are spawned (never forked from a process that may run JAX's threads), and a spawned
    process re-imports its parent's __main__ module: a script without a main guard would start
    tokenising again in every worker, and `python -m jaxsft.train` would import JAX into each.
    The workers need nothing from it, so while they start, __main__ is an empty module."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def worker_count(setting: int) -> int:
    """data.tokenize_workers: 0 = one per core this process may use."""
    return setting if setting > 0 else len(os.sched_getaffinity(0))


class Workers:
    """Runs slices here, or in a pool of `count` tokenising processes started on first need."""

    def __init__(self, tokenizer, data, count: int, local: SliceTokenizer, show: bool = True):
        self.tokenizer, self.data, self.count, self.local, self.show = tokenizer, data, count, local, show
        self._pool = None

    def _start(self):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        return ProcessPoolExecutor(self.count, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                                   initargs=(pickle.dumps(self.tokenizer), self.data))

    def _submit(self, *args):
        with _bare_main():  # a submit may start a worker process
            return self._pool.submit(*args)

    def map(self, path: str, slices, rows: int):
        """(first row, result) of each of `slices` ((record batch, first row) pairs), in order:
        here when the file has fewer than PARALLEL_MIN_ROWS `rows`, else in the pool; with a
        progress bar on an interactive console (jaxsft.progress)."""
        with progress.phase(f"tokenising {os.path.basename(path.rstrip('/'))}", total=rows, unit="row",
                            unit_scale=True, show=self.show) as advance:
            for first_row, result in self._map(path, slices, rows):
                advance(len(result.lengths))
                yield first_row, result

    def _map(self, path: str, slices, rows: int):
        if self.count < 2 or rows < PARALLEL_MIN_ROWS:
            for batch, first_row in slices:
                yield first_row, self.local(path, pa.Table.from_batches([batch]), first_row)
            return
        self._pool = self._pool or self._start()
        pending = collections.deque()
        for batch, first_row in slices:
            pending.append((first_row, self._submit(_run_slice, path, _batch_bytes(batch), first_row)))
            if len(pending) >= 2 * self.count:  # bounded: the file is never all in flight
                first, future = pending.popleft()
                yield first, future.result()
        while pending:
            first, future = pending.popleft()
            yield first, future.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def slice_rows(rows: int, workers: int) -> int:
    """Rows per slice: about 8 slices per worker (so none waits long for the last), whole chunks."""
    if workers < 2:
        return SLICE_ROWS
    per = -(-rows // (8 * workers))
    return min(SLICE_ROWS, max(CHUNK_ROWS, -(-per // CHUNK_ROWS) * CHUNK_ROWS))


def _file_results(path: str, data, limit: int | None, workers: Workers):
    """(first row, result) of each slice of the file's first `limit` rows (all if None)."""
    # A parquet file is streamed a page at a time (buffer_size), not a whole column chunk of a row group in memory.
    src = formats.open_source(path, *columns(data), buffer_size=1 << 20, pre_buffer=False)
    n = src.num_rows if limit is None else min(limit, src.num_rows)
    done = 0
    size = slice_rows(n, workers.count if n >= PARALLEL_MIN_ROWS else 1)
    for first_row, result in workers.map(path, src.batches(n, size), n):
        done += len(result.lengths)
        yield first_row, result
    if done != n:
        raise AssertionError(f"{path}: {done} rows tokenised of {n}")


def tokenize_files(paths: list[str], data, tokenizer, encoder, *, limit: int | None, workers: int,
                   add: Callable[[int, int, SliceResult], None], warn: Callable[[str], None], show: bool = True) -> dict:
    """Tokenise `paths` in order into `add(file_index, first_row, result)`; the row warnings go to
    `warn` as each file is done. Returns the rows per file and the encoder's counters. `workers`
    processes tokenise a file of at least PARALLEL_MIN_ROWS rows; smaller files are done here.
    `show`: progress bars on an interactive console (process 0)."""
    file_rows = [0] * len(paths)
    counters = {**{k: 0 for k in COUNTERS}, "unprompted_example": None}
    pids = set()
    pool = Workers(tokenizer, data, workers, SliceTokenizer(tokenizer, data, encoder), show=show)
    try:
        for f, path in enumerate(paths):
            if limit == 0:
                break
            results = _file_results(path, data, limit, pool)
            silent, opted_out = [], 0
            while True:
                try:
                    first_row, result = next(results)
                except StopIteration:
                    break
                except AssertionError:
                    raise  # jaxsft's own checks: a bug, with its traceback
                except Exception as e:
                    pool.close()
                    sequential_file(path, data, encoder, limit)  # raises the file's first problem, worded as ever
                    raise AssertionError(f"{path}: tokenising in slices failed ({type(e).__name__}: {e}) but the "
                                         f"whole file tokenises: a bug in jaxsft") from e
                add(f, first_row, result)
                file_rows[f] += len(result.lengths)
                silent += result.silent
                opted_out += result.opted_out
                for k in COUNTERS:
                    counters[k] += getattr(result, k)
                counters["unprompted_example"] = counters["unprompted_example"] or result.unprompted_example
                pids.add(result.pid)
            for message in (source.row_warnings(path, silent, opted_out) if data.multiturn else ()):
                warn(message)
            if limit is not None:
                limit -= file_rows[f]
    finally:
        pool.close()
    return {"file_rows": file_rows, "processes": len(pids), **counters}
