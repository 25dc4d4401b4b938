"""The bundled HumanEval chats and tokenizer: they load, mask correctly, tokenise fast, and pack."""

import pyarrow.parquet as pq
import pytest
from cfg import settings
from transformers import AutoTokenizer

from jaxsft import bundled
from jaxsft.data import TrainLoader, build_dataset
from jaxsft.hf import load_tokenizer

TRAIN = str(bundled.path("humaneval_chat", "train.parquet"))
VAL = str(bundled.path("humaneval_chat", "val.parquet"))


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(bundled.path("tokenizer"))


def cfg(max_length):
    return settings({"data.multiturn.enable": True, "data.max_length": max_length, "data.truncation": "right"}).data


def test_tokenizer_loads_like_a_qwen_tokenizer():
    tok = AutoTokenizer.from_pretrained(str(bundled.path("tokenizer")))
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert 1000 <= len(tok) <= 2100
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_bundled_chats_mask_the_assistant_turns(tok):
    rows = pq.read_table(TRAIN).column("messages").to_pylist()
    assert len(rows) == 150 and pq.read_table(VAL).num_rows == 14
    assert any(len(r) == 5 for r in rows) and any(r[0]["role"] == "system" for r in rows)
    ds = build_dataset(TRAIN, cfg(4096), tok, verbose=False)
    assert ds.stats["truncated"] == 0
    for i in range(0, 150, 7):
        ids, mask = ds.tokens(i)
        assert tok.decode(ids[mask == 1]) == "".join(m["content"] + "<|im_end|>\n" for m in rows[i] if m["role"] == "assistant")


def test_tokenising_the_bundled_data_is_fast(tok):
    build_dataset(VAL, cfg(4096), tok, verbose=False)  # warm the template cache
    ds = build_dataset(TRAIN, cfg(4096), tok, verbose=False)
    seconds = ds.stats["seconds"]
    rows_per_s, tokens_per_s = len(ds) / seconds, int(ds.lengths.sum()) / seconds
    print(f"\ntokenised {len(ds)} rows / {int(ds.lengths.sum())} tokens in {seconds:.3f} s: "
          f"{rows_per_s:.0f} rows/s, {tokens_per_s:.0f} tokens/s")
    assert rows_per_s > 20  # generous: a shared 2-core CPU does several hundred


@pytest.mark.parametrize("max_length,batch,micro", [(512, 8, 4), (1280, 16, 4)])
def test_packing_efficiency_on_the_bundled_data(tok, max_length, batch, micro):
    ds = build_dataset(TRAIN, cfg(max_length), tok, verbose=False)
    eff = {}
    for packing in ("none", "first_fit", "best_fit"):
        ld = TrainLoader(ds, train_batch_size=batch, micro_batch_size_per_gpu=micro, dp=1, max_length=max_length,
                         packing=packing, seed=42, total_epochs=2, verbose=False)
        eff[packing] = (ld.num_micro_batches, ld.efficiency["real_tokens"], ld.efficiency["loss_tokens"])
        print(f"\nmax_length={max_length} batch={batch} micro={micro} packing={packing}: {ld.describe()}")
    assert eff["first_fit"][0] <= eff["none"][0] and eff["best_fit"][0] <= eff["none"][0]
    assert eff["first_fit"][2] >= eff["none"][2]
