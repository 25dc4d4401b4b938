"""Reading the data files and checking every row before anything is tokenised.

Each problem is a `DataError` with one line naming the file, the row (0-based, within that file;
for a JSON-lines file its line) and the problem; rows that would train nothing get a `DataWarning` naming them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any

import pyarrow as pa

from jaxsft.data import formats
from jaxsft.data.errors import DataError, DataWarning, at, numbered

ROLES = ("system", "user", "assistant", "tool")


def file_list(files) -> list[str]:
    """`data.train_files` / `data.val_files`: one entry (a plain string) or a list/tuple of entries
    (files, directories, globs: `formats.expand`)."""
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    files = [os.fspath(f) for f in (files or ())]
    if not files:
        raise DataError("no data files given: set data.train_files (and data.val_files) to a data file, directory or "
                        "glob, or a list of them")
    return files


def open_table(path: str, required: dict[str, str], optional: tuple[str, ...] = (), limit: int | None = None) -> pa.Table:
    """Read the needed columns of one data file (`jaxsft.data.formats`). `required` maps column
    name -> the config key that names it (for the error message); `optional` columns are read when
    present."""
    return formats.open_source(path, required, optional).table(limit)


def column_values(path: str, table: pa.Table, column: str, keep: tuple[str, ...] = ()) -> list:
    """The column's cells as Python objects holding what each row holds.

    Arrow stores a column of dicts as one struct type, the union of the keys of all rows: a row
    without key `k` reads back as `k: None`. Those nulls are dropped here (a null the user wrote
    in a struct column cannot be told apart from them and is dropped too; store such values as a
    JSON string, which is kept as written). Fields named in `keep` stay on the outermost struct.
    Map cells become dicts (their keys are the row's own)."""
    chunked = table.column(column)
    try:
        values = chunked.to_pylist()
    except UnicodeDecodeError:
        _raise_bad_text(path, chunked, column)
    t = chunked.type
    return [_plain(v, t, keep) for v in values] if _nested(t) else values


def _nested(t: pa.DataType) -> bool:
    if pa.types.is_struct(t) or pa.types.is_map(t):
        return True
    return _is_list(t) and _nested(t.value_type)


def _plain(value, t: pa.DataType, keep: tuple[str, ...] = ()):
    if value is None:
        return None
    if pa.types.is_map(t):  # to_pylist gives (key, value) pairs
        return {k: _plain(v, t.item_type) for k, v in value}
    if pa.types.is_struct(t):
        return {f.name: _plain(value[f.name], f.type) for f in t
                if value[f.name] is not None or f.name in keep}
    if _is_list(t):
        return [_plain(v, t.value_type, keep) for v in value]
    return value


def _raise_bad_text(path: str, chunked: pa.ChunkedArray, column: str):
    """Find the row whose text is not UTF-8 (only on this error path: row by row)."""
    for i in range(len(chunked)):
        try:
            chunked.slice(i, 1).to_pylist()
        except UnicodeDecodeError as e:
            raise DataError(at(path, i, f"column '{column}' holds text that is not valid UTF-8 ({e.reason}: byte "
                                        f"0x{e.object[e.start]:02x} of a string; a lone surrogate or other bytes that "
                                        f"are not text); write the file with UTF-8 strings")) from None
    raise AssertionError(f"{path}: column '{column}' failed to decode as a whole but not row by row")


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
    table = open_table(path, *chat_columns(messages_key, tools_key, enable_thinking_key), limit)
    rows, silent, opted_out = chats_from_table(path, table, messages_key=messages_key, tools_key=tools_key,
                                               enable_thinking_key=enable_thinking_key)
    for message in row_warnings(path, silent, opted_out):
        warnings.warn(message, DataWarning, stacklevel=2)
    return rows


def chat_columns(messages_key: str, tools_key: str, enable_thinking_key: str) -> tuple[dict[str, str], tuple[str, ...]]:
    """(required, optional) columns of a multi-turn file, as `open_table` takes them."""
    return {messages_key: "data.messages_key"}, (tools_key, enable_thinking_key)


def chats_from_table(path: str, table: pa.Table, *, messages_key: str, tools_key: str,
                     enable_thinking_key: str) -> tuple[list[ChatRow], list[int], int]:
    """The checked rows of a table read from `path` (row numbers count from the table's first
    row), the rows without an assistant turn, and the count of assistant messages with loss_mask=0."""
    mt = table.schema.field(messages_key).type
    _check_type(path, table, messages_key, _is_list(mt) and pa.types.is_struct(mt.value_type),
                "a list of messages (list<struct<role: string, content: string, ...>>)")
    n = table.num_rows
    tools = [None] * n
    if tools_key in table.column_names:
        t = table.schema.field(tools_key).type
        _check_type(path, table, tools_key, pa.types.is_null(t) or _is_list(t) or _is_string(t),
                    "a list of tool specs or a JSON string")
        tools = column_values(path, table, tools_key)
    thinking = [None] * n
    if enable_thinking_key in table.column_names:
        thinking = _thinking(path, table, enable_thinking_key)

    rows, silent, opted_out = [], [], 0
    for i, messages in enumerate(column_values(path, table, messages_key, keep=("role", "content"))):
        _decode_tool_calls(messages or (), path, i)
        check_messages(messages, path, i)
        if not any(m["role"] == "assistant" for m in messages):
            silent.append(i)
        opted_out += sum(m["role"] == "assistant" and m.get("loss_mask") == 0 for m in messages)
        rows.append(ChatRow(messages, _tools(tools[i], path, i), thinking[i]))
    return rows, silent, opted_out


def row_warnings(path: str, silent: list[int], opted_out: int) -> list[str]:
    """The warnings about one file's rows: those that train nothing, verl's old per-message loss_mask."""
    out = []
    if silent:
        out.append(at(path, None, f"{len(silent)} row(s) have no assistant turn and train nothing: {numbered(path, silent)}"))
    if opted_out:
        out.append(at(path, None, f"{opted_out} assistant message(s) carry loss_mask=0, a per-message field only verl's "
                                  f"Sep-Nov 2025 dataset honoured; as in verl since, they are trained"))
    return out


def _thinking(path: str, table: pa.Table, column: str) -> list[bool | None]:
    """A bool column, or 0/1 numbers (pandas stores a bool column with gaps as floats, NaN for null)."""
    t = table.schema.field(column).type
    _check_type(path, table, column, pa.types.is_null(t) or pa.types.is_boolean(t) or pa.types.is_integer(t)
                or pa.types.is_floating(t), "bool")
    values = table.column(column).to_pylist()
    if pa.types.is_boolean(t) or pa.types.is_null(t):
        return values
    out = []
    for i, v in enumerate(values):
        if v is None or v != v:  # null or NaN
            out.append(None)
        elif v in (0, 1):
            out.append(bool(v))
        else:
            raise DataError(at(path, i, f"{column} is {v!r}; expected true/false (or 1/0)"))
    return out


def check_messages(messages, path: str, row: int) -> None:
    if not messages:
        raise DataError(at(path, row, "empty conversation"))
    for j, m in enumerate(messages):
        if m is None:
            raise DataError(at(path, row, f"message {j} is null"))
        role = m.get("role")
        if role not in ROLES:
            raise DataError(at(path, row, f"message {j} has unknown role {role!r} (expected system, user, assistant or tool)"))
        content = m.get("content")
        if isinstance(content, list):
            raise DataError(at(path, row, f"message {j} ({role}) has content as a list of parts (multimodal); only text "
                                          f"content (a string) can be trained: join the text parts into one string"))
        # An assistant turn that only calls tools may have no content (the template skips it).
        if not isinstance(content, str) and not (content is None and role == "assistant" and m.get("tool_calls")):
            raise DataError(at(path, row, f"message {j} ({role}) has non-string content of type {type(content).__name__}"))


def _decode_tool_calls(messages: list[dict], path: str, row: int) -> None:
    """`tool_calls` stored as one JSON string per message (a list of calls) is decoded in place: a
    template iterating the string would render (and train) one bogus call per character."""
    for j, m in enumerate(messages):
        calls = m.get("tool_calls") if isinstance(m, dict) else None
        if not isinstance(calls, str):
            continue
        calls = _json(calls, path, row, f"message {j} tool_calls") if calls.strip() else None
        if calls is not None and not isinstance(calls, list):
            raise DataError(at(path, row, f"message {j} tool_calls must be a list of calls, got {type(calls).__name__}"))
        if calls:
            m["tool_calls"] = calls
        else:
            del m["tool_calls"]


def _tools(value, path: str, row: int):
    """A row's tool specs: a list of specs (dicts or JSON strings) or one JSON string of the list.
    An empty string or list means no tools (the template sees a false value, as in verl)."""
    per_spec_json = not isinstance(value, str)  # a list<string> column holds one JSON object per tool
    if isinstance(value, str):  # tool specs are often stored as one JSON string
        if not value.strip():
            return None
        value = _json(value, path, row, "tools")
        if value is not None and not isinstance(value, list):
            raise DataError(at(path, row, f"tools must be a list of tool specs, got {type(value).__name__}"))
    specs = []
    for k, spec in enumerate(value or ()):
        if isinstance(spec, str) and per_spec_json:
            spec = _json(spec, path, row, f"tools[{k}]")
        if not isinstance(spec, dict):
            raise DataError(at(path, row, f"tools[{k}] is {type(spec).__name__}, not a tool spec (a JSON object)"))
        specs.append(spec)
    return specs or None


def _json(text: str, path: str, row: int, what: str):
    try:
        value = json.loads(text)
        json.dumps(value, ensure_ascii=False).encode("utf-8")  # a "\ud800" escape decodes to a lone surrogate
    except json.JSONDecodeError as e:
        raise DataError(at(path, row, f"{what} is not valid JSON ({e})")) from None
    except UnicodeEncodeError:
        raise DataError(at(path, row, f"{what} holds a lone surrogate (a \\ud800-\\udfff escape without its pair), "
                                      f"which is not text")) from None
    return value


# ---- single-turn ------------------------------------------------------------------------------


def read_pairs(path: str, *, prompt_key: str, response_key: str, prompt_dict_keys=None, response_dict_keys=None,
               limit: int | None = None) -> list[tuple[str, str]]:
    """(prompt, response) strings; `*_dict_keys` index into a struct column, one key after another."""
    table = open_table(path, *pair_columns(prompt_key, response_key), limit)
    return pairs_from_table(path, table, prompt_key=prompt_key, response_key=response_key,
                            prompt_dict_keys=prompt_dict_keys, response_dict_keys=response_dict_keys)


def pair_columns(prompt_key: str, response_key: str) -> tuple[dict[str, str], tuple[str, ...]]:
    return {prompt_key: "data.prompt_key", response_key: "data.response_key"}, ()


def pairs_from_table(path: str, table: pa.Table, *, prompt_key: str, response_key: str, prompt_dict_keys=None,
                     response_dict_keys=None) -> list[tuple[str, str]]:
    columns = []
    for column, name, keys in ((prompt_key, "prompt", prompt_dict_keys), (response_key, "response", response_dict_keys)):
        t = table.schema.field(column).type
        keys = list(keys or ())
        if keys:
            _check_type(path, table, column, pa.types.is_struct(t), f"a struct (data.{name}_dict_keys={keys} index into it)")
        else:
            _check_type(path, table, column, _is_string(t), "string")
        columns.append((column, name, keys, column_values(path, table, column)))
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
