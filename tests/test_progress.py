"""Progress of the long waits (jaxsft.progress): a tqdm bar on stderr with rate and time left when
stderr is a terminal (monkeypatched here), nothing of it in a log beyond one line per phase with its
duration: tokenising and the data cache, the Hugging Face export, the first compile's line."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest
from cfg import settings

from jaxsft import bundled, compile_cache, progress
from jaxsft.data import build_dataset
from jaxsft.hf import load_tokenizer, write_weights

TRAIN = str(bundled.path("humaneval_chat", "train.parquet"))


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(bundled.path("tokenizer"))


def work(tmp_path, tok, name: str):
    """Tokenise 40 chats into a new data cache, read them back from it, and write 3 tensors as safetensors."""
    data = settings({"data.multiturn.enable": True, "data.max_length": 512, "data.truncation": "right",
                     "data.train_max_samples": 40}).data
    for _ in range(2):  # written, then read (and checked) from the cache
        build_dataset(TRAIN, data, tok, cache_dir=str(tmp_path / name), verbose=True)
    write_weights([(f"t{i}", np.ones((4, 4), np.float32)) for i in range(3)], tmp_path / f"{name}_hf", dtype="float32")


@pytest.mark.parametrize("terminal", [False, True])
def test_bars_on_a_terminal_only_and_one_line_per_phase(tmp_path, tok, capsys, monkeypatch, terminal):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal, raising=False)
    capsys.readouterr()  # (whatever loading the tokenizer said)
    work(tmp_path, tok, "t" if terminal else "log")
    out, err = capsys.readouterr()
    lines = out.splitlines()
    # the phase lines, with durations, either way
    assert re.search(r"tokenised \d+ tokens in [0-9.]+ s .*; written to the data cache \S+ in [0-9.]+ s$", lines[0])
    assert re.search(r"; read from the data cache \S+ in [0-9.]+ s$", lines[1])
    assert re.fullmatch(r"\[jaxsft\] Hugging Face weights: 0\.0 MB \(float32\) written in [0-9.]+ s", lines[2])
    assert len(lines) == 3, lines
    if not terminal:
        assert err == ""
        return
    # tqdm's bars: the phase, the count against its total, the rate and the time left
    for phase, unit in (("tokenising train.parquet", "row"), ("writing the data cache train-", "B"),
                        ("checking the data cache train-", "B"), ("writing safetensors", "tensor")):
        assert re.search(rf"{re.escape(phase)}.*\|.*\[[0-9:]+<[0-9:?]+, .*{unit}/s\]", err), (phase, err[-2000:])


def test_phase_says_its_line_only_when_it_ends_well(capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    with progress.phase("x", total=3, done=lambda s: f"x done in {s:.1f} s") as advance:
        advance(3)
    with pytest.raises(KeyError), progress.phase("y", done=lambda s: "never said"):
        raise KeyError("y")
    assert capsys.readouterr() == ("x done in 0.0 s\n", "")


def test_compile_line(tmp_path):
    assert compile_cache.compile_line(None).endswith("(trainer.compile_cache=false: every launch compiles it)")
    assert compile_cache.compile_line(str(tmp_path)) == \
        "[jaxsft] compiling the train step (first launch; later launches use the cache)"
    (tmp_path / "entry").write_bytes(b"")
    assert "reading the train step from the compilation cache" in compile_cache.compile_line(str(tmp_path))
