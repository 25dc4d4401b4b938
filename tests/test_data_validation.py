"""Every validation error is one line naming the file (and the row where there is one)."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cfg import settings

from jaxsft import bundled
from jaxsft.data import DataError, DataWarning, build_dataset
from jaxsft.hf import load_tokenizer

OK = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(bundled.path("tokenizer"))


def cfg(multiturn=True, **overrides):
    return settings({"data.multiturn.enable": multiturn, **{f"data.{k}": v for k, v in overrides.items()}}).data


def write(tmp_path, table, name="bad.parquet"):
    path = tmp_path / name
    pq.write_table(table if isinstance(table, pa.Table) else pa.table(table), path)
    return str(path)


def refused(tok, files, pattern, **kw):
    with pytest.raises(DataError, match=pattern) as info:
        build_dataset(files, cfg(**kw), tok, verbose=False)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_file_level_errors(tok, tmp_path):
    missing = str(tmp_path / "nope.parquet")
    refused(tok, missing, rf"^{missing}: file not found$")
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet at all")
    refused(tok, str(junk), rf"^{junk}: not a parquet file \(")
    empty = write(tmp_path, pa.table({"messages": pa.array([], pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])))}))
    refused(tok, empty, rf"^{empty}: no rows$")
    other = write(tmp_path, {"conversation": [OK]})
    refused(tok, other, rf"^{other}: column 'messages' \(data.messages_key\) is missing; the file has columns conversation$")
    as_text = write(tmp_path, {"messages": ["hi"]})
    refused(tok, as_text, rf"^{as_text}: column 'messages' has type string; expected a list of messages")
    refused(tok, [], r"^no data files given")


def test_row_level_errors(tok, tmp_path):
    cases = {
        "unknown role": ([OK, [{"role": "bot", "content": "x"}]],
                         r"row 1: message 0 has unknown role 'bot' \(expected system, user, assistant or tool\)$"),
        "empty": ([OK, OK, []], r"row 2: empty conversation$"),
        "null": ([OK, None], r"row 1: empty conversation$"),
        "content": ([OK, [{"role": "user", "content": None}, {"role": "assistant", "content": "x"}]],
                    r"row 1: message 0 \(user\) has non-string content of type NoneType$"),
        "template": ([OK, [{"role": "user", "content": "x"},
                           {"role": "assistant", "content": None, "tool_calls": [{"function": {"arguments": "{}"}}]}]],
                     r"row 1: the chat template failed \(\w+"),
    }
    for name, (chats, problem) in cases.items():
        path = write(tmp_path, {"messages": chats}, f"{name}.parquet")
        refused(tok, path, rf"^{path} {problem}")
    numbers = write(tmp_path, {"messages": [[{"role": "user", "content": 3}]]}, "int.parquet")
    refused(tok, numbers, rf"^{numbers} row 0: message 0 \(user\) has non-string content of type int$")
    tools = write(tmp_path, {"messages": [OK, OK], "tools": [None, "{oops"]}, "tools.parquet")
    refused(tok, tools, rf"^{tools} row 1: tools is not valid JSON")
    thinking = write(tmp_path, {"messages": [OK], "enable_thinking": ["yes"]}, "thinking.parquet")
    refused(tok, thinking, rf"^{thinking}: column 'enable_thinking' has type string; expected bool$")


def test_errors_in_the_second_file_name_it(tok, tmp_path):
    good = write(tmp_path, {"messages": [OK]}, "good.parquet")
    bad = write(tmp_path, {"messages": [OK, OK, OK, [{"role": "narrator", "content": "x"}]]}, "second.parquet")
    refused(tok, [good, bad], rf"^{bad} row 3: message 0 has unknown role 'narrator'")


def test_single_turn_errors(tok, tmp_path):
    path = write(tmp_path, {"question": ["q"], "reply": ["a"]})
    refused(tok, path, rf"^{path}: column 'answer' \(data.response_key\) is missing", multiturn=False)
    path = write(tmp_path, {"question": ["q", None], "answer": ["a", "b"]}, "null.parquet")
    refused(tok, path, rf"^{path} row 1: prompt \(column 'question'\) has non-string content of type NoneType$",
            multiturn=False)
    path = write(tmp_path, {"question": [1], "answer": ["a"]}, "int.parquet")
    refused(tok, path, rf"^{path}: column 'question' has type int64; expected string$", multiturn=False)
    path = write(tmp_path, {"extra": [{"q": "x"}, {"r": "y"}], "answer": ["a", "b"]}, "keys.parquet")
    refused(tok, path, rf"^{path} row 1: prompt column 'extra' has no key 'q' \(data.prompt_dict_keys\)$",
            multiturn=False, prompt_key="extra", prompt_dict_keys=["q"])


def test_rows_without_an_assistant_turn_are_named_in_a_warning(tok, tmp_path):
    path = write(tmp_path, {"messages": [OK, [{"role": "user", "content": "only a question"}], OK,
                                         [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]]})
    with pytest.warns(DataWarning, match=rf"^{path}: 2 row\(s\) have no assistant turn and train nothing: rows 1, 3$"):
        ds = build_dataset(path, cfg(), tok, verbose=False)
    assert ds.loss_tokens.tolist()[1::2] == [0, 0]


def test_no_chat_template(tok, tmp_path):
    bare = load_tokenizer(bundled.path("tokenizer"))
    bare.chat_template = None
    with pytest.raises(DataError, match="the tokenizer has no chat template"):
        build_dataset(write(tmp_path, {"messages": [OK]}), cfg(), bare, verbose=False)
