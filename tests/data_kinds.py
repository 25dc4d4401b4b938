"""One Arrow table written as each kind of data `data.train_files` takes: JSON lines, a JSON array,
a datasets `save_to_disk` directory, parquet shards in a directory (issue 28).

The save_to_disk directory is written here with pyarrow, laid out as datasets 4 writes it
(`Dataset.save_to_disk`: contiguous shards `data-0000i-of-0000n.arrow`, each an Arrow IPC stream
in batches of 1000 rows with the features in the schema metadata, then `state.json` listing them
and `dataset_info.json`): `datasets` itself (pandas, dill, multiprocess, aiohttp, ...) is not a
test dependency.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def rows(table: pa.Table) -> list[dict]:
    return table.to_pylist()


def jsonl(table: pa.Table, path: Path, blank_after: int | None = None) -> str:
    """One object per line; a blank line after row `blank_after` (readers skip it)."""
    lines = [json.dumps(r, ensure_ascii=False) for r in rows(table)]
    if blank_after is not None:
        lines.insert(blank_after + 1, "")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def json_array(table: pa.Table, path: Path) -> str:
    path.write_text(json.dumps(rows(table), ensure_ascii=False, indent=1), encoding="utf-8")
    return str(path)


def _features(t: pa.DataType):
    """datasets' features JSON of an Arrow type (strings, lists and structs: what chat data uses)."""
    if pa.types.is_struct(t):
        return {f.name: _features(f.type) for f in t}
    if pa.types.is_list(t):
        return {"feature": _features(t.value_type), "_type": "List"}
    return {"dtype": "string" if pa.types.is_string(t) else str(t), "_type": "Value"}


def save_to_disk(table: pa.Table, folder: Path, shards: int) -> tuple[str, list[str]]:
    """(the directory, its arrow files in order)."""
    folder.mkdir(parents=True)
    features = {f.name: _features(f.type) for f in table.schema}
    schema = table.schema.with_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    names, size, extra = [], *divmod(table.num_rows, shards)
    for i in range(shards):  # Dataset.shard(contiguous=True): the first `extra` shards hold one more row
        start = size * i + min(i, extra)
        part = table.slice(start, size + (i < extra)).cast(schema)
        names.append(f"data-{i:05d}-of-{shards:05d}.arrow")
        with pa.OSFile(str(folder / names[-1]), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for batch in part.to_batches(max_chunksize=1000):
                writer.write_batch(batch)
    state = {"_data_files": [{"filename": n} for n in names], "_fingerprint": "5e1f0c2a9d3b4c6e",
             "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
             "_split": None}
    (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    info = {"builder_name": None, "citation": "", "config_name": None, "dataset_name": None, "dataset_size": None,
            "description": "", "download_checksums": None, "download_size": None, "features": features,
            "homepage": "", "license": "", "size_in_bytes": None, "splits": None, "supervised_keys": None,
            "version": None}
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=2))
    return str(folder), [str(folder / n) for n in names]


def parquet_shards(table: pa.Table, folder: Path, shards: int) -> list[str]:
    """`part-0000i.parquet` files with the markers a Spark job leaves (`_SUCCESS`, `.crc` files)."""
    folder.mkdir(parents=True)
    bounds = [round(i * table.num_rows / shards) for i in range(shards + 1)]
    paths = []
    for i in range(shards):
        paths.append(str(folder / f"part-{i:05d}.parquet"))
        pq.write_table(table.slice(bounds[i], bounds[i + 1] - bounds[i]), paths[-1])
        (folder / f".part-{i:05d}.parquet.crc").write_bytes(b"crc")
    (folder / "_SUCCESS").write_bytes(b"")
    return paths


def mixed_entries(table: pa.Table, folder: Path) -> tuple[list[str], list[int]]:
    """The table as three entries of three kinds, in order: JSON lines (rows 0-7), a save_to_disk
    directory of 2 shards (rows 8-15) and a glob of 3 parquet shards (the rest); and their rows."""
    folder.mkdir(parents=True, exist_ok=True)
    first = jsonl(table.slice(0, 8), folder / "head.jsonl", blank_after=3)
    saved, _ = save_to_disk(table.slice(8, 8), folder / "saved", 2)
    parquet_shards(table.slice(16), folder / "rest", 3)
    return [first, saved, str(folder / "rest" / "part-*.parquet")], [8, 8, table.num_rows - 16]
