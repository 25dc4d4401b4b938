"""bench/throughput.py at CI size: the tiny shape, short rows, a couple of steps, torch included."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bench import throughput as bt

# Every figure a run must report for each side, as a finite positive number.
FIGURES = ("step_s", "step_s_min", "tokens_per_s", "loss_tokens_per_s", "tokens_per_s_per_device",
           "loss_tokens_per_s_per_device", "flops_per_step_maxtext", "flops_per_step_segments",
           "tflops_per_device_maxtext", "tflops_per_device_segments", "mfu_maxtext", "mfu_segments",
           "peak_memory_bytes", "first_step_s")
JAX_ONLY = ("compile_s", "init_s", "real_token_fraction")


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _run(tmp_path, capsys, *extra):
    md = tmp_path / "PERF.md"
    md.write_text(f"# t\n\n{bt.RESULTS_MARKER}\n| a |\n|---|\n\nafter\n")
    out = tmp_path / "r.json"
    argv = ["--shape", "tiny", "--seq-len", "128", "--global-batch", "8", "--micro-batch", "2", "--steps", "2",
            "--warmup", "0", "--peak-tflops", "1", "--json", str(out), "--append-md", str(md), *extra]
    bt.main(argv)
    lines = capsys.readouterr().out.strip().splitlines()
    return json.loads(out.read_text()), lines, md.read_text().splitlines()


def _check(r, lines, md):
    for side, names in (("jaxsft", FIGURES + JAX_ONLY), ("torch", FIGURES)):
        for name in names:
            assert _positive(r[side][name]), (side, name, r[side][name])
        assert all(map(math.isfinite, r[side]["losses"]))
        assert r[side]["peak_memory_kind"]
    assert r["jaxsft"]["compiled_memory"]["temp_size_in_bytes"] > 0
    # --peak-tflops 1: MFU is TFLOP/s ÷ 1
    assert r["jaxsft"]["mfu_maxtext"] == pytest.approx(r["jaxsft"]["tflops_per_device_maxtext"])  # float64, other order: 1e-6 ≫ its ulps
    for name in ("tokens_per_s", "loss_tokens_per_s"):
        assert _positive(r["ratios"][name])
    for name in ("date", "machine", "command"):
        assert r[name]
    assert lines[-2] == f"loss-tokens/s jaxsft/torch = {r['ratios']['loss_tokens_per_s']:.2f}"
    assert lines[-1] == f"tokens/s jaxsft/torch = {r['ratios']['tokens_per_s']:.2f}"
    rows = [line for line in md if line.startswith("| 20")]
    assert len(rows) == 1 and md[md.index(rows[0]) - 1] == "|---|" and md[-1] == "after"


@pytest.mark.slow  # an XLA:GPU compile or a sweep over every variant: CI, not the inner loop
def test_padded_fixed_lengths_two_devices(tmp_path, capsys):
    r, lines, md = _run(tmp_path, capsys, "--dp", "2")
    _check(r, lines, md)
    assert r["jaxsft"]["batch_shape"] == [2, 4, 128] and r["torch"]["batch_shape"] == [4, 2, 128]
    assert r["jaxsft"]["real_token_fraction"] == 1.0


@pytest.mark.slow  # an XLA:GPU compile or a sweep over every variant: CI, not the inner loop
def test_packed_seed_lengths_against_padded_torch(tmp_path, capsys):
    # the baseline in this process (saves a second interpreter start); the test above runs the child
    r, lines, md = _run(tmp_path, capsys, "--dp", "1", "--lengths", "seed", "--packing", "first_fit",
                        "--torch-inprocess")
    _check(r, lines, md)
    k, rows, _ = r["jaxsft"]["batch_shape"]
    assert rows == 2 and k < 4  # packing needs fewer micro-batches than padding's 8 / 2
    assert r["torch"]["batch_shape"] == [4, 2, 128]
    # segment-aware FLOPs count the real samples only; padded torch spends more slots on them
    assert r["jaxsft"]["flops_per_step_segments"] == pytest.approx(r["torch"]["flops_per_step_segments"])
    assert r["torch"]["flops_per_step_maxtext"] > r["jaxsft"]["flops_per_step_maxtext"]


def test_seed_lengths_match_the_seed_quantiles():
    mu, sigma = bt.seed_lognormal(1.0)
    fitted = {q: math.exp(mu + sigma * bt._Z[q]) for q in bt.SEED_QUANTILES}
    for q, want in bt.SEED_QUANTILES.items():
        assert abs(fitted[q] / want - 1) < 0.1, (q, fitted[q], want)
    lengths = bt.sample_lengths("seed", 4096, 50, 200, seed=0)
    assert lengths.min() >= bt.MIN_LENGTH and lengths.max() <= 4096
    assert 700 < np.median(lengths) < 950
    scaled = bt.sample_lengths("seed", 512, 50, 200, seed=0)
    assert 85 < np.median(scaled) < 120


@pytest.mark.parametrize("packing", ["none", "first_fit"])
def test_batches_hold_every_sample_once(packing):
    lengths = bt.sample_lengths("seed", 256, 3, 8, seed=1)
    batches = bt.jaxsft_batches(lengths, 256, dp=2, micro_batch=2, packing=packing, vocab=64, seed=1)
    from jaxsft.data.loader import segment_lengths

    assert len({b["input_ids"].shape for b in batches}) == 1
    for step, b in enumerate(batches):
        assert sorted(segment_lengths(b)) == sorted(lengths[step])
        assert np.count_nonzero(b["loss_mask"]) == sum(round(0.6 * n) for n in lengths[step])


@pytest.mark.parametrize("attn", ["xla", "reference"])
def test_compile_only_reports_the_memory_plan(tmp_path, attn):
    out = tmp_path / "c.json"
    r = bt.main(["--shape", "tiny", "--seq-len", "256", "--global-batch", "2", "--micro-batch", "1", "--compile-only",
                 "--remat", "full", "--attn", attn, "--json", str(out)])
    mem = r["compile_only"]["compiled_memory"]
    assert json.loads(out.read_text())["compile_only"]["batch_shape"] == [2, 1, 256]
    assert mem["temp_size_in_bytes"] > 0 and mem["argument_size_in_bytes"] > 0
    assert _positive(r["compile_only"]["compile_s"])
    square = r["compile_only"]["t_by_t_arrays"]
    assert r["compile_only"]["attention"] == attn
    # the dense reference plans [.., T, T] scores; the blockwise attention plans none
    assert (square["count"] > 0) == (attn == "reference"), square


def test_t_by_t_arrays_finds_square_buffers_only():
    hlo = ("%a = f32[1,4,7,4096,4096]{4,3,2,1,0} fusion(...)\n%b = bf16[1,4096,18944]{2,1,0} dot(...)\n"
           "%c = f32[1,8,4,3584,512]{4,3,2,1,0} fusion(...)\n%d = pred[4096,4096]{1,0} compare(...)")
    found = bt.t_by_t_arrays(hlo, 4096)
    assert found == {"count": 2, "largest": "f32[1, 4, 7, 4096, 4096]", "largest_bytes": 4 * 28 * 4096**2}
    assert bt.t_by_t_arrays(hlo, 512)["count"] == 0
