"""Reading parquet files and checking every row before anything is tokenised.

Each problem is a `DataError` with one line naming the file, the row (0-based, within that file)
and the problem; rows that would train nothing get a `DataWarning` naming them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from jaxsft.data.errors import DataError, DataWarning, at

ROLES = ("system", "user", "assistant", "tool")


def file_list(files) -> list[str]:
    """`data.train_files` / `data.val_files`: one path (a plain string) or a list/tuple of paths."""
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    files = [os.fspath(f) for f in (files or ())]
    if not files:
        raise DataError("no data files given: set data.train_files (and data.val_files) to a parquet path or a list of paths")
    return files


def open_table(path: str, required: dict[str, str], optional: tuple[str, ...] = (), limit: int | None = None) -> pa.Table:
    """Read the needed columns of one parquet file. `required` maps column name -> the config key
    that names it (for the error message); `optional` columns are read when present."""
    if not os.path.exists(path):
        raise DataError(at(path, None, "file not found"))
    if os.path.isdir(path):
        raise DataError(at(path, None, "is a directory, not a parquet file"))
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(at(path, None, f"not a parquet file ({e})")) from None
    names = pf.schema_arrow.names
    for column, key in required.items():
        if column not in names:
            raise DataError(at(path, None, f"column '{column}' ({key}) is missing; the file has columns {', '.join(names)}"))
    if pf.metadata.num_rows == 0:
        raise DataError(at(path, None, "no rows"))
    columns = list(required) + [c for c in optional if c in names and c not in required]
    table = pf.read(columns=columns)
    return table.slice(0, limit) if limit is not None else table


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _check_type(path: str, table: pa.Table, column: str, ok: bool, expected: str) -> None:
    if not ok:
        raise DataError(at(path, None, f"column '{column}' has type {table.schema.field(column).type}; expected {expected}"))


# ---- multi-turn -------------------------------------------------------------------------------


@dataclasses.dataclass
class ChatRow:
    messages: list[dict[str, Any]]
    tools: list | None
    enable_thinking: bool | None


def read_chats(path: str, *, messages_key: str, tools_key: str, enable_thinking_key: str,
               limit: int | None = None) -> list[ChatRow]:
    table = open_table(path, {messages_key: "data.messages_key"}, (tools_key, enable_thinking_key), limit)
    mt = table.schema.field(messages_key).type
    _check_type(path, table, messages_key, _is_list(mt) and pa.types.is_struct(mt.value_type),
                "a list of messages (list<struct<role: string, content: string, ...>>)")
    n = table.num_rows
    tools = [None] * n
    if tools_key in table.column_names:
        t = table.schema.field(tools_key).type
        _check_type(path, table, tools_key, pa.types.is_null(t) or _is_list(t) or _is_string(t),
                    "a list of tool specs or a JSON string")
        tools = table.column(tools_key).to_pylist()
    thinking = [None] * n
    if enable_thinking_key in table.column_names:
        t = table.schema.field(enable_thinking_key).type
        _check_type(path, table, enable_thinking_key, pa.types.is_null(t) or pa.types.is_boolean(t), "bool")
        thinking = table.column(enable_thinking_key).to_pylist()

    rows, silent = [], []
    for i, messages in enumerate(table.column(messages_key).to_pylist()):
        check_messages(messages, path, i)
        if not any(m["role"] == "assistant" for m in messages):
            silent.append(i)
        rows.append(ChatRow(messages, _tools(tools[i], path, i), thinking[i]))
    if silent:
        shown = ", ".join(map(str, silent[:20])) + (", ..." if len(silent) > 20 else "")
        warnings.warn(at(path, None, f"{len(silent)} row(s) have no assistant turn and train nothing: rows {shown}"),
                      DataWarning, stacklevel=2)
    return rows


def check_messages(messages, path: str, row: int) -> None:
    if not messages:
        raise DataError(at(path, row, "empty conversation"))
    for j, m in enumerate(messages):
        role = m.get("role")
        if role not in ROLES:
            raise DataError(at(path, row, f"message {j} has unknown role {role!r} (expected system, user, assistant or tool)"))
        content = m.get("content")
        # An assistant turn that only calls tools may have no content (the template skips it).
        if not isinstance(content, str) and not (content is None and role == "assistant" and m.get("tool_calls")):
            raise DataError(at(path, row, f"message {j} ({role}) has non-string content of type {type(content).__name__}"))


def _tools(value, path: str, row: int):
    if isinstance(value, str):  # tool specs are often stored as one JSON string
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(at(path, row, f"tools is not valid JSON ({e})")) from None
        if value is not None and not isinstance(value, list):
            raise DataError(at(path, row, f"tools must be a list of tool specs, got {type(value).__name__}"))
    return value or None


# ---- single-turn ------------------------------------------------------------------------------


def read_pairs(path: str, *, prompt_key: str, response_key: str, prompt_dict_keys=None, response_dict_keys=None,
               limit: int | None = None) -> list[tuple[str, str]]:
    """(prompt, response) strings; `*_dict_keys` index into a struct column, one key after another."""
    table = open_table(path, {prompt_key: "data.prompt_key", response_key: "data.response_key"}, (), limit)
    columns = []
    for column, name, keys in ((prompt_key, "prompt", prompt_dict_keys), (response_key, "response", response_dict_keys)):
        t = table.schema.field(column).type
        keys = list(keys or ())
        if keys:
            _check_type(path, table, column, pa.types.is_struct(t), f"a struct (data.{name}_dict_keys={keys} index into it)")
        else:
            _check_type(path, table, column, _is_string(t), "string")
        columns.append((column, name, keys, table.column(column).to_pylist()))
    pairs = []
    for i in range(table.num_rows):
        pair = []
        for column, name, keys, values in columns:
            value = values[i]
            for k in keys:
                if not isinstance(value, dict) or value.get(k) is None:
                    raise DataError(at(path, i, f"{name} column '{column}' has no key {k!r} (data.{name}_dict_keys)"))
                value = value[k]
            if not isinstance(value, str):
                raise DataError(at(path, i, f"{name} (column '{column}') has non-string content of type {type(value).__name__}"))
            pair.append(value)
        pairs.append((pair[0], pair[1]))
    return pairs
