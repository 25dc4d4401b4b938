"""The hostile re-test of issue 11: break jaxsft as a user (or a machine) would, through the command
line, and record for each case the promise and whether it was kept.

    python tests/hostile/run_hostile.py [--only SUBSTRING ...] [--tree DIR] [--json OUT] [--keep DIR]

Promises: a user's mistake is ONE `jaxsft: error:` line naming the file/key, exit 2, no traceback,
nothing trained; a killed, preempted, damaged or full-disk run resumes EXACTLY (every logged
train/loss, lr, grad norm, loss-token count and epoch equal to an unbroken run's); what cannot be
resumed safely is REFUSED in one line. `--tree` runs another checkout's jaxsft with these cases
(e.g. an export of main, to see which cases it fails). Not run in CI: about 40 minutes on 2 busy
cores. Needs a private tmpfs (root or user namespaces) for the full-disk cases, and drops root's
file overrides (tests/unprivileged.py) for the permission cases.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import small_disk  # noqa: E402
import unprivileged  # noqa: E402

TREE = TESTS.parent  # the jaxsft under test (--tree)
FAST = ("--config.data.max_length=256", "--config.data.train_batch_size=8", "--config.data.micro_batch_size_per_gpu=1",
        "--config.data.packing=none", "--config.data.train_max_samples=24", "--config.data.val_files=None",
        "--config.trainer.total_epochs=2", "--config.trainer.test_freq=-1",
        "--config.trainer.checkpoint.save_contents=('model','optimizer','extra')")
EXACT = ("train/loss", "train/lr", "train/grad_norm", "train/loss_tokens", "train/epoch")
CASES: list[tuple[str, str, str, object]] = []  # (group, name, promise, function)


def add(group: str, name: str, promise: str, fn) -> None:
    CASES.append((group, name, promise, fn))


def case(group: str, promise: str):
    """Register the decorated function as a case named after it."""
    def register(fn):
        add(group, fn.__name__, promise, fn)
        return fn
    return register


# ---- running the command line ---------------------------------------------------------------------

def env(devices: int) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COORDINATOR")}
    e.update({"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
              "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
              "PYTHONPATH": str(TREE)})
    return e


def args(run: Path, *overrides: str, model: Path | None = None, hook: str | None = None) -> list[str]:
    head = [sys.executable, str(TESTS / "hooked_train.py"), hook] if hook else [sys.executable, "-m", "jaxsft.train"]
    return [*head, f"--config={TREE / 'configs' / 'smoke.py'}", f"--config.trainer.default_local_dir={run}",
            f"--config.model.partial_pretrain={model or W.base}", *overrides]


def train(run: Path, *overrides: str, devices: int = 1, model=None, bound=False, timeout=900) -> subprocess.CompletedProcess:
    cmd = args(run, *overrides, model=model)
    return subprocess.run(unprivileged.bound(cmd) if bound else cmd, cwd=TREE, env=env(devices), capture_output=True,
                          text=True, timeout=timeout)


def start(run: Path, *overrides: str, hook: str | None = None, devices: int = 8) -> subprocess.Popen:
    return subprocess.Popen(args(run, *overrides, hook=hook), cwd=TREE, env=env(devices), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for(proc: subprocess.Popen, text: str) -> None:
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            return
    raise RuntimeError(f"exited {proc.wait()} before printing {text!r}: {''.join(seen[-5:])}")


# ---- the promises ---------------------------------------------------------------------------------

class Broken(Exception):
    """A promise not kept; the message says how."""


def one_line(proc: subprocess.CompletedProcess, *expected: str, run: Path | None = None) -> str:
    """Exit 2, exactly one `jaxsft: error:` line containing each of `expected`, no traceback, no
    training (no metrics.jsonl under `run`)."""
    errors = [x for x in proc.stderr.splitlines() if x.startswith("jaxsft: error:")]
    tail = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1][:300]
    if proc.returncode != 2:
        raise Broken(f"exit {proc.returncode}, not 2; last line: {tail}")
    if "Traceback" in proc.stderr or "Traceback" in proc.stdout:
        raise Broken(f"a traceback was printed; last line: {tail}")
    if len(errors) != 1:
        raise Broken(f"{len(errors)} error lines")
    missing = [e for e in expected if e not in errors[0]]
    if missing:
        raise Broken(f"the line does not say {missing[0]!r}: {errors[0][:300]}")
    if run is not None and (Path(run) / "metrics.jsonl").exists():
        raise Broken("it trained (metrics.jsonl written)")
    return errors[0][:240]


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if proc.returncode != 0:
        raise Broken(f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1][:300]}")
    return proc


def rows(run: Path) -> dict[int, tuple]:
    path = Path(run) / "metrics.jsonl"
    out = {}
    for line in path.read_text().splitlines() if path.exists() else ():
        m = json.loads(line)
        if "train/loss" in m["data"]:
            out[m["step"]] = tuple(m["data"][k] for k in EXACT)
    return out


def exact(run: Path) -> str:
    got, want = rows(run), rows(W.reference)
    if got != want:
        differ = sorted(s for s in set(got) | set(want) if got.get(s) != want.get(s))
        raise Broken(f"logged steps differ from the unbroken run at steps {differ[:6]}")
    return f"steps 1-{max(want)} as the unbroken run"


def resumed_from(proc, step_name: str) -> None:
    line = next((x for x in proc.stdout.splitlines() if "resumed from" in x), None)
    if line is None or f"/{step_name} at step" not in line:
        raise Broken(f"did not resume from {step_name}: {line}")


# ---- fixtures -----------------------------------------------------------------------------------

class W:
    """The work directory: a base model, the bundled data, an unbroken reference run."""
    root: Path
    base: Path
    reference: Path
    data: Path


def setup(root: Path) -> None:
    from jaxsft import bundled, tiny

    W.root = root
    W.base = tiny.ensure_tiny_model(root / "base", bundled.path("tokenizer"))
    W.data = Path(bundled.path("humaneval_chat", "train.parquet"))
    W.reference = root / "reference"
    ok(train(W.reference, *FAST, "--config.trainer.save_freq=3", devices=8))


def fresh(name: str) -> Path:
    path = W.root / "cases" / name
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def copy_reference(dest: Path) -> Path:
    shutil.copytree(W.reference, dest, dirs_exist_ok=True)
    return dest


def model_copy(d: Path) -> Path:
    shutil.copytree(W.base, d)
    return d


def edit_json(path: Path, change) -> None:
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d, indent=2))


def largest_array_file(step_dir: Path) -> Path:
    return max((f for f in (step_dir / "state").rglob("*") if f.is_file() and f.parent.name == "d"),
               key=lambda f: f.stat().st_size)


def chats(n: int = 24) -> list:
    return pq.read_table(W.data).column("messages").to_pylist()[:n]


# ==== A. configuration mistakes (one line, exit 2, nothing run) ==============================

def config_case(name: str, override: list[str], *expected: str, devices: int = 1):
    def fn():
        run = fresh(name)
        return one_line(train(run / "run", *override, devices=devices), *expected, run=run / "run")
    add("config", name, "one line, exit 2", fn)


config_case("lr_not_a_number", ["--config.optim.lr=abc"], "optim.lr='abc'")
config_case("batch_not_divisible", ["--config.data.train_batch_size=12"], "data.train_batch_size=12", devices=8)
config_case("misspelt_key", ["data.train_batchsize=4"], "did you mean data.train_batch_size")
config_case("unknown_flag", ["--bogus"], "unknown flag '--bogus'")
config_case("stray_argument", ["stray"], "unexpected argument 'stray'")
config_case("recipe_missing", ["--config=/nonexistent/recipe.py"], "no such recipe file")
config_case("recipe_unknown_name", ["--config=qwen99b"], "qwen99b")
config_case("truncation_choice", ["--config.data.truncation=middle"], "data.truncation='middle'")
config_case("flash_without_gpu", ["--config.model.attn_implementation=flash"], "model.attn_implementation=flash needs a CUDA GPU")
config_case("attention_unknown", ["--config.model.attn_implementation=magic"], "model.attn_implementation='magic'")
config_case("resume_path_without_path", ["--config.trainer.resume_mode=resume_path"], "needs trainer.resume_from_path")
config_case("resume_path_missing", ["--config.trainer.resume_mode=resume_path",
                                    "--config.trainer.resume_from_path=/nonexistent/global_step_3"], "does not exist")
config_case("save_contents_unknown", ["--config.trainer.checkpoint.save_contents=['model','weights']"], "save_contents")
config_case("max_length_zero", ["--config.data.max_length=0"], "data.max_length")
config_case("sp_not_dividing_devices", ["--config.ulysses_sequence_parallel_size=3"], "ulysses_sequence_parallel_size",
            devices=8)
config_case("logger_unknown", ["--config.trainer.logger=['console','nonsense']"], "nonsense")
config_case("batch_larger_than_data", ["--config.data.train_max_samples=8", "--config.data.train_batch_size=16"],
            "larger than the 8 training samples")


@case("config", "one line, exit 2")
def recipe_syntax_error():
    run = fresh("recipe_syntax_error")
    recipe = run / "recipe.py"
    recipe.write_text("def get_config(:\n")
    return one_line(train(run / "run", f"--config={recipe}"), "SyntaxError", str(recipe), run=run / "run")


@case("config", "one line, exit 2")
def resume_path_not_a_step():
    run = fresh("resume_path_not_a_step")
    return one_line(train(run / "run", "--config.trainer.resume_mode=resume_path",
                          f"--config.trainer.resume_from_path={W.reference}"), "is not a global_step_N directory")


# ==== B. bad data (one line naming file and row, exit 2) =====================================

def data_case(name: str, make, *expected: str, extra=()):
    def fn():
        run = fresh(name)
        path = make(run)
        return one_line(train(run / "run", f"--config.data.train_files={path}", *extra),
                        *[e.format(path=path) for e in expected], run=run / "run")
    add("data", name, "one line naming the file, exit 2", fn)


def _table(run, messages, name="d.parquet", **kw):
    path = run / name
    pq.write_table(pa.table({"messages": messages}), path, **kw)
    return path


def _garbage(run):
    (run / "d.parquet").write_bytes(b"not a parquet file at all" * 40)
    return run / "d.parquet"


def _truncated(run):
    path = _table(run, chats())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _damaged_pages(run):
    rows = [[{"role": "user", "content": f"question {i} " * 5}, {"role": "assistant", "content": f"answer {i} " * 5}]
            for i in range(300)]
    path = _table(run, rows, row_group_size=100)
    chunk = pq.ParquetFile(path).metadata.row_group(1).column(1)
    data = bytearray(path.read_bytes())
    for k in range(chunk.dictionary_page_offset + 60, chunk.dictionary_page_offset + 90):
        data[k] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def _with_raw_content(run, index: int, raw_content: bytes):
    """chats(8) written with the bytes of one message's content (the `index`-th of all) replaced
    by `raw_content`, which pyarrow would refuse to build as a string."""
    rows = chats(8)
    raw = [m["content"].encode() for c in rows for m in c]
    raw[index] = raw_content
    offsets = np.cumsum([0] + [len(b) for b in raw]).astype(np.int32)
    content = pa.Array.from_buffers(pa.string(), len(raw), [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(b"".join(raw))])
    messages = pa.StructArray.from_arrays([pa.array([m["role"] for c in rows for m in c]), content], names=["role", "content"])
    starts = np.cumsum([0] + [len(c) for c in rows]).astype(np.int32)
    pq.write_table(pa.table({"messages": pa.ListArray.from_arrays(pa.array(starts), messages)}), run / "d.parquet")
    return run / "d.parquet"


def _not_utf8(run):
    rows = chats(8)
    i = sum(len(c) for c in rows[:5])
    return _with_raw_content(run, i, b"caf\xe9 " + rows[5][0]["content"].encode())


def _lone_surrogate(run):
    rows = chats(8)
    i = sum(len(c) for c in rows[:2])
    return _with_raw_content(run, i, b"\xed\xa0\x80" + rows[2][0]["content"].encode())  # UTF-8 of U+D800: invalid


def _wrong_column(run):
    path = run / "d.parquet"
    pq.write_table(pa.table({"conversation": chats()}), path)
    return path


def _null_messages(run):
    rows = chats()
    rows[3] = None
    return _table(run, rows)


def _empty(run):
    path = run / "d.parquet"
    pq.write_table(pq.read_table(W.data).slice(0, 0), path)
    return path


data_case("data_file_missing", lambda run: run / "missing.parquet", "{path}")
data_case("data_not_parquet", _garbage, "{path}")
data_case("data_truncated_parquet", _truncated, "{path}")
data_case("data_damaged_pages", _damaged_pages, "{path}: row group 1")
data_case("data_not_utf8", _not_utf8, "{path} row 5", "not valid UTF-8")
data_case("data_lone_surrogate", _lone_surrogate, "{path} row 2", "UTF-8")
data_case("data_messages_column_missing", _wrong_column, "{path}", "messages")
data_case("data_null_messages_row", _null_messages, "{path} row 3")
data_case("data_no_rows", _empty, "{path}")
data_case("data_no_loss_tokens", lambda run: W.data, "{path}: the training data has no loss tokens",
          extra=("--config.data.max_length=24",))


@case("data", "runs; no val/loss; says why once")
def val_data_without_loss_tokens():
    """Validation rows whose targets are all cut: nothing to score, so no val/loss number."""
    run = fresh("val_data_without_loss_tokens")
    rows = [[{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "answer"}]] * 8
    path = _table(run, rows, "val.parquet")
    proc = ok(train(run / "run", *FAST, f"--config.data.val_files={path}", "--config.trainer.test_freq=3",
                    "--config.trainer.total_training_steps=3", devices=8))
    logged = [json.loads(x) for x in (run / "run" / "metrics.jsonl").read_text().splitlines()]
    if any("val/loss" in m["data"] for m in logged):
        raise Broken("val/loss was logged for a set with nothing to score")
    said = [x for x in proc.stdout.splitlines() if "validation: no loss tokens" in x]
    if len(said) != 1:
        raise Broken(f"said {len(said)} times why val/loss is missing")
    return said[0][:200]


@case("data", "one line naming the row, exit 2")
def data_ids_beyond_vocab():
    from safetensors.numpy import save_file
    from transformers import AutoTokenizer

    from jaxsft import bundled, tiny

    run = fresh("data_ids_beyond_vocab")
    tok = AutoTokenizer.from_pretrained(str(bundled.path("tokenizer")))
    config = tiny.tiny_qwen2_config(1538, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = run / "model"
    model.mkdir()
    config.save_pretrained(model)
    save_file(tiny.random_hf_tensors(config), str(model / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(model)
    return one_line(train(run / "run", model=model), "row 0: token id 1538", run=run / "run")


# ==== C. model directories (one line naming the file, exit 2, before the data) ================

def model_case(name: str, breaker, *expected: str, bound=False):
    def fn():
        run = fresh(name)
        model = model_copy(run / "model")
        breaker(model)
        try:
            proc = train(run / "run", model=model, bound=bound)
        finally:
            if model.exists():
                model.chmod(0o755)
                (model / "config.json").chmod(0o644)
        return one_line(proc, *[e.format(dir=model) for e in expected], run=run / "run")
    add("model", name, "one line naming the file, exit 2", fn)


def _sharded(d):
    from safetensors.numpy import load_file

    from jaxsft import hf

    tensors = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    hf.write_weights(tensors.items(), d, dtype="float32", max_shard_size="100KB")
    return d


model_case("model_shard_missing", lambda d: sorted(_sharded(d).glob("model-*-of-*.safetensors"))[1].unlink(),
           "{dir}/model.safetensors.index.json lists the shard")
model_case("model_truncated_weights", lambda d: (d / "model.safetensors").write_bytes(
    (d / "model.safetensors").read_bytes()[:300_000]), "{dir}/model.safetensors")
model_case("model_wrong_shape", lambda d: edit_json(d / "config.json", lambda c: c.update(intermediate_size=96)),
           "has shape")
model_case("model_pytorch_bin_only", lambda d: ((d / "model.safetensors").unlink(),
                                                (d / "pytorch_model.bin").write_bytes(b"\0" * 64)), "safetensors")
model_case("model_config_not_json", lambda d: (d / "config.json").write_text('{"hidden_size": 64,'),
           "{dir}/config.json is not valid JSON")
model_case("model_config_without_hidden_size", lambda d: edit_json(d / "config.json", lambda c: c.pop("hidden_size")),
           "{dir}/config.json has no 'hidden_size'")
model_case("model_no_tokenizer_files", lambda d: [(d / n).unlink() for n in
                                                  ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")],
           "{dir} has no tokenizer files")
model_case("model_directory_missing", lambda d: shutil.rmtree(d), "model.partial_pretrain")
model_case("model_directory_unreadable", lambda d: d.chmod(0), "cannot read {dir}: permission denied", bound=True)
model_case("model_config_unreadable", lambda d: (d / "config.json").chmod(0),
           "cannot read {dir}/config.json: permission denied", bound=True)


# ==== D. the run directory ==================================================================

@case("run directory", "one line, exit 2")
def run_dir_is_a_file():
    run = fresh("run_dir_is_a_file")
    (run / "f").write_text("x")
    return one_line(train(run / "f"), "is a file, not a directory")


@case("run directory", "one line, exit 2")
def run_dir_under_a_file():
    run = fresh("run_dir_under_a_file")
    (run / "f").write_text("x")
    return one_line(train(run / "f" / "run"), "cannot be created")


@case("run directory", "one line, exit 2, before the data")
def run_dir_read_only():
    run = fresh("run_dir_read_only")
    (run / "run").mkdir()
    (run / "run").chmod(0o555)
    try:
        proc = train(run / "run", bound=True)
    finally:
        (run / "run").chmod(0o755)
    line = one_line(proc, "is not writable (Permission denied)")
    if "train data:" in proc.stdout:
        raise Broken("the data was read first")
    return line


@case("run directory", "one line, exit 2")
def run_dir_parent_unwritable():
    run = fresh("run_dir_parent_unwritable")
    run.chmod(0o555)
    try:
        proc = train(run / "run", bound=True)
    finally:
        run.chmod(0o755)
    return one_line(proc, "cannot be created (Permission denied)")


@case("run directory", "one line, exit 2")
def run_dir_read_only_filesystem():
    run = fresh("run_dir_read_only_filesystem")
    why = small_disk.unavailable(run)
    if why:
        raise Broken(f"cannot mount a tmpfs here: {why}")
    (run / "run").mkdir()
    out = run / "out"
    out.mkdir()
    cmd = shlex.join(args(run / "run"))
    shell = f"mount -t tmpfs -o ro,size=1m tmpfs {run / 'run'}; {cmd} >{out}/o 2>{out}/e; echo $? >{out}/rc"
    subprocess.run(small_disk.command(shell), cwd=TREE, env=env(1), timeout=600, check=True)
    proc = subprocess.CompletedProcess(cmd, int((out / "rc").read_text()), (out / "o").read_text(), (out / "e").read_text())
    return one_line(proc, "Read-only file system")


@case("run directory", "second run refused naming the holder; the first unharmed")
def two_runs_at_once():
    run = fresh("two_runs_at_once") / "run"
    first = start(run, *FAST, "--config.trainer.save_freq=1", hook="pause:1")
    try:
        wait_for(first, "test hook: paused after step 1")
        line = one_line(train(run, *FAST, devices=8), f"in use by another run (pid {first.pid}")
        first.send_signal(signal.SIGTERM)  # the first saves step 2 and exits 0
        out = first.communicate(timeout=600)[0]
        if first.returncode != 0:
            raise Broken(f"the first run exited {first.returncode}: {out[-300:]}")
    finally:
        if first.poll() is None:
            first.kill()
    ok(train(run, *FAST, devices=8))
    exact(run)
    return line


def killed_then_resumed(name: str, save_freq: int, paused_at: int) -> str:
    """kill -9 a run paused after step `paused_at` (saving every `save_freq` steps), run the same
    command again: it resumes from global_step_{paused_at}, exactly."""
    run = fresh(name) / "run"
    first = start(run, *FAST, f"--config.trainer.save_freq={save_freq}", hook=f"pause:{paused_at}")
    wait_for(first, f"paused after step {paused_at}")
    first.kill()
    first.wait()
    resumed_from(ok(train(run, *FAST, f"--config.trainer.save_freq={save_freq}", devices=8)), f"global_step_{paused_at}")
    return exact(run)


@case("run directory", "the next run starts after kill -9 (no stale lock), resume exact")
def stale_lock_after_kill_9():
    return killed_then_resumed("stale_lock_after_kill_9", save_freq=1, paused_at=2)


# ==== E. kills and signals (exact resume) ===================================================

@case("kill", "exact resume")
def sigkill_after_complete_save():
    return killed_then_resumed("sigkill_after_complete_save", save_freq=3, paused_at=3)


@case("kill", "exact resume")
def sigkill_mid_async_save():
    run = fresh("sigkill_mid_async_save") / "run"
    proc = start(run, *FAST, "--config.trainer.save_freq=1", hook="kill_mid_save:3")
    proc.communicate(timeout=600)
    resumed_from(ok(train(run, *FAST, "--config.trainer.save_freq=1", devices=8)), "global_step_2")
    return exact(run)


def signal_case(name: str, sig, times: int):
    def fn():
        run = fresh(name) / "run"
        proc = start(run, *FAST, "--config.trainer.save_freq=-1", hook=f"{'hold' if times == 2 else 'pause'}:3")
        wait_for(proc, "paused after step 3")  # step 3 is not saved (save_freq=-1)
        proc.send_signal(sig)
        if times == 2:
            wait_for(proc, "stop requested; holding step 3")
            proc.send_signal(sig)
        out = proc.communicate(timeout=600)[0]
        if times == 1:
            if proc.returncode != 0 or "preempted: saved step 4" not in out:
                raise Broken(f"exit {proc.returncode}; {out.strip().splitlines()[-1][:200]}")
        else:
            last = out.strip().splitlines()[-1]
            if proc.returncode != 130 or last != "jaxsft: interrupted again: not saving" or "Traceback" in out:
                raise Broken(f"exit {proc.returncode}; last line {last[:200]!r}; traceback: {'Traceback' in out}")
            if any(run.glob("global_step_*")):
                raise Broken("something was saved")
        ok(train(run, *FAST, "--config.trainer.save_freq=-1", devices=8))
        return exact(run)
    add("kill", name, "saves the step, exits 0, exact resume" if times == 1 else
        "exit 130, one line, nothing saved, exact resume", fn)


signal_case("sigterm_preempts", signal.SIGTERM, 1)
signal_case("ctrl_c_once_saves", signal.SIGINT, 1)
signal_case("ctrl_c_twice_stops_at_once", signal.SIGINT, 2)


def random_kill_case(seed: int):
    def fn():
        """SIGKILL at a random moment of a run saving every step, then the same command."""
        run = fresh(f"sigkill_at_random_{seed}") / "run"
        rng = random.Random(seed)
        proc = start(run, *FAST, "--config.trainer.save_freq=1", "--config.trainer.max_ckpt_to_keep=2")
        wait_for(proc, "steps/epoch")  # the data is built: training is seconds away
        time.sleep(rng.uniform(0.0, 25.0))
        proc.kill()
        proc.wait()
        ok(train(run, *FAST, "--config.trainer.save_freq=1", "--config.trainer.max_ckpt_to_keep=2", devices=8))
        steps = sorted(int(p.name.split("_")[-1]) for p in run.glob("global_step_*"))
        if steps != [5, 6]:
            raise Broken(f"retention left {steps}")
        return exact(run)
    add("kill", f"sigkill_at_random_{seed}", "exact resume", fn)


for _seed in (1, 2, 3):
    random_kill_case(_seed)


# ==== F. damaged checkpoints ================================================================

def damaged_case(name: str, damage, falls_back_to: str = "global_step_3", extra=()):
    def fn():
        run = copy_reference(fresh(name) / "run")
        what = damage(run)
        proc = ok(train(run, *FAST, "--config.trainer.save_freq=3", *extra, devices=8))
        resumed_from(proc, falls_back_to)
        said = [x for x in proc.stdout.splitlines() if "incomplete" in x]
        if len(said) != 1 or (what and what not in said[0]):
            raise Broken(f"said {said!r}")
        exact(run)
        return said[0][:200]
    add("checkpoint", name, f"falls back to {falls_back_to} in one line, exact resume", fn)


damaged_case("ckpt_state_deleted", lambda run: (shutil.rmtree(run / "global_step_6" / "state"), "state/ is missing")[1])
damaged_case("ckpt_data_process_deleted",
             lambda run: (shutil.rmtree(run / "global_step_6" / "data_process_0"), "data_process_0/ is missing")[1])
damaged_case("ckpt_meta_deleted", lambda run: (shutil.rmtree(run / "global_step_6" / "meta"), "meta/")[1])
damaged_case("ckpt_one_array_file_deleted", lambda run: (largest_array_file(run / "global_step_6").unlink(), "is missing")[1])


def _truncate_array(run):
    f = largest_array_file(run / "global_step_6")
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return "bytes"


damaged_case("ckpt_one_array_file_truncated", _truncate_array)


def _zero_listing(run):
    (run / "global_step_6" / "jaxsft_files.json").unlink()
    return "never finished"


damaged_case("ckpt_listing_deleted", _zero_listing)


def _tracker_case(name: str, damage) -> bool:
    """The newest step gone and the tracker damaged by `damage(path)`: the newest complete step
    (global_step_3) is resumed, exactly."""
    run = copy_reference(fresh(name) / "run")
    damage(run / "latest_checkpointed_iteration.txt")
    shutil.rmtree(run / "global_step_6")
    resumed_from(ok(train(run, *FAST, "--config.trainer.save_freq=3", devices=8)), "global_step_3")
    return exact(run)


@case("checkpoint", "garbage tracker ignored, newest complete step resumed, exact")
def ckpt_tracker_garbage():
    return _tracker_case("ckpt_tracker_garbage", lambda tracker: tracker.write_text("abc"))


@case("checkpoint", "tracker deleted: newest complete step resumed, exact")
def ckpt_tracker_deleted():
    return _tracker_case("ckpt_tracker_deleted", lambda tracker: tracker.unlink())


@case("checkpoint", "one line, exit 2 (named step incomplete)")
def ckpt_resume_path_to_damaged_step():
    run = copy_reference(fresh("ckpt_resume_path_to_damaged_step") / "run")
    shutil.rmtree(run / "global_step_3" / "data_process_0")
    return one_line(train(run, *FAST, "--config.trainer.resume_mode=resume_path",
                          f"--config.trainer.resume_from_path={run / 'global_step_3'}", devices=8),
                    "is an incomplete checkpoint (data_process_0/ is missing)")


@case("checkpoint", "one line, exit 2 (no fresh start over a damaged run)")
def ckpt_every_step_damaged():
    run = copy_reference(fresh("ckpt_every_step_damaged") / "run")
    for s in (3, 6):
        shutil.rmtree(run / f"global_step_{s}" / "state")
    return one_line(train(run, *FAST, devices=8), "holds no complete checkpoint")


@case("checkpoint", "falls back in one line when the HF export is gone")
def ckpt_hf_export_deleted():
    run = fresh("ckpt_hf_export_deleted") / "run"
    with_hf = "--config.trainer.checkpoint.save_contents=('model','optimizer','extra','hf_model')"
    ok(train(run, *FAST, with_hf, "--config.trainer.save_freq=3", "--config.trainer.total_training_steps=6", devices=8))
    (run / "global_step_6" / "huggingface" / "model.safetensors").unlink()
    proc = ok(train(run, *FAST, with_hf, "--config.trainer.save_freq=3", devices=8))
    resumed_from(proc, "global_step_3")
    exact(run)
    return next(x for x in proc.stdout.splitlines() if "incomplete" in x)[:200]


@case("checkpoint", "convert_to_hf: one line naming the missing part")
def convert_damaged_step():
    run = copy_reference(fresh("convert_damaged_step") / "run")
    largest_array_file(run / "global_step_6").unlink()
    proc = subprocess.run([sys.executable, str(TREE / "bin" / "convert_to_hf"), str(run / "global_step_6"), "--out",
                           str(run.parent / "hf")], cwd=TREE, env=env(1), capture_output=True, text=True, timeout=600)
    lines = [x for x in proc.stderr.splitlines() if x.startswith("convert_to_hf: error:")]
    if proc.returncode == 0 or len(lines) != 1 or "Traceback" in proc.stderr or "is missing" not in lines[0]:
        raise Broken(f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1][:200]}")
    return lines[0][:200]


@case("checkpoint", "convert_to_hf of a run root: the newest complete step")
def convert_run_root_with_damaged_newest():
    run = copy_reference(fresh("convert_run_root_with_damaged_newest") / "run")
    shutil.rmtree(run / "global_step_6" / "state")
    proc = subprocess.run([sys.executable, str(TREE / "bin" / "convert_to_hf"), str(run), "--out", str(run.parent / "hf")],
                          cwd=TREE, env=env(1), capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or "global_step_3" not in proc.stdout:
        raise Broken(f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1][:200]}")
    return "converted global_step_3"


# ==== G. moved base model, changed data ======================================================

@case("changed inputs", "one line, exit 2")
def resume_onto_another_base_model():
    from jaxsft import bundled, tiny

    run = copy_reference(fresh("resume_onto_another_base_model") / "run")
    other = tiny.ensure_tiny_model(run.parent / "other", bundled.path("tokenizer"), intermediate_size=96)
    return one_line(train(run, *FAST, model=other, devices=8), "holds a different model")


@case("changed inputs", "convert_to_hf: one line pointing at --base-model")
def base_model_moved_for_convert():
    run = copy_reference(fresh("base_model_moved_for_convert") / "run")
    meta = run / "global_step_6" / "meta" / "metadata"
    edit_json(meta, lambda m: m.update(base_model=str(run.parent / "moved")))
    listing = run / "global_step_6" / "jaxsft_files.json"
    if listing.exists():  # the edit changed meta's size: keep the listing true to it
        edit_json(listing, lambda f: f.update({"meta/metadata": meta.stat().st_size}))
    proc = subprocess.run([sys.executable, str(TREE / "bin" / "convert_to_hf"), str(run / "global_step_6"), "--out",
                           str(run.parent / "hf")], cwd=TREE, env=env(1), capture_output=True, text=True, timeout=600)
    lines = [x for x in proc.stderr.splitlines() if x.startswith("convert_to_hf: error:")]
    if proc.returncode == 0 or len(lines) != 1 or "--base-model" not in lines[0] or "Traceback" in proc.stderr:
        raise Broken(f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1][:200]}")
    return lines[0][:200]


def _rewritten(dest: Path) -> Path:
    table = pq.read_table(W.data).slice(0, 24)
    pq.write_table(table.take(list(range(23, -1, -1))), dest)
    return dest


@case("changed inputs", "one line, exit 2")
def resume_onto_rewritten_data_same_rows():
    run = copy_reference(fresh("resume_onto_rewritten_data_same_rows") / "run")
    data = _rewritten(run.parent / "train.parquet")
    shutil.rmtree(run / "global_step_6")
    return one_line(train(run, *FAST, f"--config.data.train_files={data}", devices=8),
                    "the tokenised training data differs", "trainer.resume_accept_changed_data=true")


@case("changed inputs", "runs when the override says so, and says it")
def resume_onto_rewritten_data_accepted():
    run = copy_reference(fresh("resume_onto_rewritten_data_accepted") / "run")
    data = _rewritten(run.parent / "train.parquet")
    shutil.rmtree(run / "global_step_6")
    proc = ok(train(run, *FAST, f"--config.data.train_files={data}", "--config.trainer.resume_accept_changed_data=true",
                    devices=8))
    note = [x for x in proc.stdout.splitlines() if "resume_accept_changed_data=true" in x]
    if len(note) != 1:
        raise Broken("the override was not said")
    return note[0][:200]


@case("changed inputs", "one line, exit 2")
def resume_onto_fewer_rows():
    run = copy_reference(fresh("resume_onto_fewer_rows") / "run")
    shutil.rmtree(run / "global_step_6")
    return one_line(train(run, *FAST, "--config.data.train_max_samples=16", devices=8), "data-loader state",
                    "data.train_max_samples")


@case("changed inputs", "one line, exit 2")
def resume_with_another_seed():
    run = copy_reference(fresh("resume_with_another_seed") / "run")
    shutil.rmtree(run / "global_step_6")
    return one_line(train(run, *FAST, "--config.trainer.seed=7", devices=8), "data-loader state", "trainer.seed")


@case("changed inputs", "one line, exit 2")
def resume_with_another_tokenizer_template():
    """Same rows, the chat template edited in the base model copy: the tokens differ."""
    run = copy_reference(fresh("resume_with_another_tokenizer_template") / "run")
    shutil.rmtree(run / "global_step_6")
    model = model_copy(run.parent / "model")
    template = model / "chat_template.jinja"
    template.write_text(template.read_text().replace("<|im_start|>user\\n", "<|im_start|>user\\n\\n"))
    return one_line(train(run, *FAST, model=model, devices=8), "the tokenised training data differs")


# ==== H. disk space ======================================================================

def _on_small_disk(run: Path, size: str, first: list[str], then_size: str | None, second: list[str]) -> dict:
    why = small_disk.unavailable(run)
    if why:
        raise Broken(f"cannot mount a tmpfs here: {why}")
    out = run.parent / "out"
    out.mkdir(exist_ok=True)
    shell = f"mount -t tmpfs -o size={size} tmpfs {run}; {shlex.join(first)} >{out}/1.o 2>{out}/1.e; echo $? >{out}/1.rc; "
    shell += f"ls -a {run} >{out}/1.ls; "
    if then_size:
        shell += (f"mount -o remount,size={then_size} {run}; {shlex.join(second)} >{out}/2.o 2>{out}/2.e; "
                  f"echo $? >{out}/2.rc; ")
    shell += f"cp -r {run} {out}/run"
    subprocess.run(small_disk.command(shell), cwd=TREE, env=env(8), timeout=1800, check=True)
    read = {p.name: p.read_text() for p in out.iterdir() if p.is_file()}
    return read


def _completed(read, n):
    return subprocess.CompletedProcess([], int(read[f"{n}.rc"]), read[f"{n}.o"], read[f"{n}.e"])


@case("disk", "one line, exit 2, previous step intact, exact resume after space is freed")
def disk_full_at_a_save():
    run = fresh("disk_full_at_a_save") / "run"
    run.mkdir()
    cmd = args(run, *FAST, "--config.trainer.save_freq=3")
    read = _on_small_disk(run, "3500k", cmd, "64m", cmd)
    line = one_line(_completed(read, 1), "no space left on the disk", "global_step_3 is intact")
    left = read["1.ls"].split()
    if any(x.startswith("global_step_6") for x in left) or any("tmp" in x for x in left):
        raise Broken(f"left {left}")
    ok(_completed(read, 2))
    got = rows(run.parent / "out" / "run")
    if got != rows(W.reference):
        raise Broken("the resumed run's steps differ from the unbroken run")
    return line


@case("disk", "warning at start; one line, exit 2 at the first save")
def disk_smaller_than_one_checkpoint():
    run = fresh("disk_smaller_than_one_checkpoint") / "run"
    run.mkdir()
    read = _on_small_disk(run, "1200k", args(run, *FAST, "--config.trainer.save_freq=3"), None, [])
    proc = _completed(read, 1)
    warned = [x for x in proc.stdout.splitlines() if "one checkpoint needs about" in x]
    if len(warned) != 1:
        raise Broken("no warning at start")
    return one_line(proc, "no space left on the disk", "nothing was saved before")


@case("disk", "one line, exit 2 (the HF export fills the disk)")
def disk_full_with_hf_export():
    run = fresh("disk_full_with_hf_export") / "run"
    run.mkdir()
    cmd = args(run, *FAST, "--config.trainer.save_freq=3",
               "--config.trainer.checkpoint.save_contents=('model','optimizer','extra','hf_model')")
    read = _on_small_disk(run, "4200k", cmd, None, [])
    left = read["1.ls"].split()
    if any(x.startswith((".global_step_6", "global_step_6")) for x in left):
        raise Broken(f"left {left}")
    return one_line(_completed(read, 1), "no space left on the disk")


# ---- the driver ---------------------------------------------------------------------------------

def main() -> int:
    global TREE
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help="run the cases whose name contains one of these")
    ap.add_argument("--tree", help="the jaxsft checkout to test (default: this one)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--keep", help="work directory to keep (default: a temporary one, deleted)")
    a = ap.parse_args()
    if a.tree:
        TREE = Path(a.tree).resolve()
    root = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="jaxsft-hostile-"))
    root.mkdir(parents=True, exist_ok=True)
    chosen = [c for c in CASES if not a.only or any(o in c[1] for o in a.only)]
    print(f"{len(chosen)} cases against {TREE}; work directory {root}", flush=True)
    t0 = time.time()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # this driver's own jax (the tiny model) needs no GPU
    setup(root)
    results = []
    for group, name, promise, fn in chosen:
        t = time.time()
        try:
            detail, kept = fn(), True
        except Broken as e:
            detail, kept = str(e), False
        except Exception as e:  # noqa: BLE001 - a case that cannot even run counts as not kept
            detail, kept = f"{type(e).__name__}: {e}"[:300], False
            traceback.print_exc()
        results.append({"group": group, "case": name, "promise": promise, "kept": kept, "detail": detail,
                        "seconds": round(time.time() - t, 1)})
        print(f"{'KEPT  ' if kept else 'BROKEN'} [{group}] {name}: {promise} — {detail}", flush=True)
    kept = sum(r["kept"] for r in results)
    print(f"\n{kept}/{len(results)} promises kept ({time.time() - t0:.0f} s)")
    if a.json:
        Path(a.json).write_text(json.dumps({"tree": str(TREE), "kept": kept, "total": len(results), "results": results},
                                           indent=1))
    if not a.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if kept == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
