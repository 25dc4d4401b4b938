"""GPU plans without a GPU (jaxsft.plan, jaxsft.hlo_stats): the real train step compiled for
deviceless H100s is CUDA code, its memory plan is read, `auto` settings choose by plan.

Needs the test extra's jax-cuda12-plugin, jax-cuda12-pjrt and nvidia-cuda-nvcc-cu12 (ptxas);
conftest sets JAX_PLATFORMS=cpu, which keeps the plugin registered on a machine with no GPU.
"""

from __future__ import annotations

import json
import re
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cfg import settings
from e2e import ROOT, env_for, train_args
import runs

from jaxsft import config as jconfig, hlo_stats, optim, plan, step
from jaxsft.model.config import ModelConfig
from jaxsft.settings import ModelSettings
from jaxsft.model import blockwise as blockwise_module

TINY = dict(model_type="qwen2", vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
            max_position_embeddings=2048, tie_word_embeddings=True)
T = 256


def _tx():
    return optim.make_optimizer(settings().optim, 10, "float32")


def _small_target_config(tmp_path, memory_bytes: int):
    text = (plan._TARGET_DIR / "h100.txtpb").read_text()
    path = tmp_path / "h100_small.txtpb"
    path.write_text(re.sub(r"device_memory_size:\s*\d+", f"device_memory_size: {memory_bytes}", text))
    return path


def _plan_run(target, remat_policy, micro_batch="auto", attn="reference"):
    tx, schedule = _tx()
    return plan.plan_run(target, model_config=ModelConfig.from_hf_dict(TINY),
                         model=ModelSettings(param_dtype="float32", compute_dtype="bfloat16", scan_layers=True,
                                             attn_implementation=attn, remat_policy=remat_policy),
                         micro_batch=micro_batch, samples_per_rank=4, rows_per_rank=4,
                         dp=2, sp=1, seq_len=T, tx=tx, lr_schedule=schedule,
                         step_cfg=step.StepConfig("global_tokens", False, 2, 128))


@pytest.mark.slow  # an XLA:GPU compile or a sweep over every variant: CI, not the inner loop
def test_h100_plan_is_cuda_code_and_auto_remat_chooses_by_plan(tmp_path, monkeypatch):
    """Tiny shape on a deviceless h100 1x1x2 topology: CUDA code, plan read, FSDP collectives;
    then with the device memory set just below what `none` needs, `auto` leaves `none`."""
    big = plan.get_target("h100:2")
    assert big.platform == "cuda" and big.num_devices == 2 and "H100" in big.device_kind
    first = _plan_run(big, "none", micro_batch=4).plan
    # the model line: family, head_dim and the Ulysses sp values its heads allow (4 q / 2 KV heads)
    assert first.describe()[1] == ("[plan] model: qwen2, 2 layers, hidden 64, 4 query / 2 KV heads of head_dim 16, "
                                   "tied embeddings; ulysses_sequence_parallel_size may be 1, 2, 4")
    assert first.compiled_for.startswith("cuda") and first.cuda_binaries and first.cuda_binaries > 0
    assert first.fits and first.per_device_peak_bytes < 0.95 * big.usable_bytes
    assert first.per_device_peak_bytes == (first.argument_bytes + first.output_bytes - first.alias_bytes
                                           + first.temp_bytes)
    assert first.collectives["all-gather"]["async"] + first.collectives["all-gather"]["sync"] > 0  # FSDP
    # `none` recomputes nothing of the model, but the dense reference computes all (not causal) scores
    # and the chunked loss's backward recomputes the LM-head logits: the model count plus those two.
    from jaxsft import metrics

    cfg = ModelConfig.from_hf_dict(TINY)
    tokens = 4 * 2 * T / 2  # [K=1, rows=2·4, T] over 2 devices
    expected = first.model_flops + tokens * (metrics.attention_flops_for_segments(cfg, [T]) / T
                                             + 2 * cfg.hidden_size * cfg.vocab_size)
    assert first.step_flops == pytest.approx(expected, rel=0.01)  # a count, not float: XLA also counts elementwise ops (< 1%)
    # At this shape the logits ([.., vocab 512, T 256]) look score-like too; attention scores do not
    # carry the vocabulary dimension.
    def attention_scores(p):
        return [b for b in p.tt_buffers if b["score_like"] and TINY["vocab_size"] not in b["shape"]]

    assert attention_scores(first), "the dense reference materialises float32 [.., T, T] scores"
    # Blocks smaller than T (at the GPU's 512 one block would span this whole tiny row).
    monkeypatch.setitem(blockwise_module.BLOCK, "gpu", 64)
    blockwise = _plan_run(big, "none", micro_batch=4, attn="xla").plan
    assert blockwise.compiled_for.startswith("cuda")
    assert not attention_scores(blockwise), "the blockwise xla backend holds no [T, T] scores"
    assert blockwise.temp_bytes < first.temp_bytes

    # Device memory such that `none` at micro-batch 4 needs 10 % more than the fit limit.
    memory = int(first.per_device_peak_bytes / 1.10 / (1 - plan.FIT_MARGIN) / plan.memory_fraction())
    small = plan.get_target("h100:2", config_path=_small_target_config(tmp_path, memory))
    assert small.memory_bytes == memory
    choice = _plan_run(small, "auto", micro_batch=4)
    policies = [p for p, _, _ in choice.tried]
    assert policies[0] == "none" and choice.remat_policy != "none"
    assert choice.plan.fits and choice.plan.per_device_peak_bytes <= (1 - plan.FIT_MARGIN) * small.usable_bytes
    limit = (1 - plan.FIT_MARGIN) * small.usable_bytes
    for policy, _, peak in choice.tried[:-1]:  # every cheaper policy tried was rejected by its plan
        assert peak > limit, (policy, peak, limit)
    assert plan.AUTO_REMAT_ORDER.index(choice.remat_policy) == len(choice.tried) - 1, choice.tried
    assert choice.remat_policy in choice.reason and "fits" in choice.reason
    print(choice.reason)


def test_abstract_state_gives_adam_moments_their_parameters_sharding():
    """jax.eval_shape(tx.init) drops shardings; the plan must not show replicated moments."""
    from jaxsft import parallel
    from jaxsft.model.decoder import ModelSettings

    mesh = parallel.make_mesh(4, 2)
    tx, _ = _tx()
    _, _, state, shardings = plan.abstract_train_state(ModelConfig.from_hf_dict(TINY), ModelSettings(), mesh, tx)
    params = {plan._path_key(p): x.sharding for p, x in jax.tree_util.tree_flatten_with_path(state["params"])[0]}
    moments = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]:
        key = plan._path_key(path)
        match = [s for k, s in params.items() if key[-len(k):] == k]
        if leaf.ndim:
            assert match and leaf.sharding == match[0], key
            moments += 1
        else:
            assert leaf.sharding.spec == jax.sharding.PartitionSpec(), key  # counts, lr: replicated
    assert moments == 2 * len(params)  # mu and nu of every parameter
    assert any(s.spec != jax.sharding.PartitionSpec() for s in params.values())


def test_choose_takes_largest_fitting_micro_batch_of_cheapest_policy():
    """choose() on synthetic plans: memory grows with the micro-batch and falls with remat."""
    cost = {"none": 25, "minimal": 4, "full": 2}

    def make(policy, b):
        peak = cost[policy] * b
        return plan.Plan(target="x", devices=1, mesh={"dp": 1, "sp": 1}, compiled_for="cpu", settings={},
                         batch_shape=[8 // b, b, 16], argument_bytes=0, output_bytes=0, alias_bytes=0, temp_bytes=peak,
                         per_device_peak_bytes=peak, device_memory_bytes=20, device_total_bytes=20,
                         memory_fraction=None, fits=plan.fits(peak, 20), compile_s=0.0, step_flops=0.0,
                         model_flops=1.0, opaque_calls=0, collectives={}, collectives_per_step={}, tt_buffers=[],
                         cuda_binaries=None, target_config=None)

    c = plan.choose(make, policies=("none", "minimal", "full"), micro_batches=plan.divisors_descending(8))
    assert (c.remat_policy, c.micro_batch_size) == ("minimal", 4)  # none/1 = 25 > 19 = 95 % of 20; minimal/4 = 16 fits, /8 not
    c = plan.choose(make, policies=("full",), micro_batches=[16])
    assert not c.plan.fits and "DOES NOT FIT" in c.reason


def test_hlo_flops_weight_loop_bodies_by_trip_count():
    """XLA's own cost analysis counts a scan body once; hlo_stats multiplies by the trip count."""
    a = jnp.ones((7, 64, 32), jnp.float32)
    w = jnp.ones((32, 48), jnp.float32)

    def f(a, w):
        return jax.lax.scan(lambda c, x: (c + jnp.sum(x @ w), None), 0.0, a)[0]

    compiled = jax.jit(f).lower(a, w).compile()
    stats = hlo_stats.analyse(compiled.as_text(), seq_len=64)
    assert stats.step_flops == 7 * 2 * 64 * 32 * 48
    xla = compiled.cost_analysis()
    xla = xla[0] if isinstance(xla, (list, tuple)) else xla
    assert xla["flops"] < 2 * 2 * 64 * 32 * 48  # the body once (plus a few adds)


def test_hlo_flops_by_op_adds_up_to_the_step_and_names_each_dot():
    """The breakdown by jax op (bench/hlo_flops.py) sums to the step's FLOPs: a dot in a scan of 7
    (its trip count applied) and a dot outside it, each under its own op name."""
    a = jnp.ones((7, 64, 32), jnp.float32)
    w, v = jnp.ones((32, 48), jnp.float32), jnp.ones((48, 16), jnp.float32)

    def f(a, w, v):
        y = jax.lax.scan(lambda c, x: (c + x @ w, None), jnp.zeros((64, 48)), a)[0]
        return jnp.einsum("tk,kn->tn", y, v)

    text = jax.jit(f).lower(a, w, v).compile().as_text()
    by_op = hlo_stats.flops_by_op(text)
    assert sum(by_op.values()) == hlo_stats.analyse(text, seq_len=64).step_flops == 7 * 2 * 64 * 32 * 48 + 2 * 64 * 48 * 16
    assert sorted(by_op.values()) == [2 * 64 * 48 * 16, 7 * 2 * 64 * 32 * 48]
    assert any("tk,kn->tn" in name for name in by_op) and any("while" in name for name in by_op), by_op


def test_hlo_collectives_async_and_sync():
    text = """HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %ag = ((f32[4]{0}), f32[8]{0}) all-gather-start(%x), dimensions={0}, backend_config={"collective_backend_config":{"is_sync":false}}
  %agd = f32[8]{0} all-gather-done(%ag)
  %ar = f32[8]{0} all-reduce(%agd), to_apply=%add
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %ar)
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (x: f32[8]) -> f32[8] {
  %x = f32[8]{0} parameter(0)
  %rs = ((f32[8]{0}), f32[4]{0}) reduce-scatter-start(%x), to_apply=%add, backend_config={"collective_backend_config":{"is_sync":true}}
  %i = s32[] constant(0)
  %t = (s32[], f32[8]{0}) tuple(%i, %x)
  %w = (s32[], f32[8]{0}) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  ROOT %o = f32[8]{0} get-tuple-element(%w), index=1
}
"""
    s = hlo_stats.analyse(text, seq_len=2)
    assert s.collectives["all-gather"] == {"async": 1, "sync": 0}
    assert s.collectives["all-reduce"] == {"async": 0, "sync": 1}
    assert s.collectives["reduce-scatter"] == {"async": 0, "sync": 1}  # marked is_sync by XLA
    assert s.collectives_per_step["all-gather"] == {"async": 5, "sync": 0}
    assert s.collectives_per_step["all-reduce"] == {"async": 0, "sync": 5}


def test_cuda_binaries_needs_cuda_elf():
    """A CUDA plan fails loudly without cubins: the count is 0 for PTX-only or non-CUDA ELF blobs."""
    class Fake:
        def __init__(self, blob):
            self.blob = blob

        def runtime_executable(self):
            return self

        def serialize(self):
            return self.blob

    assert hlo_stats.cuda_binaries(Fake(b"xx\x7fELF....nv.info..\x7fELF..")) == 2
    assert hlo_stats.cuda_binaries(Fake(b"xx\x7fELF..text..")) == 0  # an ELF, but not a cubin
    assert hlo_stats.cuda_binaries(Fake(b".version 8.8\n.target sm_90a")) == 0  # PTX only


def test_targets_and_config_errors():
    assert plan.parse_target("h100:8") == ("h100", 8) and plan.parse_target("cpu") == ("cpu", None)
    for bad in ("h100", "h100:0", "a100:2", "cpu:2"):
        with pytest.raises(plan.PlanError):
            plan.parse_target(bad)
    auto = settings({"data.micro_batch_size_per_gpu": "auto", "model.remat_policy": "auto"})
    assert jconfig.check_devices(auto, 8) == (8, 1)  # auto passes validation; the plan settles it
    with pytest.raises(jconfig.ConfigError, match="micro_batch_size_per_gpu=auto needs trainer.loss_normalization"):
        settings({"data.micro_batch_size_per_gpu": "auto", "trainer.loss_normalization": "verl"})
    with pytest.raises(jconfig.ConfigError, match="is not an integer or auto"):
        settings({"data.micro_batch_size_per_gpu": "two"})


@pytest.mark.slow
def test_dry_run_command_line(tmp_path, base_model, monkeypatch):
    """`--dry_run=h100:2 --dry_run_json=PATH` on the smoke recipe with optimizer offload: printed
    and written, the moments planned in host memory (lowered on two CPU devices though the
    process was started with one), nothing trained; the same with a target too small for it
    (in-process: the exit status is the one `main` returns to the command): exit 2 with one line
    after the plan."""
    out = tmp_path / "plan.json"
    args = train_args(tmp_path / "run", base_model, "--dry_run=h100:2", f"--dry_run_json={out}",
                      "model.fsdp_config.optimizer_offload=true", "model.remat_policy=auto")
    proc = subprocess.run(args, cwd=ROOT, env=env_for(1), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "[plan] auto: model.remat_policy=none" in proc.stdout and "CUDA machine code" in proc.stdout
    p = json.loads(out.read_text())
    for key in ("target", "devices", "per_device_peak_bytes", "device_memory_bytes", "temp_bytes", "argument_bytes",
                "step_flops", "collectives", "tt_buffers", "compiled_for"):
        assert key in p, key
    assert p["target"] == "h100:2" and p["devices"] == 2 and p["compiled_for"].startswith("cuda")
    assert "host memory (pinned_host) per device" in proc.stdout
    assert 0 <= p["opt_state_bytes"] - p["host_argument_bytes"] < 64  # every moment in host memory
    assert not (tmp_path / "run").exists()  # a plan trains nothing and makes no run directory

    # the exit-2 path in this process (tests/runs.py): the same `jaxsft.train.main`, its output captured
    monkeypatch.setenv("JAXSFT_TARGET_CONFIG_H100", str(_small_target_config(tmp_path, 2**20)))
    proc = runs.main(args[3:-1])
    assert proc.returncode == 2, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("jaxsft: error:")]
    assert len(errors) == 1 and "does not fit" in errors[0] and "Traceback" not in proc.stderr
    assert "DOES NOT FIT" in proc.stdout


@pytest.mark.slow
def test_auto_settings_in_a_real_run(tmp_path, base_model):
    """A real (CPU) run with remat and micro-batch `auto`, in this process (tests/runs.py, its 8
    devices: 16 rows per step give each 2): planned on this machine at start-up, chosen, said in
    one line, then trained with the chosen values."""
    proc = runs.train(tmp_path / "run", base_model, "model.remat_policy=auto", "data.micro_batch_size_per_gpu=auto",
                      "trainer.total_training_steps=1", "trainer.save_freq=-1", "trainer.test_freq=-1")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("[plan] auto:"))
    m = re.search(r"model.remat_policy=(\w+), data.micro_batch_size_per_gpu=(\d+)", line)
    assert m and m.group(1) == "none" and int(m.group(2)) == 2  # host RAM: the cheapest, largest fits
    assert "[1 micro-batches, 16 rows, 1280 tokens]" in proc.stdout  # the loader uses the choice
    # RUN_DIR/config.yaml and the checkpoint's meta show what ran, not `auto`
    import yaml

    from jaxsft.checkpoint import read_meta

    for config in (yaml.safe_load((tmp_path / "run" / "config.yaml").read_text()),
                   read_meta(tmp_path / "run" / "global_step_1")["config"]):
        assert config["model"]["remat_policy"] == "none" and config["data"]["micro_batch_size_per_gpu"] == 2


@pytest.mark.slow  # over ~3 s on 2 cores: CI's full run, not the ≤ 3-minute inner loop
def test_cpu_target_plans_this_machine():
    target = plan.get_target("cpu")
    assert target.platform == "cpu" and target.num_devices == jax.device_count()
    c = _plan_run(dataclass_replace(target, devices=target.devices[:2]), "full", micro_batch=2)
    assert c.plan.cuda_binaries is None and c.plan.fits and c.plan.step_flops > c.plan.model_flops


def dataclass_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


@pytest.mark.slow  # over ~5 s on 2 cores: CI's full run, not the ≤ 3-minute inner loop
def test_accumulate_in_backward_equals_autodiff_sum():
    """The in-place layer-gradient accumulation (remat full, K > 1) gives the same loss and summed
    gradients as autodiff + add, on a (dp=2, sp=2) mesh with packed rows (float32 accumulator)."""
    from flax import nnx

    from bench.throughput import jaxsft_batches, sample_lengths
    from jaxsft import parallel

    config = ModelConfig.from_hf_dict(TINY)
    mesh = parallel.make_mesh(2, 2, jax.devices()[:4])
    lengths = sample_lengths("seed", 128, 1, 12, 0)
    host = jaxsft_batches(lengths, 128, 2, 1, "first_fit", config.vocab_size, 0)[0]
    assert host["input_ids"].shape[0] > 1  # K > 1: the accumulator is used
    for acc_dtype, tol in (("float32", 1e-6),):  # the K = 2+ micro-batch sums in another order: γ_K·Σ|g_k| ≤ 8 eps·max|g|
        from jaxsft.model.decoder import CausalLM

        settings = ModelSettings(param_dtype="float32", compute_dtype="float32", remat_policy="full",
                                 attn_implementation="xla")
        with jax.set_mesh(mesh):
            model = CausalLM(config, settings, rngs=nnx.Rngs(3))
            graphdef, params, rest = nnx.split(model, nnx.Param, ...)
            batch = {k: jax.device_put(v, parallel.batch_sharding(mesh)) for k, v in host.items()}
            out = {}
            for sink in (False, True):
                cfg = step.StepConfig("global_tokens", False, 2, 64, grad_accum_dtype=acc_dtype,
                                      accumulate_in_backward=sink)
                out[sink] = jax.jit(lambda p, b, cfg=cfg: step.accumulate_gradients(graphdef, rest, p, b, cfg))(
                    params, batch)
        (la, ga, *_), (lb, gb, *_) = out[False], out[True]
        assert float(la) == pytest.approx(float(lb), rel=1e-6)  # the same K partial losses, ≥ 0, summed otherwise: ≤ 8 eps
        for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
            assert a.dtype == b.dtype == jnp.dtype(acc_dtype) and a.shape == b.shape
            a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
            assert np.max(np.abs(a - b)) <= tol * np.max(np.abs(a)) + 1e-12, acc_dtype
