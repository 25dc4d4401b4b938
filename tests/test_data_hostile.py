"""Data that used to train on something other than the row, or stop with a traceback: each case is
now either read exactly as the row holds it or refused in one line naming the file (and row)."""

import json
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cfg import settings

from jaxsft.config.keys import flatten

from jaxsft import bundled
from jaxsft.config import ConfigError
from jaxsft.data import DataError, DataWarning, TokenizedDataset, build_dataset
from jaxsft.hf import load_tokenizer
from jaxsft.data.checks import ZERO_LOSS_WARN_SHARE
from jaxsft.data.source import ChatRow
from jaxsft.data.tokenize import ChatEncoder

OK = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(bundled.path("tokenizer"))


def cfg(**overrides):
    keys = {"data.multiturn.enable": True, "data.max_length": 4096}
    return settings({**keys, **flatten(overrides, "data.")}).data


def write(tmp_path, table, name="d.parquet", **kw):
    path = tmp_path / name
    pq.write_table(table if isinstance(table, pa.Table) else pa.table(table), path, **kw)
    return str(path)


def build(tok, path, split="train", **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        return build_dataset(path, cfg(**kw.pop("config", {})), tok, split=split, verbose=False, **kw)


def refused(tok, path, pattern, **kw):
    with pytest.raises(DataError, match=pattern) as info:
        build(tok, path, **kw)
    assert "\n" not in str(info.value)
    return str(info.value)


def rendered(tok, messages, tools=None):
    (ids, mask), = ChatEncoder(tok).encode([ChatRow(messages, tools, None)], "python objects")
    return ids.tolist(), mask.tolist()


def weather_call(arguments):
    return {"role": "assistant", "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": arguments}}]}


# ---- Arrow's merged struct keys (issue 11) --------------------------------------------------------


def test_struct_cells_render_exactly_what_the_row_holds(tok, tmp_path):
    """Arrow stores dicts with different keys as one struct of all keys; row 0 must not be rendered
    (and trained) with row 1's and row 2's keys as nulls, in its tool call or its tool specs."""
    spec = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object",
                                                                                "properties": {"city": {"type": "string"}}}}}
    # (keys in the order of the file's struct: parquet keeps no per-row key order, see docs/DATA.md)
    other = {"type": "function", "function": {"name": "run", "parameters": {"type": "object", "properties": {
        "a": {"type": "integer"}, "b": {"type": "integer"}}}, "description": "Run code"}}
    chats = [[{"role": "user", "content": "Paris?"}, weather_call({"city": "Paris"}), {"role": "tool", "content": "sun"},
              {"role": "assistant", "content": "Sunny."}],
             [{"role": "user", "content": "1, 2?"}, weather_call({"a": 1, "b": 2}), {"role": "tool", "content": "3"},
              {"role": "assistant", "content": "3.", "name": "calc"}],
             [{"role": "user", "content": "x"}, weather_call({"a": 5}), {"role": "tool", "content": "y"},
              {"role": "assistant", "content": "z"}]]
    tools = [[spec], [other], [spec, other]]
    ds = build(tok, write(tmp_path, {"messages": chats, "tools": tools}))
    for i in range(3):
        ids, mask = ds.tokens(i)
        assert (ids.tolist(), mask.tolist()) == rendered(tok, chats[i], tools[i]), f"row {i}"
        assert "null" not in tok.decode(ids)
    assert '"arguments": {"city": "Paris"}' in tok.decode(ds.tokens(0)[0])


def test_nulls_the_row_wrote_are_kept_where_the_file_can_tell(tok, tmp_path):
    """A JSON string keeps its nulls (and key order); a map column keeps its own keys and nulls."""
    as_json = [[{"role": "user", "content": "Paris?"}, weather_call('{"unit": null, "city": "Paris"}'),
                {"role": "tool", "content": "sun"}, {"role": "assistant", "content": "Sunny."}]]
    ds = build(tok, write(tmp_path, {"messages": as_json}, "json.parquet"))
    assert '\\"unit\\": null, \\"city\\": \\"Paris\\"' in tok.decode(ds.tokens(0)[0])  # the template quotes strings

    args = pa.map_(pa.string(), pa.string())
    call = pa.struct([("name", pa.string()), ("arguments", args)])
    msg = pa.struct([("role", pa.string()), ("content", pa.string()),
                     ("tool_calls", pa.list_(pa.struct([("function", call)])))])
    rows = [[{"role": "user", "content": "Paris?", "tool_calls": None},
             {"role": "assistant", "content": None,
              "tool_calls": [{"function": {"name": "weather", "arguments": [("city", "Paris"), ("unit", None)]}}]},
             {"role": "tool", "content": "sun", "tool_calls": None}, {"role": "assistant", "content": "ok", "tool_calls": None}]]
    ds = build(tok, write(tmp_path, pa.table({"messages": pa.array(rows, pa.list_(msg))}), "map.parquet"))
    expected = [dict(m, tool_calls=[{"function": {"name": "weather", "arguments": {"city": "Paris", "unit": None}}}])
                if m["tool_calls"] else {"role": m["role"], "content": m["content"]} for m in rows[0]]
    assert ds.tokens(0)[0].tolist() == rendered(tok, expected)[0]
    assert '"arguments": {"city": "Paris", "unit": null}' in tok.decode(ds.tokens(0)[0])


# ---- tools and enable_thinking columns ----------------------------------------------------------


def test_tools_as_json_strings_per_spec_or_empty(tok, tmp_path):
    spec = {"type": "function", "function": {"name": "run", "parameters": {"type": "object"}}}
    per_spec = build(tok, write(tmp_path, {"messages": [OK, OK], "tools": [[json.dumps(spec)], []]}, "specs.parquet"))
    one_string = build(tok, write(tmp_path, {"messages": [OK] * 3, "tools": [json.dumps([spec]), "", "  "]}))
    assert per_spec.tokens(0)[0].tolist() == one_string.tokens(0)[0].tolist() == rendered(tok, OK, [spec])[0]
    assert (per_spec.tokens(1)[0].tolist() == one_string.tokens(1)[0].tolist() == one_string.tokens(2)[0].tolist()
            == rendered(tok, OK)[0])
    bad = write(tmp_path, {"messages": [OK, OK], "tools": [None, json.dumps(["run"])]}, "bad.parquet")
    refused(tok, bad, rf"^{bad} row 1: tools\[0\] is str, not a tool spec \(a JSON object\)$")
    bad = write(tmp_path, {"messages": [OK], "tools": [['{"name": oops']]}, "bad2.parquet")
    refused(tok, bad, rf"^{bad} row 0: tools\[0\] is not valid JSON")
    lone = write(tmp_path, {"messages": [OK], "tools": ['[{"name": "a\\ud800"}]']}, "lone.parquet")
    refused(tok, lone, rf"^{lone} row 0: tools holds a lone surrogate")


def test_enable_thinking_as_numbers(tok, tmp_path):
    tok2 = load_tokenizer(bundled.path("tokenizer"))
    tok2.chat_template = ("{%- for m in messages -%}{{- '<|im_start|>' + m.role + '\\n' + m.content + "
                          "(' [think]' if enable_thinking is defined and enable_thinking is true else '') + "
                          "'<|im_end|>\\n' -}}{%- endfor -%}{%- if add_generation_prompt -%}"
                          "{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")
    for name, values in (("int", pa.array([1, 0, None], pa.int64())), ("float", pa.array([1.0, 0.0, float("nan")]))):
        ds = build(tok2, write(tmp_path, pa.table({"messages": [OK] * 3, "enable_thinking": values}), f"{name}.parquet"))
        assert ["[think]" in tok2.decode(ds.tokens(i)[0]) for i in range(3)] == [True, False, False]
    two = write(tmp_path, pa.table({"messages": [OK, OK], "enable_thinking": pa.array([1, 2])}), "two.parquet")
    refused(tok2, two, rf"^{two} row 1: enable_thinking is 2; expected true/false \(or 1/0\)$")


# ---- rows that used to crash with a traceback ---------------------------------------------------


def test_message_shapes_refused_in_one_line(tok, tmp_path):
    parts = pa.struct([("role", pa.string()), ("content", pa.list_(pa.struct([("type", pa.string()), ("text", pa.string())])))])
    multimodal = pa.table({"messages": pa.array([[{"role": "user", "content": [{"type": "text", "text": "hi"}]}]],
                                                pa.list_(parts))})
    path = write(tmp_path, multimodal, "parts.parquet")
    refused(tok, path, rf"^{path} row 0: message 0 \(user\) has content as a list of parts \(multimodal\); only text")
    path = write(tmp_path, pa.table({"messages": pa.array([OK, [None, OK[1]]], pa.list_(MESSAGE))}), "null.parquet")
    refused(tok, path, rf"^{path} row 1: message 0 is null$")
    numbers = pa.struct([("role", pa.int64()), ("content", pa.string())])
    path = write(tmp_path, pa.table({"messages": pa.array([[{"role": 1, "content": "x"}]], pa.list_(numbers))}), "int.parquet")
    refused(tok, path, rf"^{path} row 0: message 0 has unknown role 1 ")


def test_duplicate_column_names(tok, tmp_path):
    table = pa.Table.from_arrays([pa.array([OK], pa.list_(MESSAGE)), pa.array([OK], pa.list_(MESSAGE))],
                                 names=["messages", "messages"])
    path = write(tmp_path, table)
    refused(tok, path, rf"^{path}: column 'messages' appears 2 times in the file; keep one \(or rename the others\)$")


def _string_array(values: list[bytes]) -> pa.Array:
    """A string array holding arbitrary bytes (pyarrow does not check UTF-8 here; a writer may not)."""
    offsets = np.cumsum([0] + [len(v) for v in values]).astype(np.int32)
    return pa.Array.from_buffers(pa.string(), len(values), [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(b"".join(values))])


@pytest.mark.parametrize("bad", [b"caf\xe9", b"\xed\xa0\x80 lone surrogate"], ids=["latin-1", "surrogate"])
def test_text_that_is_not_utf8_names_the_row(tok, tmp_path, bad):
    content = _string_array([b"hi", b"hello", b"hi", bad])
    messages = pa.StructArray.from_arrays([pa.array(["user", "assistant"] * 2), content], fields=list(MESSAGE))
    chats = pa.ListArray.from_arrays(pa.array([0, 2, 4], pa.int32()), messages)
    path = write(tmp_path, pa.table({"messages": chats}))
    refused(tok, path, rf"^{path} row 1: column 'messages' holds text that is not valid UTF-8 \(.*: byte 0x[0-9a-f]{{2}} ")
    single = write(tmp_path, pa.table({"question": _string_array([b"q", bad]), "answer": ["a", "b"]}), "pairs.parquet")
    refused(tok, single, rf"^{single} row 1: column 'question' holds text that is not valid UTF-8",
            config={"multiturn": {"enable": False}})


def _flip(path, start, count):
    data = bytearray(open(path, "rb").read())
    for k in range(start, start + count):
        data[k] ^= 0xFF
    open(path, "wb").write(data)


@pytest.mark.parametrize("checksums", [False, True])
def test_damaged_data_pages_name_the_file_and_row_group(tok, tmp_path, checksums):
    chats = [[{"role": "user", "content": f"question {i} " * 5}, {"role": "assistant", "content": f"answer {i} " * 5}]
             for i in range(300)]
    path = write(tmp_path, {"messages": chats}, row_group_size=100, write_page_checksum=checksums,
                 compression="none" if checksums else "snappy")
    assert len(build(tok, path)) == 300
    chunk = pq.ParquetFile(path).metadata.row_group(1).column(1)  # messages.list.element.content
    if checksums:  # uncompressed values: only the page checksum can tell
        _flip(path, (chunk.dictionary_page_offset or chunk.data_page_offset) + chunk.total_compressed_size // 2, 8)
    else:  # inside the snappy-compressed dictionary page
        _flip(path, chunk.dictionary_page_offset + 60, 30)
    refused(tok, path, rf"^{path}: row group 1 \(rows 100-199\) cannot be read, the file is damaged \(.+\); write or copy it again$")
    assert len(build(tok, path, config={"train_max_samples": 100})) == 100  # only row group 0 is read


# ---- vocabulary and loss tokens -----------------------------------------------------------------


def test_token_ids_beyond_the_model_vocabulary(tok, tmp_path):
    call = {"role": "assistant", "content": "Running.",
            "tool_calls": [{"type": "function", "function": {"name": "run", "arguments": "{}"}}]}
    chats = [OK, OK, [OK[0], call, {"role": "tool", "content": "done"}, OK[1]]]
    path = write(tmp_path, {"messages": chats})
    assert tok.convert_tokens_to_ids("<tool_call>") == 1539 and len(tok) == 1541
    refused(tok, path, rf"^{path} row 2: token id 1539 \('<tool_call>'\) is outside the model's vocabulary "
                       rf"\(vocab_size=1539; the tokenizer has 1541 tokens, 1 row\(s\) use ids beyond the model's\): use "
                       rf"the model's own tokenizer, or resize the model's embeddings for the added tokens first$",
            vocab_size=1539)
    refused(tok, path, r"^the tokenizer's pad token '<\|endoftext\|>' has id 1536, outside the model's vocabulary "
                       r"\(vocab_size=1536\)", vocab_size=1536)
    assert len(build(tok, path, vocab_size=1541)) == len(build(tok, path)) == 3
    refused(tok, path, r"row 2: token id 1539", vocab_size=1539, split="val")


def test_training_data_without_loss_tokens_is_refused(tok, tmp_path):
    long_prompt = [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "answer"}]
    path = write(tmp_path, {"messages": [long_prompt] * 3})
    refused(tok, path, rf"^{path}: the training data has no loss tokens, none of its 3 row\(s\) keeps an assistant token "
                       rf"to train on \(3 cut to data.max_length=40 by data.truncation=right\); truncation=right keeps "
                       rf"each row's first tokens, so the responses were cut off: raise data.max_length or use "
                       rf"data.truncation=left$", config={"max_length": 40, "truncation": "right"})
    only_questions = write(tmp_path, {"messages": [[OK[0]]] * 2}, "q.parquet")
    refused(tok, only_questions, r"none of its 2 row\(s\) keeps an assistant token to train on \(2 without an assistant "
                                 r"token even before truncation: no assistant turn, or nothing after the generation "
                                 r"prompt\); check data.messages_key and the message roles$")
    val = build(tok, path, split="val", config={"max_length": 40, "truncation": "right"})  # the trainer says why
    assert val.stats["loss_tokens"] == 0 and val.stats["zero_loss_rows"] == 3


def test_a_large_share_of_zero_loss_rows_is_a_warning(tok, tmp_path):
    long_prompt = [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "answer"}]
    n = 20
    cut = int(np.ceil(ZERO_LOSS_WARN_SHARE * n))
    path = write(tmp_path, {"messages": [long_prompt] * cut + [OK] * (n - cut)})
    config = {"max_length": 40, "truncation": "right"}
    with pytest.warns(DataWarning, match=rf"^{path}: {cut} of {n} training rows \(10.0%\) have zero loss tokens and "
                                         rf"train nothing \({cut} cut to data.max_length=40 by data.truncation=right\); "
                                         rf"they cost compute and shrink the effective batch$"):
        ds = build_dataset(path, cfg(**config), tok, verbose=False)
    assert ds.stats["zero_loss_rows"] == cut
    below = write(tmp_path, {"messages": [long_prompt] * (cut - 1) + [OK] * (n - cut + 1)}, "below.parquet")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        build_dataset(below, cfg(**config), tok, verbose=False)


def test_one_mask_entry_per_token_is_enforced():
    ok = (np.arange(3, dtype=np.int32), np.array([0, 1, 1], np.int8))
    long_mask = (np.arange(3, dtype=np.int32), np.array([0, 0, 0, 1], np.int8))
    with pytest.raises(AssertionError, match=r"^b.parquet row 7: 3 tokens but 4 loss-mask entries"):
        TokenizedDataset.from_samples([ok, long_mask], [("a.parquet", 0), ("b.parquet", 7)])


def test_older_verl_per_message_loss_mask_is_named(tok, tmp_path):
    """verl's Sep-Nov 2025 dataset skipped assistant messages with loss_mask=0; the final one (and
    jaxsft) train them: say so instead of training them silently."""
    chat = [{"role": "user", "content": "q", "loss_mask": 0}, {"role": "assistant", "content": "bad", "loss_mask": 0},
            {"role": "user", "content": "q2", "loss_mask": 0}, {"role": "assistant", "content": "good", "loss_mask": 1}]
    path = write(tmp_path, {"messages": [chat, OK]})
    with pytest.warns(DataWarning, match=rf"^{path}: 1 assistant message\(s\) carry loss_mask=0, a per-message field "
                                         rf"only verl's Sep-Nov 2025 dataset honoured; as in verl since, they are trained$"):
        ds = build_dataset(path, cfg(), tok, verbose=False)
    assert tok.decode(ds.tokens(0)[0][ds.tokens(0)[1] == 1]) == "bad<|im_end|>\ngood<|im_end|>\n"
    with pytest.raises(ConfigError, match=r"^data.max_length=0 must be a positive integer$"):  # before any data
        cfg(max_length=0)


def test_tool_calls_as_a_json_string_are_decoded(tok, tmp_path):
    """A template iterating a JSON string renders one bogus call per character (or fails)."""
    calls = [{"type": "function", "function": {"name": "run", "arguments": "{}"}}]
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ok", "tool_calls": json.dumps(calls)},
            {"role": "tool", "content": "done"}, {"role": "assistant", "content": "fine", "tool_calls": ""}]
    ds = build(tok, write(tmp_path, {"messages": [chat]}))
    as_objects = [chat[0], dict(chat[1], tool_calls=calls), chat[2], {"role": "assistant", "content": "fine"}]
    assert ds.tokens(0)[0].tolist() == rendered(tok, as_objects)[0]
    bad = [chat[0], dict(chat[1], tool_calls='{"name": "run"}')]
    path = write(tmp_path, {"messages": [bad]}, "bad.parquet")
    refused(tok, path, rf"^{path} row 0: message 1 tool_calls must be a list of calls, got dict$")
