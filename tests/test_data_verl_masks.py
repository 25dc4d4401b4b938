"""jaxsft's token ids and loss masks against verl's own MultiTurnSFTDataset (verl 0.7.0), recorded
by tests/reference/verl_masks.py in tests/reference/verl_masks.json for the chats of
tests/reference/verl_cases.py. Row by row: equal wherever jaxsft claims verl's semantics; where it
deviates (docs/DATA.md), the difference is exactly the documented one."""

import json
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cfg import settings

from jaxsft import bundled
from jaxsft.data import build_dataset
from jaxsft.hf import load_tokenizer
from jaxsft.data.source import ChatRow
from jaxsft.data.tokenize import ChatEncoder
from reference.verl_cases import CASES, TEMPLATES, columns, digest

RECORDED = json.loads((Path(__file__).parent / "reference" / "verl_masks.json").read_text())


def tokenizer(template):
    tok = load_tokenizer(bundled.path("tokenizer"))
    if template is not None:
        tok.chat_template = template
    return tok


def data_cfg(config):
    return settings({"data.multiturn.enable": True, "data.max_length": RECORDED["max_length"],
                     "data.ignore_input_ids_mismatch": config["ignore_input_ids_mismatch"],
                     "data.apply_chat_template_kwargs": dict(config["apply_chat_template_kwargs"])}).data


def jaxsft_rows(c, tmp_path):
    path = tmp_path / "case.parquet"
    pq.write_table(pa.table(columns(c)), path)
    tok = tokenizer(TEMPLATES[c["template"]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mismatch / generation-prompt warnings are tested elsewhere
        ds = build_dataset(str(path), data_cfg(c["config"]), tok, verbose=False)
    return tok, [tuple(a.tolist() for a in ds.tokens(i)) for i in range(len(ds))]


def full_rendering(tok, r, kwargs):
    thinking = r.get("enable_thinking")
    kw = {**kwargs, **({} if thinking is None else {"enable_thinking": thinking})}
    text = tok.apply_chat_template(r["messages"], tools=r.get("tools"), tokenize=False, **kw)
    return tok(text, add_special_tokens=False)["input_ids"]


def targets(tok, ids, mask):
    return tok.decode([t for t, m in zip(ids, mask) if m])


def test_recording_is_current():
    """Regenerate tests/reference/verl_masks.json (see verl_masks.py) whenever a case changes."""
    assert list(RECORDED["cases"]) == [c["name"] for c in CASES]
    assert {c["name"]: digest(c) for c in CASES} == {n: v["digest"] for n, v in RECORDED["cases"].items()}
    assert RECORDED["versions"]["verl"] == "0.7.0"


@pytest.mark.parametrize("c", CASES, ids=[c["name"] for c in CASES])
def test_ids_and_masks_against_verl(c, tmp_path):
    verl = RECORDED["cases"][c["name"]]
    tok, mine = jaxsft_rows(c, tmp_path)
    assert len(mine) == len(verl["rows"]) == len(c["rows"])
    enc = ChatEncoder(tok, c["config"]["apply_chat_template_kwargs"])
    assert (enc.system_prefix, enc.generation_prompt) == (verl["system_prompt"], verl["generation_prompt"])
    for i, ((ids, mask), ref, r) in enumerate(zip(mine, verl["rows"], c["rows"])):
        assert len(ids) == len(mask), f"row {i}"
        check = CHECKS[c["expect"]]
        check(tok, ids, mask, ref, r=r, c=c, enc=enc, verl=verl, row=i)


def same(tok, ids, mask, ref, row, **_):
    assert ids == ref["input_ids"], f"row {row}: ids differ from verl's"
    assert mask == ref["loss_mask"], f"row {row}: loss mask differs from verl's"


def consecutive_tool_messages(tok, ids, mask, ref, r, c, row, **_):
    """jaxsft renders a run of tool messages as one unit: its ids are the whole conversation's.
    verl refuses the row, or (mismatch ignored) trains a per-message split Qwen never produces."""
    assert ids == full_rendering(tok, r, c["config"]["apply_chat_template_kwargs"]), f"row {row}"
    if not c["config"]["ignore_input_ids_mismatch"]:
        assert ref["error"].startswith("AssertionError: MultiTurnSFTDataset apply_chat_template to each turn")
        return
    theirs = tok.decode(ref["input_ids"])
    assert theirs.count("<|im_start|>user") == tok.decode(ids).count("<|im_start|>user") + 1
    assert targets(tok, ids, mask) == targets(tok, ref["input_ids"], ref["loss_mask"])


def assistant_first(tok, ids, mask, ref, enc, **_):
    """verl masks only the generation prompt of a first assistant turn, so the default system block
    the template puts before it becomes a target; jaxsft masks that block too."""
    assert ids == ref["input_ids"]
    differ = [t for t, (a, b) in enumerate(zip(mask, ref["loss_mask"])) if a != b]
    sp, gp = len(enc.system_prefix), len(enc.generation_prompt)
    assert differ == list(range(gp, sp + gp)) and not any(mask[t] for t in differ)
    assert targets(tok, ids, mask) == "Hello!<|im_end|>\nBye.<|im_end|>\n"


def arrow_nulls(tok, ids, mask, ref, r, enc, row, verl, c, **_):
    """Arrow gives every row the union of all rows' struct keys; jaxsft renders what the row holds,
    i.e. exactly the chat rendered from the Python objects; verl renders the extra keys as null."""
    (py_ids, py_mask), = enc.encode([ChatRow(r["messages"], r.get("tools"), None)], "python objects")
    assert (ids, mask) == (py_ids.tolist(), py_mask.tolist()), f"row {row}"
    if ids != ref["input_ids"]:
        assert '": null' in tok.decode(ref["input_ids"]) and '": null' not in tok.decode(ids)
    if row == 0:  # the case shows the difference
        assert ids != ref["input_ids"]


def tool_specs_as_json_strings(tok, ids, mask, ref, r, enc, **_):
    """A list of JSON strings reaches verl's template as strings (transformers refuses them);
    jaxsft decodes each spec: the row renders as with the spec objects."""
    assert ref["error"].startswith("ValueError: Tools should either be a JSON schema")
    (py_ids, py_mask), = enc.encode([ChatRow(r["messages"], [json.loads(t) for t in r["tools"]], None)], "python objects")
    assert (ids, mask) == (py_ids.tolist(), py_mask.tolist())


CHECKS = {"same": same, "consecutive_tool_messages": consecutive_tool_messages, "assistant_first": assistant_first,
          "arrow_nulls": arrow_nulls,
          "tool_specs_as_json_strings": tool_specs_as_json_strings}


def test_every_deviation_is_exercised():
    assert {c["expect"] for c in CASES} == set(CHECKS)
