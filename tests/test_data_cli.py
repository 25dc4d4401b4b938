"""Data that used to train silently wrong (NaN loss, zero loss tokens: exit 0) or crash with a
traceback now stops `python -m jaxsft.train` with one `jaxsft: error:` line naming the file and
row, exit 2, before any training (the command's own `jaxsft.train.main`, in this process:
tests/runs.py)."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import runs

from jaxsft import bundled


def small_vocab_model(path, vocab_size):
    """The tiny model with an embedding table smaller than the tokenizer (an unresized model)."""
    from safetensors.numpy import save_file
    from transformers import AutoTokenizer

    from jaxsft import tiny

    tok = AutoTokenizer.from_pretrained(str(bundled.path("tokenizer")))
    config = tiny.tiny_qwen2_config(vocab_size, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    path.mkdir(parents=True)
    config.save_pretrained(path)
    save_file(tiny.random_hf_tensors(config), str(path / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(path)
    return path


def not_utf8(path):
    """The bundled chats with row 5's first message holding Latin-1 bytes."""
    chats = pq.read_table(bundled.path("humaneval_chat", "train.parquet")).column("messages").to_pylist()[:8]
    raw = [m["content"].encode() for c in chats for m in c]
    first = sum(len(c) for c in chats[:5])
    raw[first] = b"caf\xe9 " + raw[first]
    offsets = np.cumsum([0] + [len(b) for b in raw]).astype(np.int32)
    content = pa.Array.from_buffers(pa.string(), len(raw), [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(b"".join(raw))])
    roles = pa.array([m["role"] for c in chats for m in c])
    messages = pa.StructArray.from_arrays([roles, content], names=["role", "content"])
    starts = np.cumsum([0] + [len(c) for c in chats]).astype(np.int32)
    pq.write_table(pa.table({"messages": pa.ListArray.from_arrays(pa.array(starts), messages)}), path)
    return path


@pytest.mark.parametrize("case", ["vocab", "zero loss tokens", "not utf-8"])
def test_data_errors_stop_the_run_in_one_line(tmp_path, base_model, case):
    train = str(bundled.path("humaneval_chat", "train.parquet"))
    if case == "vocab":  # <|im_end|> (1538) is past the table: every row; the pad id 1536 is inside
        model, args, expect = small_vocab_model(tmp_path / "model", 1538), [], \
            f"{train} row 0: token id 1538 ('<|im_end|>') is outside the model's vocabulary (vocab_size=1538;"
    elif case == "zero loss tokens":  # 24 tokens keep only the default system block of every chat
        model, args, expect = base_model, ["--config.data.max_length=24"], \
            f"{train}: the training data has no loss tokens, none of its 150 row(s) keeps an assistant token"
    else:
        bad = not_utf8(tmp_path / "bad.parquet")
        model, args, expect = base_model, [f"--config.data.train_files={bad}"], \
            f"{bad} row 5: column 'messages' holds text that is not valid UTF-8"
    proc = runs.train(tmp_path / "run", model, *args, check=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("jaxsft: error:")]
    assert len(errors) == 1 and errors[0].startswith(f"jaxsft: error: {expect}"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
