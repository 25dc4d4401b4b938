"""Tokenising in slices and in worker processes (issue 14) builds exactly what one whole-file pass
builds — ids, masks, origins, statistics and every warning — and a bad row stops the build with
the very message (and the same first problem of the file) as before."""

import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cfg import settings

from jaxsft import bundled
from jaxsft.data import DataError, DataWarning, build_dataset, source, workers
from jaxsft.hf import load_tokenizer
from jaxsft.data.tokenize import truncate


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(bundled.path("tokenizer"))


def data_cfg(**overrides):
    keys = {"data.multiturn.enable": True, "data.max_length": 300, "data.truncation": "right"}
    return settings({**keys, **{f"data.{k}": v for k, v in overrides.items()}}).data


def user(text):
    return {"role": "user", "content": text}


def assistant(text, **extra):
    return {"role": "assistant", "content": text, **extra}


def chats_file(tmp_path, name, n, seed):
    """n varied chats (1-3 turns, some over max_length), every 97th without an answer, every 89th
    with verl's old loss_mask=0."""
    rng = np.random.default_rng(seed)
    chats = []
    for i in range(n):
        chat = []
        for t in range(int(rng.integers(1, 4))):
            chat += [user(f"{name} row {i} turn {t}: " + "word " * int(rng.integers(1, 90))),
                     assistant("answer " * int(rng.integers(1, 60)), **({"loss_mask": 0} if i % 89 == 3 else {}))]
        if i % 97 == 5:
            chat = chat[:1]
        chats.append(chat)
    path = tmp_path / name
    pq.write_table(pa.table({"messages": chats}), path, row_group_size=300)
    return str(path)


def whole_file_reference(paths, data, tok, limit):
    """What the build did before slices: each file read and tokenised whole (source.read_chats,
    ChatEncoder.encode on every row, truncate)."""
    encoder = workers.make_encoder(tok, data)
    ids, masks, origins = [], [], []
    for path in paths:
        if limit == 0:
            break
        rows = source.read_chats(path, messages_key="messages", tools_key="tools", enable_thinking_key="enable_thinking",
                                 limit=limit)
        for r, (i, m) in enumerate(encoder.encode(rows, path)):
            i, m = truncate(i, m, data.max_length, data.truncation, path, r)
            ids.append(i)
            masks.append(m)
            origins.append((path, r))
        limit = None if limit is None else limit - len(rows)
    return np.concatenate(ids), np.concatenate(masks), origins


def build(paths, data, tok, n_workers):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = build_dataset(paths, data, tok, verbose=False, workers=n_workers)
    return ds, [str(w.message) for w in caught if issubclass(w.category, DataWarning)]


@pytest.mark.slow  # over ~5 s on 2 cores: CI's full run, not the ≤ 3-minute inner loop
def test_worker_processes_build_what_one_whole_file_pass_builds(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(workers, "PARALLEL_MIN_ROWS", 600)  # small files, still two slices each
    paths = [chats_file(tmp_path, "a.parquet", 800, 0), chats_file(tmp_path, "b.parquet", 150, 1),
             chats_file(tmp_path, "c.parquet", 900, 2)]
    data = data_cfg(train_max_samples=1600)  # c.parquet is cut after 650 rows
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids, masks, origins = whole_file_reference(paths, data, tok, 1600)
    expected_warnings = [str(w.message) for w in caught]
    assert len(expected_warnings) == 6  # per file: rows without an answer, loss_mask=0

    here, here_warnings = build(paths, data, tok, 1)
    pool, pool_warnings = build(paths, data, tok, 2)
    # a.parquet and the 650 rows of c.parquet in the workers, b.parquet here
    assert here.stats["processes"] == 1 and pool.stats["processes"] >= 2
    for ds in (here, pool):
        assert np.array_equal(ds.input_ids, ids) and np.array_equal(ds.loss_mask, masks)
        assert list(ds.origins) == origins and ds.stats["file_rows"] == [800, 150, 650]
    assert pool.fingerprint == here.fingerprint
    assert pool_warnings == here_warnings
    assert pool_warnings[:6] == expected_warnings and len(pool_warnings) == 6


@pytest.mark.slow  # over ~5 s on 2 cores: CI's full run, not the ≤ 3-minute inner loop
def test_a_bad_file_stops_the_build_with_its_first_problem(tok, tmp_path, monkeypatch):
    """A file whose slice 0 fails first in time (row 40 over max_length with truncation=error) but
    whose first problem in file order is a check of row 650 (slice 1) (every row is checked before any is
    tokenised): the message is row 650's, in one process or with workers, and the warnings of
    the good file before it were given."""
    monkeypatch.setattr(workers, "PARALLEL_MIN_ROWS", 600)
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"messages": [[user(f"q{i}")] + [assistant(f"a{i}")] * (i != 7) for i in range(30)]}), good)
    chats = [[user(f"q{i}"), assistant(f"a{i}")] for i in range(700)]
    chats[40] = [user("long " * 400), assistant("x")]  # > 256 tokens
    chats[650] = [{"role": "robot", "content": "beep"}, assistant("x")]
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"messages": chats}), bad)
    message = rf"^{bad} row 650: message 0 has unknown role 'robot' \(expected system, user, assistant or tool\)$"
    for n_workers in (1, 2):
        with pytest.warns(DataWarning, match=rf"^{good}: 1 row\(s\) have no assistant turn and train nothing: rows 7$"):
            with pytest.raises(DataError, match=message):
                build_dataset([str(good), str(bad)], data_cfg(truncation="error", max_length=256), tok, verbose=False,
                              workers=n_workers)
    # Without the bad role, row 40 is the file's first problem.
    chats[650] = [user("fine"), assistant("x")]
    pq.write_table(pa.table({"messages": chats}), bad)
    with pytest.raises(DataError, match=rf"^{bad} row 40: \d+ tokens exceed data.max_length=256 \(data.truncation=error"):
        build_dataset(str(bad), data_cfg(truncation="error", max_length=256), tok, verbose=False, workers=2)


def test_slices_are_whole_chunks_and_balance_the_workers():
    assert workers.slice_rows(200_000, 1) == workers.SLICE_ROWS
    assert workers.slice_rows(200_000, 2) == workers.SLICE_ROWS
    assert workers.slice_rows(10_000, 2) == 1024  # 625 rows per 1/16 → two chunks
    assert workers.slice_rows(100, 4) == workers.CHUNK_ROWS
