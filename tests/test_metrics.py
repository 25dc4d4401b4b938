import json
import struct
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsft import metrics

QWEN25_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, head_dim=128)


def test_qwen25_7b_flops_per_token_by_hand():
    h, inter, layers, v = 3584, 18944, 28, 152064
    q_o = 2 * h * (28 * 128)  # q and o projections
    kv = 2 * h * (4 * 128)
    mlp = 3 * h * inter
    matmul = 3 * 2 * (layers * (q_o + kv + mlp) + h * v)  # 2 FLOPs per MAC, ×3 fwd+bwd
    attn_per_token = lambda s: 3 * (4 * s * 28 * 128 / 2) * layers  # causal half of QKᵀ + PV
    cfg = types.SimpleNamespace(**QWEN25_7B)
    assert metrics.matmul_flops_per_token(cfg) == matmul == pytest.approx(42.42e9, rel=1e-3)
    for s, want_g in [(2048, 43.7), (4096, 44.9), (8192, 47.3)]:  # anchors doc §6.6
        got = metrics.training_flops_per_token(cfg, s)
        assert got == pytest.approx(matmul + attn_per_token(s), rel=1e-12)  # float64 sums of < 2^53 integers, other order
        assert got / 1e9 == pytest.approx(want_g, abs=0.06)  # the doc rounds (47.35 -> 47.3)
    assert metrics.training_flops_per_token(QWEN25_7B, 4096) == metrics.training_flops_per_token(cfg, 4096)


def test_segment_aware_attention_and_step_flops():
    per_s2 = 6 * 28 * 28 * 128
    assert metrics.attention_flops_for_segments(QWEN25_7B, [4096]) == per_s2 * 4096**2
    lengths = np.array([1000, 3096, 7])
    assert metrics.attention_flops_for_segments(QWEN25_7B, lengths) == per_s2 * (1000**2 + 3096**2 + 49)
    counter = metrics.FlopCounter(QWEN25_7B)
    assert counter.step_flops([4096, 4096]) == pytest.approx(2 * 4096 * metrics.training_flops_per_token(QWEN25_7B, 4096))


def test_peak_flops_table():
    dev = lambda kind, platform="gpu": types.SimpleNamespace(device_kind=kind, platform=platform)
    assert metrics.peak_flops_per_device(dev("NVIDIA H100 80GB HBM3")) == 989e12
    assert metrics.peak_flops_per_device(dev("NVIDIA H200")) == 989e12
    assert metrics.peak_flops_per_device(dev("NVIDIA H100 PCIe")) == 756e12
    assert metrics.peak_flops_per_device(dev("NVIDIA A100-SXM4-80GB")) == 312e12
    assert metrics.peak_flops_per_device(dev("NVIDIA H20")) == 148e12
    assert metrics.peak_flops_per_device(dev("Some Future GPU")) is None
    assert metrics.peak_flops_per_device(jax.devices()[0]) is None  # CPU in tests


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_file_sink_appends_and_holds_every_key(tmp_path):
    def logger(initial_step=0):
        return metrics.MetricsLogger(["file"], tmp_path, "p", "e", {}, total_steps=3, initial_step=initial_step)

    lg = logger()
    lg.log(1, {"train/loss": jnp.float32(2.5), "train/lr": np.float32(1e-5), "train/loss_tokens": jnp.int32(7)})
    lg.log(1, {"val/loss": 2.25})
    lg.close()
    lg = logger(initial_step=1)  # a run resumed from step 1 continues the same file
    lg.log(2, {"train/loss": 2.0, "train/grad_norm": float("nan")})
    lg.close()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 1, 2]
    assert rows[0]["data"] == {"train/loss": 2.5, "train/lr": pytest.approx(1e-5), "train/loss_tokens": 7}
    assert rows[1]["data"] == {"val/loss": 2.25}
    assert set(rows[2]["data"]) == {"train/loss", "train/grad_norm"} and np.isnan(rows[2]["data"]["train/grad_norm"])


def test_a_resumed_run_drops_the_rows_after_its_checkpoint(tmp_path, monkeypatch):
    """Killed after step 3 with the last checkpoint at step 2: the relaunch logs step 3 again, so
    the first launch's step-3 rows go (metrics.jsonl and tensorboard), and nothing is duplicated."""
    monkeypatch.delenv("TENSORBOARD_DIR", raising=False)
    first = metrics.MetricsLogger(["file", "tensorboard"], tmp_path, "p", "e", {}, total_steps=4)
    for step in (1, 2, 3):
        first.log(step, {"train/loss": float(10 - step)})
    first.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "da')  # a line cut by the kill
    again = metrics.MetricsLogger(["file", "tensorboard"], tmp_path, "p", "e", {}, total_steps=4, initial_step=2)
    assert again.dropped_rows == 2
    again.log(3, {"train/loss": 6.5})
    again.log(4, {"train/loss": 6.0})
    again.close()
    assert [(r["step"], r["data"]["train/loss"]) for r in read_jsonl(tmp_path / "metrics.jsonl")] == \
        [(1, 9.0), (2, 8.0), (3, 6.5), (4, 6.0)]
    # TensorBoard drops the events of steps >= 3 written before a START session log at step 3.
    events = read_events(tmp_path / "tensorboard")
    purge = [i for i, e in enumerate(events) if e.session_log.status == e.session_log.START and e.step == 3]
    first_step3 = [i for i, e in enumerate(events) if e.step == 3 and e.summary.value]
    assert purge and first_step3[0] < purge[-1] < first_step3[-1]


def test_a_logged_step_is_on_disk_before_the_next_checkpoint(tmp_path, monkeypatch):
    """A run SIGKILLed after a save resumes after the steps it logged: their tensorboard events must
    be in the file once sync() (called before each save) returns, as metrics.jsonl's rows are, not
    in tensorboardX's queue (written by a thread, flushed every 120 s), or they are lost for good
    (found by tests/hostile/soak.py). Later rows go on in a new file."""
    monkeypatch.delenv("TENSORBOARD_DIR", raising=False)
    lg = metrics.MetricsLogger(["file", "tensorboard"], tmp_path, "p", "e", {}, total_steps=4)
    lg.log(1, {"train/loss": 3.0, "train/grad_norm": 0.5})
    lg.sync()  # what the trainer calls before a save
    assert read_scalars(tmp_path / "tensorboard") == [("train/loss", 1, 3.0), ("train/grad_norm", 1, 0.5)]
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1]
    lg.log(2, {"train/loss": 2.0})
    lg.close()
    assert read_scalars(tmp_path / "tensorboard")[2:] == [("train/loss", 2, 2.0)]


def read_events(event_dir):
    """Every event of the tensorboard event files, in the order written (TFRecord: len, crc, data, crc)."""
    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(event_dir.glob("events.out.tfevents.*")):
        buf = path.read_bytes()
        pos = 0
        while pos < len(buf):
            (n,) = struct.unpack("<Q", buf[pos:pos + 8])
            out.append(event_pb2.Event.FromString(buf[pos + 12:pos + 12 + n]))
            pos += 12 + n + 4
    return sorted(out, key=lambda e: e.wall_time)  # stable: file order within one writer


def read_scalars(event_dir):
    """(tag, step, value) from tensorboard event files."""
    return [(v.tag, e.step, v.simple_value) for e in read_events(event_dir) for v in e.summary.value]


def test_tensorboard_events_written(tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_DIR", raising=False)
    lg = metrics.MetricsLogger(["tensorboard"], tmp_path, "p", "e", {}, total_steps=2)
    lg.log(1, {"train/loss": jnp.float32(3.0)})
    lg.log(2, {"train/loss": 2.0, "train/lr": 1e-5})
    lg.close()
    scalars = read_scalars(tmp_path / "tensorboard")
    assert ("train/loss", 1, 3.0) in scalars and ("train/loss", 2, 2.0) in scalars
    assert any(tag == "train/lr" and step == 2 for tag, step, _ in scalars)

    monkeypatch.setenv("TENSORBOARD_DIR", str(tmp_path / "tb_env"))
    lg = metrics.MetricsLogger(["tensorboard"], tmp_path, "p", "e", {}, total_steps=1)
    lg.log(1, {"x": 1.0})
    lg.close()
    assert read_scalars(tmp_path / "tb_env") == [("x", 1, 1.0)]


def test_console_format(tmp_path, capsys):
    lg = metrics.MetricsLogger(("console",), tmp_path, "p", "e", {}, total_steps=5)
    lg.log(3, {"train/loss": jnp.float32(1.5), "train/lr": 2e-5, "train/loss_tokens": 12})
    lg.close()
    assert capsys.readouterr().out == "step:3 - train/loss:1.5 - train/lr:2e-05 - train/loss_tokens:12\n"


def test_console_with_tqdm_and_non_main_process(tmp_path, capsys):
    lg = metrics.MetricsLogger(("console", "tqdm"), tmp_path, "p", "e", {}, total_steps=4, initial_step=1)
    lg.log(2, {"train/loss": 1.0})
    lg.log(3, {"train/loss": 0.5})
    lg.close()
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["step:2 - train/loss:1", "step:3 - train/loss:0.5"]
    assert "3/4" in captured.err  # the bar

    quiet = metrics.MetricsLogger(["console", "file"], tmp_path / "other", "p", "e", {}, total_steps=1,
                                  is_main_process=False)
    quiet.log(1, {"train/loss": 1.0})
    quiet.close()
    assert capsys.readouterr().out == "" and not (tmp_path / "other").exists()


def test_missing_wandb_is_named_before_anything_runs(monkeypatch):
    from cfg import settings

    from jaxsft.config import ConfigError

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ConfigError, match="trainer.logger includes wandb .* not installed") as err:
        settings({"trainer.logger": ["console", "wandb"]})
    assert "\n" not in str(err.value)


def test_a_progress_bar_on_an_interactive_console(tmp_path, capsys, monkeypatch):
    """verl's default loggers are console and wandb, and verl always shows a bar: so does jaxsft
    when stdout is a terminal (and not in a log file)."""
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    lg = metrics.MetricsLogger(("console",), tmp_path, "p", "e", {}, total_steps=2)
    lg.log(1, {"train/loss": 1.0})
    lg.close()
    assert "1/2" in capsys.readouterr().err
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    lg = metrics.MetricsLogger(("console",), tmp_path, "p", "e", {}, total_steps=2)
    lg.log(1, {"train/loss": 1.0})
    lg.close()
    assert "1/2" not in capsys.readouterr().err
