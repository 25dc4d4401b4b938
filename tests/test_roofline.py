"""jaxsft.roofline: per-op roofline of an optimized HLO module, on a program compiled here and on
a hand-written GPU-like module whose every cost is worked out below."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from jaxsft import roofline

PEAKS = roofline.Peaks("test", flops=1e12, hbm=1e11, link=1e10)
MiB = 2**20


def test_compiled_loop_counts_every_iteration_and_flags_the_f32_gemm():
    m, k, n, trips = 256, 512, 512, 7

    def f(x, w):
        return jax.lax.fori_loop(0, trips, lambda i, c: jnp.tanh(c @ w), x)

    x, w = jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32)
    text = jax.jit(f).lower(x, w).compile().as_text()
    model_flops = trips * 2.0 * m * k * n
    est = roofline.estimate(text, PEAKS, model_flops=model_flops)
    # each iteration's GEMM: 2mkn FLOPs, or reading x and w and writing c, whichever takes longer
    gemm = trips * max(2.0 * m * k * n / PEAKS.flops, 4.0 * (m * k + k * n + m * n) / PEAKS.hbm)
    assert est.flops == model_flops
    assert est.seconds["gemm"] == pytest.approx(gemm)
    assert est.seconds["elementwise fusions"] > 0  # the tanh, 7 times
    assert est.step_s == pytest.approx(sum(est.seconds.values()))
    assert sum(est.shares.values()) == pytest.approx(1.0)
    assert est.mfu == pytest.approx(model_flops / (est.step_s * PEAKS.flops))
    assert est.unknown_trip_loops == 0
    assert [f for f in est.flags if f.startswith("float32 GEMM")], est.flags
    assert est.top[0]["class"] == "gemm" and est.top[0]["runs"] == trips


def test_a_large_transpose_is_flagged_and_a_window_read_costs_the_window():
    def g(x):
        return x.T, x[:64, :64] * 2

    text = jax.jit(g).lower(jnp.ones((2048, 2048), jnp.float32)).compile().as_text()
    est = roofline.estimate(text, PEAKS)
    assert est.seconds["copies/transposes"] == pytest.approx(2 * 4 * 2048**2 / PEAKS.hbm)
    assert any("copies/transposes"[:-1] in f for f in est.flags), est.flags
    # the slice reads 64x64 of x, not all of it: the fusion costs its window and result only
    small = [t for t in est.top if t["class"] == "elementwise fusions"]
    assert small and small[0]["seconds"] == pytest.approx(2 * 4 * 64 * 64 / PEAKS.hbm)


# A GPU-like module: a layer scan of 4 trips, each slicing its layer's weight out of a stacked
# parameter, a cuBLAS bf16 GEMM, a synchronous all-reduce and an in-place dynamic-update-slice;
# after the loop an f32 GEMM, and an asynchronous all-gather (overlapped: not in the step time).
GPU_HLO = """HloModule gpu_like, is_scheduled=true

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%fused_slice (param_0: bf16[4,1024,1024], param_1: s32[]) -> bf16[1024,1024] {
  %param_0 = bf16[4,1024,1024]{2,1,0} parameter(0)
  %param_1 = s32[] parameter(1)
  %zero = s32[] constant(0)
  %ds = bf16[1,1024,1024]{2,1,0} dynamic-slice(%param_0, %param_1, %zero, %zero), dynamic_slice_sizes={1,1024,1024}
  ROOT %bc = bf16[1024,1024]{1,0} bitcast(%ds)
}

%fused_dus (param_0.1: bf16[4,512,1024], param_1.1: bf16[1,512,1024], param_2.1: s32[]) -> bf16[4,512,1024] {
  %param_0.1 = bf16[4,512,1024]{2,1,0} parameter(0)
  %param_1.1 = bf16[1,512,1024]{2,1,0} parameter(1)
  %param_2.1 = s32[] parameter(2)
  %zero.1 = s32[] constant(0)
  ROOT %dus = bf16[4,512,1024]{2,1,0} dynamic-update-slice(%param_0.1, %param_1.1, %param_2.1, %zero.1, %zero.1)
}

%body (p: (s32[], bf16[512,1024], bf16[4,1024,1024], bf16[4,512,1024])) -> (s32[], bf16[512,1024], bf16[4,1024,1024], bf16[4,512,1024]) {
  %p = (s32[], bf16[512,1024]{1,0}, bf16[4,1024,1024]{2,1,0}, bf16[4,512,1024]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = bf16[512,1024]{1,0} get-tuple-element(%p), index=1
  %w = bf16[4,1024,1024]{2,1,0} get-tuple-element(%p), index=2
  %acc = bf16[4,512,1024]{2,1,0} get-tuple-element(%p), index=3
  %wl = bf16[1024,1024]{1,0} fusion(%w, %i), kind=kLoop, calls=%fused_slice
  %gemm = (bf16[512,1024]{1,0}, s8[4194304]{0}) custom-call(%x, %wl), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"]}}}
  %y = bf16[512,1024]{1,0} get-tuple-element(%gemm), index=0
  %ar = bf16[512,1024]{1,0} all-reduce(%y), replica_groups={}, to_apply=%add
  %y1 = bf16[1,512,1024]{2,1,0} bitcast(%ar)
  %acc2 = bf16[4,512,1024]{2,1,0} fusion(%acc, %y1, %i), kind=kLoop, calls=%fused_dus
  ROOT %t = (s32[], bf16[512,1024]{1,0}, bf16[4,1024,1024]{2,1,0}, bf16[4,512,1024]{2,1,0}) tuple(%i, %ar, %w, %acc2)
}

%cond (q: (s32[], bf16[512,1024], bf16[4,1024,1024], bf16[4,512,1024])) -> pred[] {
  %q = (s32[], bf16[512,1024]{1,0}, bf16[4,1024,1024]{2,1,0}, bf16[4,512,1024]{2,1,0}) parameter(0)
  ROOT %true = pred[] constant(true)
}

ENTRY %main (x0: bf16[512,1024], w0: bf16[4,1024,1024], acc0: bf16[4,512,1024], a: f32[256,256], b: f32[256,256]) -> (bf16[4,512,1024], f32[256,256], f32[1024,256]) {
  %x0 = bf16[512,1024]{1,0} parameter(0)
  %w0 = bf16[4,1024,1024]{2,1,0} parameter(1)
  %acc0 = bf16[4,512,1024]{2,1,0} parameter(2)
  %a = f32[256,256]{1,0} parameter(3)
  %b = f32[256,256]{1,0} parameter(4)
  %c0 = s32[] constant(0)
  %init = (s32[], bf16[512,1024]{1,0}, bf16[4,1024,1024]{2,1,0}, bf16[4,512,1024]{2,1,0}) tuple(%c0, %x0, %w0, %acc0)
  %loop = (s32[], bf16[512,1024]{1,0}, bf16[4,1024,1024]{2,1,0}, bf16[4,512,1024]{2,1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}
  %out = bf16[4,512,1024]{2,1,0} get-tuple-element(%loop), index=3
  %f32gemm = f32[256,256]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %ag = (f32[256,256]{1,0}, f32[1024,256]{1,0}) all-gather-start(%a), dimensions={0}, backend_config={"collective_backend_config":{"is_sync":false}}
  %agd = f32[1024,256]{1,0} all-gather-done(%ag)
  ROOT %r = (bf16[4,512,1024]{2,1,0}, f32[256,256]{1,0}, f32[1024,256]{1,0}) tuple(%out, %f32gemm, %agd)
}
"""


def test_hand_written_gpu_module_costs():
    est = roofline.estimate(GPU_HLO, PEAKS, model_flops=4 * 2.0 * 512 * 1024 * 1024)
    trips = 4
    # per trip: the slice reads and writes one layer (2 MiB each) and the 4-byte index
    slice_s = (2 * 2 * MiB + 4) / PEAKS.hbm
    # the cuBLAS GEMM is compute bound (its 4 MiB of traffic take 42 us, its FLOPs 1.07 ms); workspace not counted
    gemm_s = 2.0 * 512 * 1024 * 1024 / PEAKS.flops
    # a ring all-reduce moves its 1 MiB twice over the link
    allreduce_s = 2 * MiB / PEAKS.link
    # in place: reads the 1 MiB update and the index, writes 1 MiB; the 4 MiB accumulator is not copied
    dus_s = (2 * MiB + 4) / PEAKS.hbm
    f32_s = max(2.0 * 256**3 / PEAKS.flops, 3 * 4 * 256 * 256 / PEAKS.hbm)
    assert est.seconds["gemm"] == pytest.approx(trips * gemm_s + f32_s)
    assert est.seconds["collectives not overlapped"] == pytest.approx(trips * allreduce_s)
    assert est.seconds["elementwise fusions"] == pytest.approx(trips * (slice_s + dus_s))
    assert est.overlapped_collective_s == pytest.approx(4 * 1024 * 256 / PEAKS.link)
    assert est.step_s == pytest.approx(trips * (gemm_s + allreduce_s + slice_s + dus_s) + f32_s)
    # only the f32 dot is flagged, not the bf16 cuBLAS GEMM
    f32_flags = [f for f in est.flags if f.startswith("float32 GEMM")]
    assert len(f32_flags) == 1 and "f32gemm" in f32_flags[0]
    assert est.mfu == pytest.approx(4 * 2.0 * 512 * 1024 * 1024 / (est.step_s * PEAKS.flops))
    assert est.summary().startswith("roofline (test) ")


def test_named_targets():
    assert roofline.TARGETS["h100"].hbm == 3.35e12 and roofline.TARGETS["h200"].hbm == 4.8e12
    assert roofline.estimate(GPU_HLO, "H200").target == "h200"
