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
        assert got == pytest.approx(matmul + attn_per_token(s), rel=1e-12)
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
    def logger():
        return metrics.MetricsLogger(["file"], tmp_path, "p", "e", {}, total_steps=3)

    lg = logger()
    lg.log(1, {"train/loss": jnp.float32(2.5), "train/lr": np.float32(1e-5), "train/loss_tokens": jnp.int32(7)})
    lg.log(1, {"val/loss": 2.25})
    lg.close()
    lg = logger()  # a resumed run continues the same file
    lg.log(2, {"train/loss": 2.0, "train/grad_norm": float("nan")})
    lg.close()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 1, 2]
    assert rows[0]["data"] == {"train/loss": 2.5, "train/lr": pytest.approx(1e-5), "train/loss_tokens": 7}
    assert rows[1]["data"] == {"val/loss": 2.25}
    assert set(rows[2]["data"]) == {"train/loss", "train/grad_norm"} and np.isnan(rows[2]["data"]["train/grad_norm"])


def read_scalars(event_dir):
    """(tag, step, value) from tensorboard event files (TFRecord: len, crc, data, crc)."""
    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(event_dir.glob("events.out.tfevents.*")):
        buf = path.read_bytes()
        pos = 0
        while pos < len(buf):
            (n,) = struct.unpack("<Q", buf[pos:pos + 8])
            event = event_pb2.Event.FromString(buf[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return out


def test_tensorboard_events_written(tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_DIR", raising=False)
    lg = metrics.MetricsLogger("['tensorboard']", tmp_path, "p", "e", {}, total_steps=2)
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
    lg = metrics.MetricsLogger("console,tqdm", tmp_path, "p", "e", {}, total_steps=4, initial_step=1)
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


def test_unknown_backend_and_missing_wandb_name_the_key(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="trainer.logger.*'mlflow'"):
        metrics.MetricsLogger(["console", "mlflow"], tmp_path, "p", "e", {}, total_steps=1)
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
    with pytest.raises(ValueError, match="trainer.logger") as err:
        metrics.MetricsLogger(["wandb"], tmp_path, "p", "e", {}, total_steps=1)
    assert "\n" not in str(err.value)
