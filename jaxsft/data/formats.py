"""What an entry of `data.train_files` / `data.val_files` names, and reading each kind of file.

An entry is a parquet file, a JSON file (`.jsonl` / `.json`: one object per line, or one JSON
array of objects), a directory of such files, a glob of them, or a directory written by Hugging
Face datasets' `Dataset.save_to_disk`. `expand` turns each entry into its shards, the files read
one after another; a shard keeps its own name and row numbers in error messages and its own
content hash in the tokenised-data cache key. Mixing weights stay per entry.

The readers give every kind the same Arrow table, so the rows are checked and read as from
parquet (a list of dicts is a list<struct>, a key missing from a row is a null):
- parquet: pyarrow.parquet, row group by row group (page checksums verified where written);
- JSON: pyarrow.json, the reader `datasets.load_dataset("json")` itself uses; a JSON array is
  turned into lines first, as `datasets` does;
- save_to_disk: pyarrow.ipc. Such a directory is Arrow IPC stream files listed, in order, by its
  `state.json`; reading them directly gives the table `datasets.load_from_disk` gives, without
  depending on `datasets` (pandas, dill, multiprocess, aiohttp, ...) for a list of Arrow files.
Directories and globs are listed here rather than by pyarrow.dataset: each shard needs its own
name, row numbers and content hash.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re

import pyarrow as pa
import pyarrow.json as paj
import pyarrow.parquet as pq

from jaxsft.data.errors import DataError, at

KINDS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
SKIPPED = (".", "_")  # in a directory: hidden files and markers (_SUCCESS, .crc), as pyarrow.dataset skips them
STATE, DICT = "state.json", "dataset_dict.json"  # a save_to_disk Dataset / DatasetDict directory
MAX_BLOCK = (1 << 31) - 1  # pyarrow.json's block size is an int32
_GLOB = re.compile(r"[*?[]")


def kind(path: str) -> str:
    """parquet, json or arrow; a file named otherwise is read as parquet (as before there were kinds)."""
    if path.endswith(".arrow"):
        return "arrow"
    return KINDS.get(os.path.splitext(path)[1], "parquet")


def expand(entries: list[str], key: str) -> list[list[str]]:
    """The shards of each entry of `key` (data.train_files or data.val_files), in reading order."""
    return [_shards(entry, key) for entry in entries]


def _shards(entry: str, key: str) -> list[str]:
    if os.path.isdir(entry):
        return _directory(entry, key)
    if os.path.exists(entry) or not _GLOB.search(entry):
        return [entry]  # a file (a missing one is named when it is opened)
    found = sorted(p for p in glob.glob(entry, recursive=True) if not os.path.basename(p).startswith(SKIPPED))
    files = [p for p in found if os.path.isfile(p)]
    _known(entry, key, files, f"{os.path.dirname(entry) or '.'}/*.parquet")
    # A matched directory counts when it is a save_to_disk directory; others are walked by the glob itself.
    saved = {p: _saved(p) for p in found if os.path.isfile(os.path.join(p, STATE))}
    plain = set(files)
    shards = [s for p in found for s in (saved[p] if p in saved else [p] if p in plain else [])]
    if not shards:
        raise DataError(f"{key} entry {entry!r} matches no data file")
    return shards


def _directory(path: str, key: str) -> list[str]:
    if os.path.isfile(os.path.join(path, STATE)):
        return _saved(path)
    if os.path.isfile(os.path.join(path, DICT)):
        splits = sorted(n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n, STATE)))
        raise DataError(f"{key} entry {path!r} is a datasets DatasetDict (splits: {', '.join(splits) or 'none'}): "
                        f"name one split's directory, e.g. {os.path.join(path, splits[0] if splits else 'train')}")
    try:
        names = sorted(n for n in os.listdir(path) if not n.startswith(SKIPPED) and os.path.isfile(os.path.join(path, n)))
    except OSError as e:
        raise DataError(at(path, None, f"cannot be read ({e.strerror})")) from None
    if not names:
        raise DataError(f"{key} entry {path!r} is a directory without data files (.parquet, .jsonl, .json)")
    _known(path, key, names, os.path.join(path, "*.parquet"))
    return [os.path.join(path, n) for n in names]


def _known(entry: str, key: str, names: list[str], example: str) -> None:
    unknown = [os.path.basename(n) for n in names if os.path.splitext(n)[1] not in KINDS]
    if unknown:
        shown = ", ".join(unknown[:3]) + (", ..." if len(unknown) > 3 else "")
        raise DataError(f"{key} entry {entry!r} holds {len(unknown)} file(s) that are not data files ({shown}): data "
                        f"files end in .parquet, .jsonl or .json; move the others away or name the data files with "
                        f"a glob (e.g. {example})")


def _saved(path: str) -> list[str]:
    """The arrow files of a save_to_disk directory, in the order its state.json lists them."""
    state = os.path.join(path, STATE)
    try:
        with open(state, encoding="utf-8") as f:
            files = [os.path.join(path, d["filename"]) for d in json.load(f)["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(at(state, None, f"is not a datasets save_to_disk state.json ({type(e).__name__}: {e})")) from None
    if not files:
        raise DataError(at(state, None, "lists no data files"))
    return files


# ---- opening one shard --------------------------------------------------------------------------


def open_source(path: str, required: dict[str, str], optional: tuple[str, ...] = (), **parquet):
    """One shard, its columns checked: a `ParquetSource` or a `TableSource`. `required` maps column
    name -> the config key that names it (for the error message); `optional` columns are read when
    present; `parquet`: more ParquetFile options."""
    if not os.path.exists(path):
        raise DataError(at(path, None, "file not found"))
    if os.path.isdir(path):
        raise DataError(at(path, None, "is a directory, not a data file"))
    try:
        open(path, "rb").close()
    except OSError as e:
        raise DataError(at(path, None, f"cannot be read ({e.strerror})")) from None
    k = kind(path)
    src = ParquetSource(path, **parquet) if k == "parquet" else TableSource(path, _json(path) if k == "json" else _arrow(path))
    names = src.schema.names
    for column, key in required.items():
        if column not in names:
            raise DataError(at(path, None, f"column '{column}' ({key}) is missing; the file has columns {', '.join(names)}"))
    if src.num_rows == 0:
        raise DataError(at(path, None, "no rows"))
    src.columns = list(required) + [c for c in optional if c in names and c not in required]
    for column in src.columns:
        if names.count(column) > 1:
            raise DataError(at(path, None, f"column '{column}' appears {names.count(column)} times in the file; "
                                           f"keep one (or rename the others)"))
    return src


class ParquetSource:
    """A parquet file, read only as far as the rows asked for, row group by row group."""

    def __init__(self, path: str, **reader):
        self.path = path
        try:
            # Page checksums are verified where the writer stored them (pyarrow: write_page_checksum=True).
            self.file = pq.ParquetFile(path, page_checksum_verification=True, **reader)
        except (pa.ArrowException, OSError) as e:
            raise DataError(at(path, None, f"not a parquet file ({e})")) from None
        self.schema, self.num_rows = self.file.schema_arrow, self.file.metadata.num_rows

    def _groups(self, limit: int | None) -> list[int]:
        """The row groups holding the first `limit` rows (all if None)."""
        groups, rows = [], 0
        for g in range(self.file.num_row_groups):
            if limit is not None and rows >= limit:
                break
            groups.append(g)
            rows += self.file.metadata.row_group(g).num_rows
        return groups

    def table(self, limit: int | None = None) -> pa.Table:
        """The first `limit` rows, group by group, so a damaged one is named."""
        tables, first = [], 0
        for g in self._groups(limit):
            n = self.file.metadata.row_group(g).num_rows
            try:
                tables.append(self.file.read_row_group(g, columns=self.columns))
            except (pa.ArrowException, OSError) as e:
                raise DataError(at(self.path, None, f"row group {g} (rows {first}-{first + n - 1}) cannot be read, the "
                                                    f"file is damaged ({e}); write or copy it again")) from None
            first += n
        table = pa.concat_tables(tables)
        return table.slice(0, limit) if limit is not None else table

    def batches(self, limit: int, size: int):
        """(record batch, first row) of the first `limit` rows, `size` rows per batch at most."""
        first = 0
        for batch in self.file.iter_batches(batch_size=size, row_groups=self._groups(limit), columns=self.columns):
            if first + batch.num_rows > limit:
                batch = batch.slice(0, limit - first)
            if batch.num_rows:
                yield batch, first
            first += batch.num_rows
            if first >= limit:
                return


class TableSource:
    """A file read whole into an Arrow table (JSON) or memory-mapped (Arrow IPC)."""

    def __init__(self, path: str, table: pa.Table):
        self.path, self._table = path, table
        self.schema, self.num_rows = table.schema, table.num_rows

    def table(self, limit: int | None = None) -> pa.Table:
        table = self._table.select(self.columns)
        return table.slice(0, limit) if limit is not None else table

    def batches(self, limit: int, size: int):
        table = self.table(limit)
        for first in range(0, table.num_rows, size):
            yield table.slice(first, size).combine_chunks().to_batches()[0], first


def _arrow(path: str) -> pa.Table:
    try:
        with pa.ipc.open_stream(pa.memory_map(path)) as reader:  # datasets writes IPC streams
            return reader.read_all()
    except (pa.ArrowException, OSError) as e:
        raise DataError(at(path, None, f"not an Arrow stream file of a datasets save_to_disk directory ({e})")) from None


# ---- JSON ---------------------------------------------------------------------------------------


def _json(path: str) -> pa.Table:
    with open(path, "rb") as f:
        data = f.read()
    start = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
    array = start.lstrip()[:1] == b"["
    if not start.strip():
        raise DataError(at(path, None, "no rows"))
    if array:
        data = _array_lines(path, data)
    # One block while the file fits pyarrow's block size: rows counted in an error are the file's.
    whole = len(data) < MAX_BLOCK
    try:
        return paj.read_json(io.BytesIO(data), read_options=paj.ReadOptions(block_size=len(data) + 1 if whole else 1 << 28))
    except pa.ArrowInvalid as e:
        if not array:
            _bad_line(path, data)
        found = re.fullmatch(r"(?s)(.*?)\.? in row (\d+)", str(e))
        if found and whole:
            raise DataError(at(path, int(found[2]), f"cannot be read as a row of the table ({found[1]})")) from None
        raise DataError(at(path, None, f"cannot be read as JSON rows ({e})")) from None


def _array_lines(path: str, data: bytes) -> bytes:
    """A JSON array of objects as JSON lines (escapes kept: a lone surrogate is refused by row)."""
    try:
        items = json.loads(data)
    except UnicodeDecodeError as e:
        raise DataError(at(path, None, f"is not UTF-8 text ({e.reason} at byte {e.start})")) from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise DataError(at(path, i, f"is a JSON {type(item).__name__}, not an object (a row)"))
    if not items:
        raise DataError(at(path, None, "no rows"))
    return "\n".join(json.dumps(item) for item in items).encode()


def _bad_line(path: str, data: bytes) -> None:
    """Raise the first line of a JSON-lines file that is not one JSON object, if there is one."""
    for number, line in enumerate(data.split(b"\n"), 1):
        line = line[3:] if number == 1 and line.startswith(b"\xef\xbb\xbf") else line
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except UnicodeDecodeError as e:
            raise DataError(f"{path} line {number}: not UTF-8 text ({e.reason} at byte {e.start} of the line)") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {number}: not valid JSON ({e.msg} at column {e.colno}); each line must hold "
                            f"one JSON object (a row)") from None
        if not isinstance(value, dict):
            raise DataError(f"{path} line {number}: a JSON {type(value).__name__}, not an object; each line must hold "
                            f"one JSON object (a row)")
