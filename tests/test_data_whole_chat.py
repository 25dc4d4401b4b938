"""data.multiturn.mask_mode=whole_chat (issue 24) with the chat templates as published by Qwen2.5,
Qwen3 and Llama 3.1 (tests/chat_templates/README.md says where each came from): the ids are the
whole conversation as apply_chat_template tokenises it; the loss covers each assistant turn as
rendered there and nothing else (the expected target texts are written out by hand from the
templates); on a template that composes per message the tokens and masks are per_message's, row
by row; per_message keeps verl's semantics on Qwen3 (the issue's chat) and says what it drops."""

import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cfg import settings

from jaxsft import bundled
from jaxsft.data import DataError, DataWarning, build_dataset, summary
from jaxsft.data.source import ChatRow
from jaxsft.data.tokenize import ChatEncoder
from jaxsft.data.whole_chat import WholeChatEncoder, turn_markers
from jaxsft.hf import load_tokenizer

TEMPLATES = Path(__file__).parent / "chat_templates"
TOOLS = [{"type": "function", "function": {"name": "run_python", "description": "Run code",
                                           "parameters": {"type": "object", "properties": {"code": {"type": "string"}}}}}]
END, EOT = "<|im_end|>\n", "<|eot_id|>"


def tokenizer(name=None, *, tokens=(), special=(), bos=None):
    tok = load_tokenizer(bundled.path("tokenizer"))
    if name:
        tok.chat_template = (TEMPLATES / name).read_text()
    tok.add_tokens(list(tokens))
    tok.add_tokens(list(special), special_tokens=True)
    if bos:
        tok.bos_token = bos
    return tok


@pytest.fixture(scope="module")
def qwen25():
    return tokenizer("Qwen-Qwen2.5-7B-Instruct.jinja")


@pytest.fixture(scope="module")
def qwen3():
    return tokenizer("Qwen-Qwen3-0.6B.jinja", tokens=["<think>", "</think>"])


@pytest.fixture(scope="module")
def llama3():
    return tokenizer("meta-llama-Llama-3.1-8B-Instruct.jinja", bos="<|begin_of_text|>",
                     special=["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                              "<|eom_id|>", "<|python_tag|>"])


def u(text):
    return {"role": "user", "content": text}


def a(text, **extra):
    return {"role": "assistant", "content": text, **extra}


def call(content, arguments):
    return a(content, tool_calls=[{"type": "function", "function": {"name": "run_python", "arguments": arguments}}])


SYS = {"role": "system", "content": "You are terse."}
ISSUE_CHAT = [u("q0"), a("<think>\nreason 0\n</think>\n\nanswer 0"), u("more"), a("<think>\nr2 0\n</think>\n\nok 0")]


def whole(tok, chat, tools=None, **kw):
    (ids, mask), = WholeChatEncoder(tok, **kw).encode([ChatRow(chat, tools, None)], "chat.parquet")
    assert len(ids) == len(mask)
    return ids.tolist(), mask


def runs(tok, ids, mask):
    """The decoded text of each maximal run of target tokens."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    return [tok.decode(ids[s:e]) for s, e in zip(edges[::2], edges[1::2])]


def rendered_ids(tok, chat, tools=None):
    return tok.apply_chat_template(chat, tools=tools, tokenize=True, return_dict=True)["input_ids"]


def write(tmp_path, chats, name="d.parquet", **columns):
    path = tmp_path / name
    pq.write_table(pa.table({"messages": chats, **columns}), path)
    return str(path)


def data_cfg(**overrides):
    keys = {"data.multiturn.enable": True, "data.max_length": 4096, "data.truncation": "right"}
    return settings({**keys, **{f"data.{k}": v for k, v in overrides.items()}}).data


def build(path, tok, **overrides):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = build_dataset(path, data_cfg(**overrides), tok, verbose=False)
    return ds, [str(w.message) for w in caught if issubclass(w.category, DataWarning)]


def test_turn_markers_of_the_published_templates(qwen25, qwen3, llama3):
    assert turn_markers(qwen25) == turn_markers(qwen3) == ("<|im_start|>assistant\n", END)
    assert turn_markers(llama3) == ("<|start_header_id|>assistant<|end_header_id|>\n\n", EOT)


def test_qwen3_issue_chat_per_message_is_verls_and_whole_chat_trains_the_kept_reasoning(qwen3, tmp_path):
    path = write(tmp_path, [ISSUE_CHAT])
    with pytest.raises(DataError, match=rf"^{path} row 0: the per-message tokens differ .*Either set "
                                        r"data.multiturn.mask_mode=whole_chat .* or data.ignore_input_ids_mismatch=true"):
        build(path, qwen3)
    # verl 0.9.1 with +data.ignore_input_ids_mismatch=true (the issue's check): the loss covers
    # exactly these two texts, no reasoning at all; jaxsft's per_message keeps that and says so.
    ds, said = build(path, qwen3, ignore_input_ids_mismatch=True)
    assert runs(qwen3, *ds.tokens(0)) == ["answer 0" + END, "ok 0" + END]
    assert said[0].startswith(f"1 row(s) of {path} differ from the whole-conversation rendering; trained on the "
                              f"per-message tokens, as verl")
    assert said[1].startswith("1 of those row(s) hold assistant reasoning that the per-message renders drop")
    assert "as in verl" in said[1] and "mask_mode=whole_chat" in said[1] and len(said) == 2
    # whole_chat: Qwen3 keeps the reasoning of the turn after the last user message only.
    ds, said = build(path, qwen3, **{"multiturn.mask_mode": "whole_chat"})
    ids, mask = ds.tokens(0)
    assert ids.tolist() == rendered_ids(qwen3, ISSUE_CHAT)
    assert runs(qwen3, ids, mask) == ["answer 0" + END, "<think>\nr2 0\n</think>\n\nok 0" + END]
    assert said == [f"1 row(s) of {path} hold assistant reasoning that the chat template leaves out of the conversation "
                    f"(Qwen3's drops it from the turns before the last user message): those turns train on their "
                    f"answers only, as the model sees them"]


def test_qwen3_reasoning_tool_calls_and_several_user_turns(qwen3):
    reasoned_call = call("<think>\nI should run it.\n</think>\n\nLet me run it.", '{"code": "print(2+2)"}')
    call_text = '<tool_call>\n{"name": "run_python", "arguments": {"code": "print(2+2)"}}\n</tool_call>'
    chat = [SYS, u("Compute 2+2."), reasoned_call, {"role": "tool", "content": "4"},
            a("<think>\nIt printed 4.\n</think>\n\nIt is 4."), u("And 3+3?"), a("6")]
    ids, mask = whole(qwen3, chat, TOOLS)
    assert ids == rendered_ids(qwen3, chat, TOOLS)
    # Before the last user message: no reasoning; the last turn: an empty think block (the template's).
    assert runs(qwen3, np.array(ids), mask) == ["Let me run it.\n" + call_text + END, "It is 4." + END,
                                                "<think>\n\n</think>\n\n6" + END]
    # A multi-step tool call after the last user message: both turns keep their reasoning.
    chat = [u("Compute 2+2."), reasoned_call, {"role": "tool", "content": "4"}, a("<think>\nIt printed 4.\n</think>\n\nIt is 4.")]
    ids, mask = whole(qwen3, chat, TOOLS)
    assert ids == rendered_ids(qwen3, chat, TOOLS)
    assert runs(qwen3, np.array(ids), mask) == ["<think>\nI should run it.\n</think>\n\nLet me run it.\n" + call_text + END,
                                                "<think>\nIt printed 4.\n</think>\n\nIt is 4." + END]
    # reasoning_content instead of <think> in the content renders (and trains) the same
    ids, mask = whole(qwen3, [u("q0"), a("ok 0", reasoning_content="r2 0")])
    assert runs(qwen3, np.array(ids), mask) == ["<think>\nr2 0\n</think>\n\nok 0" + END]


def test_llama3_with_tool_calls_and_several_user_turns(llama3):
    chat = [SYS, u("2+2?"), a(" 4 "), u("and 3+3?"), a("6")]
    ids, mask = whole(llama3, chat)
    assert ids == rendered_ids(llama3, chat) and ids[0] == llama3.bos_token_id
    assert runs(llama3, np.array(ids), mask) == ["4" + EOT, "6" + EOT]  # Llama trims the content
    (pm_ids, pm_mask), = ChatEncoder(llama3).encode([ChatRow(chat, None, None)], "chat.parquet")
    assert (pm_ids.tolist(), pm_mask.tolist()) == (ids, mask.tolist())  # it composes per message
    chat = [u("Compute 2+2."), call("", {"code": "print(2+2)"}), {"role": "tool", "content": "4"}, a("It is 4."),
            u("Thanks."), a("You are welcome.")]
    ids, mask = whole(llama3, chat, TOOLS)
    assert ids == rendered_ids(llama3, chat, TOOLS)
    assert runs(llama3, np.array(ids), mask) == ['{"name": "run_python", "parameters": {"code": "print(2+2)"}}' + EOT,
                                                 "It is 4." + EOT, "You are welcome." + EOT]


def test_qwen3_on_the_bundled_data(qwen3):
    """Every row (1 or 2 turns, system or not) differs per message, so per_message stops at row 0
    as verl does; whole_chat's ids are the rendering and its targets the turns as Qwen3 renders
    them: the last one with its (empty) think block."""
    path = str(bundled.path("humaneval_chat", "train.parquet"))
    with pytest.raises(DataError, match=rf"^{path} row 0: the per-message tokens differ"):
        build(path, qwen3)
    ds, said = build(path, qwen3, **{"multiturn.mask_mode": "whole_chat"})
    chats = pq.read_table(path).column("messages").to_pylist()
    assert len(ds) == len(chats) == 150 and not said
    for i, chat in enumerate(chats):
        ids, mask = ds.tokens(i)
        assert ids.tolist() == rendered_ids(qwen3, chat), i
        answers = [m["content"] + END for m in chat if m["role"] == "assistant"]
        answers[-1] = "<think>\n\n</think>\n\n" + answers[-1]
        assert runs(qwen3, ids, mask) == answers, i


@pytest.mark.parametrize("template", ["bundled", "published"])
def test_qwen25_whole_chat_equals_per_message_row_by_row(qwen25, tmp_path, template):
    """The bundled data, and verl's Qwen2.5 reference cases (1-3 turns, system or not, tools, tool
    calls, consecutive tool messages, empty answers, assistant first, struct cells), one file each."""
    from reference.verl_cases import CASES, columns

    tok = qwen25 if template == "published" else load_tokenizer(bundled.path("tokenizer"))
    files = [str(bundled.path("humaneval_chat", f)) for f in ("train.parquet", "val.parquet")]
    for k, case in enumerate(c for c in CASES if c["template"] == "qwen25"):
        pq.write_table(pa.table(columns(case)), tmp_path / f"case{k}.parquet")
        files.append(str(tmp_path / f"case{k}.parquet"))
    per, _ = build(files, tok)
    whole_ds, said = build(files, tok, **{"multiturn.mask_mode": "whole_chat"})
    assert len(per) == len(whole_ds) > 170 and not said
    for i in range(len(per)):
        (pi, pm), (wi, wm) = per.tokens(i), whole_ds.tokens(i)
        assert pi.tolist() == wi.tolist() and pm.tolist() == wm.tolist(), per.origins[i]
    assert per.loss_tokens.sum() > 0


def test_generation_markers_decide_the_targets(tmp_path):
    """A template with {% generation %} (written for this test): its markers enclose the content
    only, so the targets are the content without the end-of-turn text the offsets would add."""
    tok = tokenizer()
    tok.chat_template = ("{%- for m in messages -%}{%- if m.role == 'assistant' -%}{{- '<|im_start|>assistant\\n' -}}"
                         "{%- generation -%}{{- m.content -}}{%- endgeneration -%}{{- '<|im_end|>\\n' -}}"
                         "{%- else -%}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}{%- endif -%}"
                         "{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")
    chat = [u("a"), a("b c"), u("d"), a("e")]
    ids, mask = whole(tok, chat)
    assert ids == rendered_ids(tok, chat) and runs(tok, np.array(ids), mask) == ["b c", "e"]


@pytest.mark.parametrize("rewrite", ["replace('hello', 'hi')", "upper"])
def test_turns_that_cannot_be_located_are_an_error_naming_the_row(tmp_path, rewrite):
    """Templates (edited for this test) that rewrite an assistant's answer: a row whose answer is
    not in its turn (row 1: 'hello'), or every row when even the probe turn is rewritten."""
    tok = tokenizer()
    tok.chat_template = tok.chat_template.replace("'<|im_start|>assistant\\n' + message.content",
                                                  f"'<|im_start|>assistant\\n' + message.content | {rewrite}")
    assert f"| {rewrite}" in tok.chat_template
    path = write(tmp_path, [[u("2+2?"), a("4")], [u("Hi"), a("hello")]])
    expected = (rf"^{path} row 1: cannot locate the assistant turns in the whole-chat rendering \(each should start "
                r"after '<\|im_start\|>assistant\\n', hold its answer and end with '<\|im_end\|>\\n'\); "
                if rewrite != "upper" else
                rf"^{path} row 0: cannot locate the assistant turns of the whole-chat rendering: a probe assistant turn "
                r"does not render its content, .* and the template has no \{% generation %\} markers; ")
    with pytest.raises(DataError, match=expected + r"use data.multiturn.mask_mode=per_message \(verl's per-message "
                                                   r"rendering\) for this template$"):
        build(path, tok, **{"multiturn.mask_mode": "whole_chat"})


def test_truncation_summary_and_cache_key_follow_the_mode(qwen3, tmp_path, capsys):
    path = write(tmp_path, [ISSUE_CHAT, [u("2+2?"), a("4")]])
    full, _ = build(path, qwen3, **{"multiturn.mask_mode": "whole_chat"})
    ids, mask = full.tokens(0)
    t = len(ids) - 4
    for side, keep in (("right", slice(0, t)), ("left", slice(len(ids) - t, None))):
        cut, _ = build(path, qwen3, max_length=t, truncation=side, **{"multiturn.mask_mode": "whole_chat"})
        assert cut.tokens(0)[0].tolist() == ids[keep].tolist() and cut.tokens(0)[1].tolist() == mask[keep].tolist()
    assert "(whole_chat masks)" in summary(full)
    notes = settings({"data.multiturn.enable": True, "data.multiturn.mask_mode": "whole_chat",
                      "data.ignore_input_ids_mismatch": True}).notes
    assert any(n.startswith("data.ignore_input_ids_mismatch=True has no effect") for n in notes)
    # Packing: both samples in one row, each with its own ids and whole_chat mask.
    from jaxsft.data import TrainLoader

    _, batch = next(TrainLoader(full, train_batch_size=2, micro_batch_size_per_gpu=2, dp=1, max_length=int(full.lengths.sum()),
                                packing="first_fit", pad_token_id=0, verbose=False))
    seg = batch["segment_ids"].reshape(-1, batch["segment_ids"].shape[-1])
    packed = {(tuple(batch["input_ids"].reshape(seg.shape)[r][seg[r] == v].tolist()),
               tuple(batch["loss_mask"].reshape(seg.shape)[r][seg[r] == v].tolist()))
              for r in range(len(seg)) for v in set(seg[r].tolist()) - {0}}
    assert packed == {(tuple(full.tokens(i)[0].tolist()), tuple(full.tokens(i)[1].tolist())) for i in range(2)}
    assert (seg > 0).any(axis=1).sum() == 1  # one row holds both
    from jaxsft.data import cache as data_cache

    cache = data_cache.DataCache(tmp_path / "cache")
    keys = {mode: cache.key([path], data_cfg(**{"multiturn.mask_mode": mode}), qwen3, "train").name
            for mode in ("per_message", "whole_chat")}
    assert keys["per_message"] != keys["whole_chat"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reasoning Qwen3 leaves out: tested above
        cached = [build_dataset(path, data_cfg(**{"multiturn.mask_mode": "whole_chat"}), qwen3, verbose=True,
                                cache_dir=tmp_path / "cache") for _ in range(2)]
    assert cached[1].stats["cache"]["hit"] and "(whole_chat masks)" in summary(cached[1])
    assert [cached[1].tokens(i)[1].tolist() for i in range(2)] == [full.tokens(i)[1].tolist() for i in range(2)]
    assert capsys.readouterr().out.count("(whole_chat masks)") == 2


def test_worker_processes_build_what_this_process_builds(qwen3, tmp_path, monkeypatch):
    """data.tokenize_workers: whole_chat tokenised in worker processes (jaxsft.data.workers, each
    with its own unpickled copy of the tokenizer and its published Qwen3 template) gives exactly the
    ids, masks, statistics and warnings of this process: chats with reasoning before and after the
    last user turn, tool calls and several user turns, in two slices."""
    from jaxsft.data import workers

    monkeypatch.setattr(workers, "PARALLEL_MIN_ROWS", 520)  # a small file, still two slices (512 + 8 rows)
    reasoned_call = call("<think>\nrun it\n</think>\n\nRunning.", '{"code": "print(1)"}')
    shapes = [ISSUE_CHAT, [SYS, u("Compute."), reasoned_call, {"role": "tool", "content": "1"}, a("It is 1.")],
              [u("hi"), a("<think>\nshort\n</think>\n\nhello")], [u("a"), a("b"), u("c"), a("d"), u("e"), a("f")]]
    chats = [[dict(m, content=f"{m['content']} {i}") if m["role"] == "user" else m for m in shapes[i % 4]]
             for i in range(520)]
    path = write(tmp_path, chats, tools=[None if i % 4 != 1 else TOOLS for i in range(520)])
    started = []
    start = workers.Workers._start
    monkeypatch.setattr(workers.Workers, "_start", lambda self: started.append(1) or start(self))
    here, said_here = build(path, qwen3, **{"multiturn.mask_mode": "whole_chat", "tokenize_workers": 1})
    assert not started and here.stats["processes"] == 1
    pool, said_pool = build(path, qwen3, **{"multiturn.mask_mode": "whole_chat", "tokenize_workers": 2})
    assert started == [1]  # every slice went to the pool (which worker took which is the pool's choice)
    assert np.array_equal(pool.input_ids, here.input_ids) and np.array_equal(pool.loss_mask, here.loss_mask)
    assert list(pool.origins) == list(here.origins) and pool.fingerprint == here.fingerprint
    assert said_pool == said_here and said_here[0].startswith(f"130 row(s) of {path} hold assistant reasoning")
    assert here.tokens(0)[0].tolist() == rendered_ids(qwen3, chats[0])
    assert runs(qwen3, *here.tokens(0)) == ["answer 0" + END, "<think>\nr2 0\n</think>\n\nok 0" + END]
