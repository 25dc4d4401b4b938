"""Progress of the long waits (jaxsft.progress): a tqdm bar on stderr with rate and time left when
stderr is a terminal (monkeypatched here), nothing of it in a log beyond one line per phase with its
duration: tokenising and the data cache, the Hugging Face export, the first compile's line."""

from __future__ import annotations

import re
import sys
from pathlib import Path

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


_IN_A_PROCESS = """
import sys, pathlib
sys.path.insert(0, {tests!r})
from test_progress import tok_for_child, work
work(pathlib.Path({tmp!r}), tok_for_child(), {name!r})
"""


def tok_for_child():
    return load_tokenizer(bundled.path("tokenizer"))


@pytest.mark.slow  # two processes that import jax and transformers (~10 s each here)
def test_bars_in_a_real_pseudo_terminal_and_not_in_a_pipe(tmp_path):
    """The same work in a process whose stderr is a pseudo-terminal (pty.openpty: the bars are
    drawn, with rate and time left) and in one whose stderr is a pipe (only the phase lines, on
    stdout; stderr holds no bar)."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import termios

    from e2e import env_for

    def command(name):
        return [sys.executable, "-c", _IN_A_PROCESS.format(tests=str(Path(__file__).parent), tmp=str(tmp_path), name=name)]

    master, slave = pty.openpty()
    # a terminal 120 columns wide (a new pty has 0: tqdm's dynamic width would draw nothing in it)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(command("pty"), env=env_for(1), stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    seen = b""
    try:
        while True:  # read as it comes (a full pty would block the child)
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer closed its end
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(master)
        proc.stdout.read()
    assert proc.wait(timeout=300) == 0, seen[-3000:]
    bars = seen.decode(errors="replace")
    for phase, unit in (("tokenising train.parquet", "row"), ("writing safetensors", "tensor")):
        assert re.search(rf"{re.escape(phase)}.*\|.*\[[0-9:]+<[0-9:?]+, .*{unit}/s\]", bars), (phase, bars[-2000:])
    piped = subprocess.run(command("pipe"), env=env_for(1), capture_output=True, timeout=300)
    assert piped.returncode == 0, piped.stderr[-3000:]
    assert b"%|" not in piped.stderr and b"it/s" not in piped.stderr, piped.stderr[-2000:]
    assert len(piped.stdout.decode().splitlines()) == 3, piped.stdout


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
