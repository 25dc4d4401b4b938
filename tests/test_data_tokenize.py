"""Multi-turn and single-turn tokenisation: tokens equal the full chat-template rendering and the
loss mask selects exactly the assistant texts plus `<|im_end|>\\n` (single-turn: the response plus
the eos); truncation modes."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cfg import settings

from jaxsft import bundled
from jaxsft.data import DataError, DataWarning, build_dataset
from jaxsft.hf import load_tokenizer
from jaxsft.data.tokenize import ChatEncoder

END = "<|im_end|>\n"
TOOLS = [{"type": "function", "function": {"name": "run_python", "description": "Run code",
                                           "parameters": {"type": "object", "properties": {"code": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(bundled.path("tokenizer"))


def data_cfg(**overrides):
    keys = {"data.multiturn.enable": True, "data.max_length": 4096}
    return settings({**keys, **{f"data.{k}": v for k, v in overrides.items()}}).data


def write(tmp_path, columns, name="d.parquet"):
    path = tmp_path / name
    pq.write_table(pa.table(columns), path)
    return str(path)


def build(tok, tmp_path, chats, tools=None, **overrides):
    columns = {"messages": chats}
    if tools is not None:
        columns["tools"] = tools
    return build_dataset(write(tmp_path, columns), data_cfg(**overrides), tok, verbose=False)


def targets(tok, ds, i):
    ids, mask = ds.tokens(i)
    return tok.decode(ids[mask == 1])


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "You are terse."}
CALL = {"role": "assistant", "content": "Let me run it.",
        "tool_calls": [{"type": "function", "function": {"name": "run_python", "arguments": '{"code": "print(2+2)"}'}}]}
CALL_TEXT = ('Let me run it.\n<tool_call>\n{"name": "run_python", "arguments": "{\\"code\\": \\"print(2+2)\\"}"}\n'
             '</tool_call>' + END)

CASES = {
    "1-turn": [user("2+2?"), assistant("2+2 equals 4.")],
    "2-turn": [user("2+2?"), assistant("2+2 equals 4."), user("4+4?"), assistant("4+4 equals 8.")],
    "3-turn": [user("a"), assistant("b"), user("c"), assistant("d"), user("e"), assistant("f\n\ng")],
    "1-turn system": [SYSTEM, user("2+2?"), assistant("4")],
    "2-turn system": [SYSTEM, user("2+2?"), assistant("4"), user("and 3+3?"), assistant("6")],
    "3-turn system": [SYSTEM, user("x"), assistant("y"), user("z"), assistant(" w "), user("v"), assistant("```python\nu\n```")],
}


@pytest.mark.parametrize("with_tools", [False, True])
def test_masks_select_exactly_the_assistant_turns(tok, tmp_path, with_tools):
    chats = list(CASES.values())
    ds = build(tok, tmp_path, chats, tools=[TOOLS if with_tools else None] * len(chats))
    for i, chat in enumerate(chats):
        expected = "".join(m["content"] + END for m in chat if m["role"] == "assistant")
        assert targets(tok, ds, i) == expected, list(CASES)[i]
        full = tok.apply_chat_template(chat, tools=TOOLS if with_tools else None, tokenize=False)
        assert ds.tokens(i)[0].tolist() == tok(full, add_special_tokens=False)["input_ids"]
        item = ds[i]
        assert item["position_ids"].tolist() == list(range(len(item["input_ids"])))
        assert {k: v.dtype for k, v in item.items()} == {k: np.int32 for k in item}


def test_verl_reference_dialogue(tok, tmp_path):
    """verl's own unit-test expectation for a two-turn Qwen2.5 dialogue."""
    ds = build(tok, tmp_path, [CASES["2-turn"]])
    assert targets(tok, ds, 0) == "2+2 equals 4.<|im_end|>\n4+4 equals 8.<|im_end|>\n"


def test_template_prefixes(tok):
    enc = ChatEncoder(tok)
    assert tok.decode(enc.generation_prompt) == "<|im_start|>assistant\n"
    assert tok.decode(enc.system_prefix) == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. "
                                             "You are a helpful assistant.<|im_end|>\n")


def test_tool_calls_and_merged_tool_responses(tok, tmp_path):
    """Three turns with tools: an assistant tool call, two consecutive tool responses (Qwen merges
    them into one user block; rendered as one unit here, so no mismatch) and a final answer."""
    chat = [SYSTEM, user("Compute 2+2 twice."), CALL, {"role": "tool", "content": "4"},
            {"role": "tool", "content": "4"}, assistant("Both runs print 4.")]
    ds = build(tok, tmp_path, [chat], tools=[TOOLS])
    assert targets(tok, ds, 0) == CALL_TEXT + "Both runs print 4." + END
    full = tok.apply_chat_template(chat, tools=TOOLS, tokenize=False)
    assert full.count("<tool_response>") == 2 and full.count("<|im_start|>user") == 2
    assert ds.tokens(0)[0].tolist() == tok(full, add_special_tokens=False)["input_ids"]


def test_first_message_from_assistant_does_not_train_the_system_block(tok, tmp_path):
    ds = build(tok, tmp_path, [[assistant("Hello!"), user("hi"), assistant("Bye.")]])
    assert targets(tok, ds, 0) == "Hello!" + END + "Bye." + END


def test_mismatch_is_refused_or_kept_with_a_warning(tok, tmp_path):
    # A template that numbers the turns cannot be rendered message by message.
    tok2 = load_tokenizer(bundled.path("tokenizer"))
    tok2.chat_template = ("{%- for m in messages -%}{{- '<|im_start|>' + m.role + ' ' + loop.index|string + '\\n' + "
                          "m.content + '<|im_end|>\\n' -}}{%- endfor -%}"
                          "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")
    path = write(tmp_path, {"messages": [CASES["1-turn"], CASES["2-turn"]]})
    with pytest.raises(DataError, match=rf"^{path} row 0: the per-message tokens differ .* data.ignore_input_ids_mismatch=true"):
        build_dataset(path, data_cfg(), tok2, verbose=False)
    with pytest.warns(DataWarning, match="2 row"):
        ds = build_dataset(path, data_cfg(ignore_input_ids_mismatch=True), tok2, verbose=False)
    assert tok2.decode(ds.tokens(1)[0]).count("<|im_start|>user 1\n") == 2  # the per-message tokens


def test_enable_thinking_and_template_kwargs_reach_the_template(tok, tmp_path):
    tok2 = load_tokenizer(bundled.path("tokenizer"))
    tok2.chat_template = ("{%- for m in messages -%}{{- '<|im_start|>' + m.role + '\\n' + m.content + "
                          "(' [think]' if enable_thinking else '') + (' ' + tag if tag is defined else '') + "
                          "'<|im_end|>\\n' -}}{%- endfor -%}{%- if add_generation_prompt -%}"
                          "{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")
    path = write(tmp_path, {"messages": [CASES["1-turn"]] * 2, "enable_thinking": [True, None]})
    ds = build_dataset(path, data_cfg(apply_chat_template_kwargs={"tag": "T"}), tok2, verbose=False)
    assert tok2.decode(ds.tokens(0)[0]).count("[think] T") == 2
    assert "[think]" not in tok2.decode(ds.tokens(1)[0])
    ds = build_dataset(path, data_cfg(enable_thinking_default=True), tok2, verbose=False)
    assert tok2.decode(ds.tokens(1)[0]).count("[think]") == 2


def test_older_multiturn_messages_key_spelling(tok, tmp_path):
    path = write(tmp_path, {"conv": [CASES["1-turn"]]})
    ds = build_dataset(path, data_cfg(**{"multiturn.messages_key": "conv"}), tok, verbose=False)
    assert targets(tok, ds, 0) == "2+2 equals 4." + END


def test_single_turn_targets_are_the_response_and_eos(tok, tmp_path):
    path = write(tmp_path, {"question": ["What is 2+2?", "Name a colour."], "answer": ["4", "Blue, or red."]})
    ds = build_dataset(path, data_cfg(**{"multiturn.enable": False}), tok, verbose=False)
    for i, (q, a) in enumerate([("What is 2+2?", "4"), ("Name a colour.", "Blue, or red.")]):
        ids, mask = ds.tokens(i)
        assert tok.decode(ids[mask == 1]) == a + "<|im_end|>"
        assert mask[-1] == 1 and ids[-1] == tok.eos_token_id
        prompt = tok.apply_chat_template([user(q)], add_generation_prompt=True, tokenize=False)
        assert tok.decode(ids[mask == 0]) == prompt


def test_single_turn_dict_keys(tok, tmp_path):
    path = write(tmp_path, {"extra": [{"q": {"text": "Hi?"}}], "answer": ["Hello."]})
    cfg = data_cfg(**{"multiturn.enable": False, "prompt_key": "extra", "prompt_dict_keys": ["q", "text"]})
    ds = build_dataset(path, cfg, tok, verbose=False)
    ids, mask = ds.tokens(0)
    assert tok.decode(ids[mask == 0]).endswith("user\nHi?<|im_end|>\n<|im_start|>assistant\n")


def test_truncation_modes(tok, tmp_path):
    chat = [user("word " * 40), assistant("answer " * 40)]
    full = build(tok, tmp_path, [chat])
    ids, mask = full.tokens(0)
    n, t = len(ids), 60
    short = [user("2+2?"), assistant("4")]  # a row that keeps its targets (all rows at zero is an error)
    right = build(tok, tmp_path, [chat, short], max_length=t, truncation="right")
    assert right.tokens(0)[0].tolist() == ids[:t].tolist() and right.tokens(0)[1].tolist() == mask[:t].tolist()
    assert right.loss_tokens[0] == 0 and right.stats["truncated"] == 1  # the user turn fills the window
    left = build(tok, tmp_path, [chat], max_length=t, truncation="left")
    assert left.tokens(0)[0].tolist() == ids[n - t:].tolist() and left.tokens(0)[1].tolist() == mask[n - t:].tolist()
    assert left[0]["position_ids"].tolist() == list(range(t))
    with pytest.raises(DataError, match=rf"d.parquet row 0: {n} tokens exceed data.max_length={t} \(data.truncation=error"):
        build(tok, tmp_path, [chat], max_length=t, truncation="error")


def test_summary_and_max_samples(tok, tmp_path, capsys):
    chats = [CASES["1-turn"], CASES["2-turn"], CASES["3-turn"]]
    paths = [write(tmp_path, {"messages": chats}, "a.parquet"), write(tmp_path, {"messages": chats}, "b.parquet")]
    ds = build_dataset(paths, data_cfg(train_max_samples=4), tok, split="train", verbose=True)
    assert len(ds) == 4 and ds.origins[3] == (paths[1], 0)
    out = capsys.readouterr().out
    assert out.count("[jaxsft] train data: 4 rows from 2 file(s); tokens per row p50") == 1
    assert "0 row(s) with zero loss tokens" in out and f"{int(ds.loss_tokens.sum())} loss tokens" in out


def test_a_turn_shorter_than_the_generation_prompt_masks_no_more_than_its_tokens(tmp_path):
    """Issue 10: a Qwen3-style template whose generation prompt holds an empty think block (13
    tokens here) and a one-token answer (6 tokens alone). The turn is all prompt, as in verl, and
    the next row's mask is not shifted; every such turn is counted in one warning."""
    from reference.verl_cases import TEMPLATES

    tok3 = load_tokenizer(bundled.path("tokenizer"))
    tok3.chat_template = TEMPLATES["qwen3_thinking_off_by_default"]
    path = write(tmp_path, {"messages": [[user("2+2?"), assistant("4")], [user("Colours?"), assistant("Blue, red and green.")]]})
    with pytest.warns(DataWarning) as caught:
        ds = build_dataset(path, data_cfg(ignore_input_ids_mismatch=True), tok3, verbose=False)
    enc = ChatEncoder(tok3)
    assert len(enc.generation_prompt) == 13
    for i in range(2):
        ids, mask = ds.tokens(i)
        assert len(ids) == len(mask) and ds.offsets[i + 1] - ds.offsets[i] == len(ids)
    assert targets(tok3, ds, 0) == "" and ds.loss_tokens[0] == 0
    # verl's count: the first 13 tokens of the turn are not targets, 10 of them the turn's own
    assert targets(tok3, ds, 1) == tok3.decode(tok3("<|im_start|>assistant\nBlue, red and green.<|im_end|>\n",
                                                    add_special_tokens=False)["input_ids"][13:])
    (warning,) = [str(w.message) for w in caught if "do not start with" in str(w.message)]
    assert warning == (f"2 assistant turn(s) of {path} (first: {path} row 0) do not start with the template's generation "
                       f"prompt '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n'; as in verl, the first 13 tokens of "
                       f"each are not targets, so 13 of their own tokens are not trained")
