"""Every kind of entry data.train_files takes (issue 28): the bundled chats as JSON lines, a JSON
array, a datasets save_to_disk directory, and 3 parquet shards in a directory and by a glob
tokenise to exactly the rows of the parquet file, each row named by its shard and row (a JSON-lines
row by its line); mixing weights stay per entry; the data cache notices a changed shard; a
malformed line, an empty glob or directory and a directory of other files are one line each.
(The same rows train to the same losses: tests/test_resume.py.)"""

import re
import warnings

import data_kinds
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cfg import chat_data

from jaxsft import bundled
from jaxsft.data import DataError, DataWarning, TrainLoader, build_dataset
from jaxsft.hf import load_tokenizer

TRAIN = str(bundled.path("humaneval_chat", "train.parquet"))


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(bundled.path("tokenizer"))


data_cfg = chat_data  # tests/cfg.py


@pytest.fixture(scope="module")
def table():
    return pq.read_table(TRAIN)


@pytest.fixture(scope="module")
def parquet_set(tok):
    return build_dataset(TRAIN, data_cfg(), tok, verbose=False)


@pytest.fixture(scope="module")
def kinds(table, tmp_path_factory):
    """kind -> (entry, its shards, the first row of each shard)."""
    d = tmp_path_factory.mktemp("kinds")
    lines = data_kinds.jsonl(table, d / "train.jsonl", blank_after=9)
    array = data_kinds.json_array(table, d / "train.json")
    saved, arrows = data_kinds.save_to_disk(table, d / "saved", 3)
    shards = data_kinds.parquet_shards(table, d / "shards", 3)
    return {"jsonl": (lines, [lines], [0]), "json array": (array, [array], [0]), "save_to_disk": (saved, arrows, [0, 50, 100]),
            "parquet directory": (str(d / "shards"), shards, [0, 50, 100]),
            "parquet glob": (str(d / "shards" / "part-*.parquet"), shards, [0, 50, 100])}


@pytest.mark.parametrize("kind", ["jsonl", "json array", "save_to_disk", "parquet directory", "parquet glob"])
def test_every_kind_tokenises_to_the_rows_of_the_parquet_file(tok, kinds, parquet_set, kind):
    entry, shards, starts = kinds[kind]
    ds = build_dataset(entry, data_cfg(), tok, verbose=False)
    for name in ("input_ids", "loss_mask", "offsets", "loss_tokens"):
        assert np.array_equal(getattr(ds, name), getattr(parquet_set, name)), name
    assert ds.fingerprint == parquet_set.fingerprint  # what a checkpoint records: a resume accepts either
    assert ds.stats["files"] == shards and ds.sources() == [(entry, 150)]
    # Each row is named by its shard and its row there.
    shard_of = [max(k for k, first in enumerate(starts) if first <= i) for i in range(150)]
    assert list(ds.origins) == [(shards[k], i - starts[k]) for i, k in enumerate(shard_of)]


def test_entries_of_three_kinds_are_weighed_per_entry(tok, table, parquet_set, tmp_path):
    entries, sizes = data_kinds.mixed_entries(table, tmp_path)
    ds = build_dataset(entries, data_cfg(), tok, verbose=False)
    assert ds.fingerprint == parquet_set.fingerprint and len(ds.stats["files"]) == 1 + 2 + 3
    assert ds.sources() == list(zip(entries, sizes))
    loader = TrainLoader(ds, train_batch_size=8, micro_batch_size_per_gpu=1, dp=8, max_length=512, weights=(1, 1, 2),
                         verbose=False)
    assert [(e, n, k) for e, n, k, _ in loader.source_counts(0)] == [(entries[0], 8, 36), (entries[1], 8, 36),
                                                                      (entries[2], 134, 72)]


def test_the_cache_notices_a_changed_shard(tok, table, tmp_path):
    shards = data_kinds.parquet_shards(table.slice(0, 24), tmp_path / "shards", 3)
    cache = tmp_path / "cache"

    def build():
        return build_dataset(str(tmp_path / "shards"), data_cfg(), tok, verbose=False, cache_dir=cache)

    first = build()
    assert (first.stats["cache"]["hit"], build().stats["cache"]["hit"]) == (False, True)
    pq.write_table(table.slice(8, 8).take(list(range(7, -1, -1))), shards[1])  # the middle shard's rows reversed
    changed = build()
    assert changed.stats["cache"]["hit"] is False and changed.fingerprint != first.fingerprint
    assert changed.origins[8] == (shards[1], 0) and np.array_equal(changed.tokens(8)[0], first.tokens(15)[0])


def refused(tok, entry, pattern, split="train"):
    with pytest.raises(DataError, match=pattern) as info:
        build_dataset(entry, data_cfg(), tok, verbose=False, split=split)
    assert "\n" not in str(info.value)


OK = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


def test_a_bad_line_is_one_error_naming_file_and_line(tok, tmp_path):
    path = tmp_path / "bad.jsonl"

    def lines(*texts):
        path.write_text("\n".join(texts) + "\n")
        return str(path)

    ok = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'
    refused(tok, lines(ok, "", ok, '{"messages": [{"role": "user"'), rf"^{path} line 4: not valid JSON \(Expecting "
                                                                    r".* at column \d+\); each line must hold one JSON object \(a row\)$")
    refused(tok, lines(ok, "[1, 2]"), rf"^{path} line 2: a JSON list, not an object; each line must hold one JSON object")
    # Rows are named by their line (blank lines are skipped, so row 2 is line 4), in errors and warnings.
    refused(tok, lines(ok, "", ok, ok.replace('"user"', '"bot"')), rf"^{path} line 4: message 0 has unknown role 'bot'")
    refused(tok, lines(ok.replace("}]}", '}], "enable_thinking": true}'), "", ok.replace("}]}", '}], "enable_thinking": "no"}')),
            rf"^{path} line 3: cannot be read as a row of the table \(JSON parse error: Column\(/enable_thinking\) "
            r"changed from boolean to string\)$")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_dataset(lines(ok, "", '{"messages": [{"role": "user", "content": "q"}]}', ok), data_cfg(), tok, verbose=False)
    assert f"{path}: 1 row(s) have no assistant turn and train nothing: lines 3" in [
        str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    # A JSON array names its items by index.
    array = tmp_path / "bad.json"
    array.write_text('[{"messages": []},\n 3]')
    refused(tok, str(array), rf"^{array} row 1: is a JSON int, not an object \(a row\)$")
    array.write_text('[{"messages": []},\n {"messages": ]')
    refused(tok, str(array), rf"^{array} line 2: not valid JSON \(Expecting value at column 15\)$")


def test_entries_that_name_no_data_are_one_line(tok, tmp_path):
    none = str(tmp_path / "nothing-*.parquet")
    refused(tok, none, rf"^data.train_files entry '{re.escape(none)}' matches no data file$")
    refused(tok, [TRAIN, none], rf"^data.val_files entry '{re.escape(none)}' matches no data file$", split="val")
    (tmp_path / "empty").mkdir()
    refused(tok, str(tmp_path / "empty"), rf"^data.train_files entry '{tmp_path / 'empty'}' is a directory without data "
                                          r"files \(.parquet, .jsonl, .json\)$")
    mixed = tmp_path / "mixed"
    data_kinds.parquet_shards(pa.table({"messages": [OK["messages"]] * 2}), mixed, 2)
    (mixed / "README.md").write_text("about")
    pattern = (rf"^data.train_files entry '{mixed}' holds 1 file\(s\) that are not data files \(README.md\): data files "
               rf"end in .parquet, .jsonl or .json; move the others away or name the data files with a glob \(e.g. "
               rf"{mixed}/\*.parquet\)$")
    refused(tok, str(mixed), pattern)
    refused(tok, str(mixed / "*"), pattern.replace(f"'{mixed}'", f"'{mixed}/\\*'"))
    splits = tmp_path / "splits"
    for split in ("train", "test"):
        data_kinds.save_to_disk(pa.table({"messages": [OK["messages"]]}), splits / split, 1)
    (splits / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    refused(tok, str(splits), rf"^data.train_files entry '{splits}' is a datasets DatasetDict \(splits: test, train\): "
                              rf"name one split's directory, e.g. {splits}/test$")
