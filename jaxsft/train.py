"""`python -m jaxsft.train --config configs/NAME.py --config.KEY=VALUE ...` — the whole SFT job.

Read top to bottom: configuration → devices and mesh → data → model → optimizer and train state →
resume → the loop (train step, metrics, validation, checkpoints, preemption) → final export.
With no --config the smoke recipe runs.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from absl import app, flags, logging as absl_logging
from ml_collections import config_flags

from jaxsft import cli
from jaxsft.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file (configs/NAME.py).", lock_config=True)
_DRY_RUN = flags.DEFINE_string("dry_run", None, "Plan the train step for TARGET (cpu, gpu, h100:N, h200:N) and exit "
                               "without training: memory, FLOPs, collectives (jaxsft.plan).")
_DRY_RUN_JSON = flags.DEFINE_string("dry_run_json", None, "With --dry_run: also write the plan to this JSON file.")
_DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "configs" / "smoke.py"


def main(argv) -> None:
    del argv
    import jax
    import numpy as np

    from jaxsft import checkpoint, config, data, distributed, hf, metrics, optim, parallel, plan, step, tiny
    from jaxsft.model.qwen2 import ModelSettings
    from jaxsft.model.ulysses import check_ulysses

    # ---- configuration, devices, mesh ---------------------------------------------------------
    cfg = config.normalise(_CONFIG.value)
    cfg.data.apply_chat_template_kwargs.update(cli.template_kwargs)
    if _DRY_RUN_JSON.value and not _DRY_RUN.value:
        raise plan.PlanError("--dry_run_json needs --dry_run=TARGET (cpu, gpu, h100:N or h200:N)")
    target = plan.get_target(_DRY_RUN.value) if _DRY_RUN.value else None  # a plan only: nothing trains
    if target is None:
        distributed.maybe_initialize(cfg.trainer)
    n_dev = target.num_devices if target else jax.device_count()
    config.validate(cfg, num_devices=n_dev)
    sp = cfg.ulysses_sequence_parallel_size
    dp = n_dev // sp
    mesh = parallel.make_mesh(dp, sp, target.devices if target else None)
    if target is None:
        distributed.check_process_rows(mesh)
    main_process = jax.process_index() == 0
    run_dir = Path(cfg.trainer.default_local_dir)
    if target is None:
        run_dir.mkdir(parents=True, exist_ok=True)
    say = print if main_process else (lambda *a, **k: None)
    say(f"[jaxsft] {n_dev} device(s) ({mesh.devices.flat[0].device_kind}), {jax.process_count()} process(es), "
        f"mesh dp={dp} sp={sp}" + (f"; planning for {target.spec}, nothing runs" if target else ""))

    # ---- data ---------------------------------------------------------------------------------
    model_dir = Path(cfg.model.partial_pretrain)
    if cfg.model.build_tiny_from:
        if main_process and not (model_dir / "config.json").exists():
            tiny.ensure_tiny_model(model_dir, cfg.model.build_tiny_from, seed=cfg.trainer.seed, **cfg.model.tiny)
        # Unconditional: a process that already sees process 0's model must still meet it here.
        distributed.barrier("tiny-model")
    if not (model_dir / "config.json").is_file():  # else transformers would try to download it
        raise config.ConfigError(f"model.partial_pretrain={str(model_dir)!r} is not a Hugging Face model directory "
                                 f"(no config.json there); jaxsft reads local directories only")
    tokenizer = data.load_tokenizer(model_dir)
    train_set = data.build_dataset(cfg.data.train_files, cfg.data, tokenizer, split="train")
    val_set = data.build_dataset(cfg.data.val_files, cfg.data, tokenizer, split="val") if cfg.data.val_files else None
    if target or "auto" in (cfg.model.remat_policy, cfg.data.micro_batch_size_per_gpu):
        choice = _plan(cfg, target, train_set, dp, sp, model_dir, say)  # settles the `auto` settings
    loader = data.TrainLoader(
        train_set, train_batch_size=cfg.data.train_batch_size, micro_batch_size_per_gpu=cfg.data.micro_batch_size_per_gpu,
        dp=dp, max_length=cfg.data.max_length, packing=cfg.data.packing, seed=cfg.trainer.seed,
        total_epochs=cfg.trainer.total_epochs, pad_token_id=tokenizer.pad_token_id,
        process_index=jax.process_index(), process_count=jax.process_count())
    # verl: the schedule horizon comes from the epochs; total_training_steps only stops early.
    steps_per_epoch = loader.steps_per_epoch
    total_steps = steps_per_epoch * cfg.trainer.total_epochs
    last_step = min(cfg.trainer.total_training_steps or total_steps, total_steps)
    say(f"[jaxsft] {len(train_set)} train samples, {steps_per_epoch} steps/epoch, schedule over {total_steps} steps, "
        f"running to step {last_step}")
    if target:
        return _report_plan(choice, say)

    # ---- model, optimizer, train state --------------------------------------------------------
    model_config = hf.read_config(model_dir)
    try:  # both name the offending key (model.* or ulysses_sequence_parallel_size)
        settings = ModelSettings(param_dtype=cfg.model.param_dtype, compute_dtype=cfg.model.compute_dtype,
                                 scan_layers=cfg.model.scan_layers, remat_policy=cfg.model.remat_policy,
                                 attn_implementation=cfg.model.attn_implementation)
        check_ulysses(model_config.num_attention_heads, model_config.num_key_value_heads, sp)
    except ValueError as e:
        raise config.ConfigError(str(e)) from None
    tx, lr_schedule = optim.make_optimizer(cfg.optim, total_steps, cfg.model.param_dtype)
    with jax.set_mesh(mesh):
        graphdef, rest, state, state_shardings = step.init_train_state(
            hf.load_model(model_dir, mesh, settings), tx, mesh)

    # ---- resume -------------------------------------------------------------------------------
    ckpt = checkpoint.Checkpointer(cfg, process_index=jax.process_index())
    resume_dir = checkpoint.resolve_resume(cfg.trainer)
    if resume_dir is not None:
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_shardings)
        restored, data_state, saved_meta = ckpt.restore(resume_dir, abstract)
        state = {**state, **restored}  # entries not saved / not in load_contents start fresh
        if "step" not in restored:
            state["step"] = jax.device_put(np.int32(saved_meta["step"]), state_shardings["step"])
        if data_state is not None:
            loader.set_state(data_state)
        say(f"[jaxsft] resumed from {resume_dir} at step {int(state['step'])}")
    global_step = int(state["step"])

    # ---- compiled steps -----------------------------------------------------------------------
    step_cfg = step.StepConfig(loss_normalization=cfg.trainer.loss_normalization,
                               balance_dp_token=cfg.data.balance_dp_token, dp=dp,
                               chunk_size=cfg.trainer.loss_chunk_size, grad_accum_dtype=cfg.optim.grad_accum_dtype,
                               accumulate_in_backward=plan.accumulates_in_backward(settings))
    batch_sharding = parallel.batch_sharding(mesh)
    train_step = jax.jit(step.make_train_step(graphdef, rest, tx, lr_schedule, step_cfg),
                         donate_argnums=0, out_shardings=(state_shardings, parallel.replicated(mesh)))
    eval_step = jax.jit(step.make_eval_step(graphdef, rest, cfg.trainer.loss_chunk_size))

    def put(batch, sharding):
        return {k: distributed.global_array(v, sharding) for k, v in batch.items()}

    def validate() -> float:
        total = count = 0.0
        for vb in data.val_batches(val_set, rows=dp * cfg.data.micro_batch_size_per_gpu, max_length=cfg.data.max_length,
                                   pad_token_id=tokenizer.pad_token_id, process_index=jax.process_index(),
                                   process_count=jax.process_count()):
            with jax.set_mesh(mesh):
                s, n = eval_step(state["params"], put(vb, parallel.eval_batch_sharding(mesh)))
            total, count = total + float(s), count + float(n)
        return total / max(count, 1.0)

    # ---- the loop -----------------------------------------------------------------------------
    logger = metrics.MetricsLogger(cfg.trainer.logger, run_dir, cfg.trainer.project_name, cfg.trainer.experiment_name,
                                   cfg.to_dict(), total_steps=last_step, is_main_process=main_process,
                                   initial_step=global_step)
    flops_model = metrics.FlopCounter(model_config)
    peak = cfg.trainer.peak_flops_per_device or metrics.peak_flops_per_device(jax.devices()[0])
    preempted = checkpoint.PreemptionFlag()
    meta = {"config": cfg.to_dict(), "base_model": str(model_dir.resolve())}
    pending = None  # the previous step's metrics, read after the next step is dispatched (no host sync)
    compile_done = False
    t_last = time.perf_counter()

    def report(p) -> None:
        nonlocal t_last
        g, m, host = p
        m = jax.device_get(m)
        now = time.perf_counter()
        dt, t_last = now - t_last, now
        row = {"train/loss": float(m["loss"]), "train/lr": float(m["lr"]), "train/grad_norm": float(m["grad_norm"]),
               "train/loss_tokens": float(m["loss_tokens"]), "train/time(s)": dt,
               "train/tokens_per_sec": float(host["lengths"].sum()) / dt,
               "train/loss_tokens_per_sec": float(m["loss_tokens"]) / dt,
               "train/epoch": host["epoch"]}
        if peak:
            row["train/mfu"] = flops_model.step_flops(host["lengths"]) / dt / (peak * n_dev)
        if not math.isfinite(row["train/grad_norm"]):
            say(f"[jaxsft] step {g}: non-finite gradient norm; update skipped (lr schedule advanced)")
        logger.log(g, row)

    with jax.set_mesh(mesh):
        while global_step < last_step:
            epoch, batch = next(loader)
            # every sample of the step, on every process (not only this process's rows)
            host = {"epoch": epoch, "lengths": loader.step_lengths(loader.next_step - 1)}
            t0 = time.perf_counter()
            state, m = train_step(state, put(batch, batch_sharding))
            global_step += 1
            if not compile_done:
                jax.block_until_ready(m)
                compile_s = time.perf_counter() - t0
                logger.log(global_step, {"perf/compile_and_first_step(s)": compile_s})
                compile_done, t_last = True, t0  # step 1's time includes the compilation
                report((global_step, m, host))
            else:
                if pending is not None:
                    report(pending)
                pending = (global_step, m, host)
            is_last = global_step >= last_step
            test_due = val_set is not None and (is_last or (cfg.trainer.test_freq > 0 and global_step % cfg.trainer.test_freq == 0))
            stop = preempted.check(global_step)  # all processes agree on the step to stop at
            save_due = is_last or stop or (cfg.trainer.save_freq > 0 and global_step % cfg.trainer.save_freq == 0)
            if (test_due or save_due) and pending is not None:
                report(pending)
                pending = None
            if test_due:
                logger.log(global_step, {"val/loss": validate()})
            if save_due:
                ckpt.save(global_step, state, data_state=loader.get_state(), meta={**meta, "epoch": epoch},
                          export=lambda s=state: hf.export_tensors(s["params"], model_config))
                t_last = time.perf_counter()
            _test_hook(global_step, ckpt, preempted, say)
            ckpt.poll()  # finish a completed background save (tracker, retention) without blocking
            if stop:
                ckpt.wait()
                say(f"[jaxsft] preempted: saved step {global_step} to {ckpt.step_dir(global_step)}; exiting")
                break
        if pending is not None:
            report(pending)
    ckpt.close()
    logger.close()
    preempted.restore()
    say(f"[jaxsft] done at step {global_step}; run directory {run_dir}")


def _plan(cfg, target, train_set, dp: int, sp: int, model_dir, say):
    """Compile the train step for `target` (or this machine's devices for `auto` settings in a
    real run) and settle `auto` remat policy / micro-batch size in `cfg` (jaxsft.plan)."""
    import jax

    from jaxsft import config, data, hf, optim, plan, step
    from jaxsft.model.ulysses import check_ulysses

    target = target or plan.get_target("gpu" if jax.default_backend() == "gpu" else "cpu")
    model_config = hf.read_config(model_dir)
    try:
        check_ulysses(model_config.num_attention_heads, model_config.num_key_value_heads, sp)
    except ValueError as e:
        raise config.ConfigError(str(e)) from None
    per_rank = cfg.data.train_batch_size // dp
    rows = per_rank
    if cfg.data.packing != "none":  # the most packed rows a rank needs in any step of the run
        rows = data.TrainLoader(train_set, train_batch_size=cfg.data.train_batch_size, micro_batch_size_per_gpu=1,
                                dp=dp, max_length=cfg.data.max_length, packing=cfg.data.packing,
                                seed=cfg.trainer.seed, total_epochs=cfg.trainer.total_epochs,
                                verbose=False).num_micro_batches
    total_steps = len(train_set) // cfg.data.train_batch_size * cfg.trainer.total_epochs
    tx, lr_schedule = optim.make_optimizer(cfg.optim, total_steps, cfg.model.param_dtype)
    step_cfg = step.StepConfig(loss_normalization=cfg.trainer.loss_normalization,
                               balance_dp_token=cfg.data.balance_dp_token, dp=dp,
                               chunk_size=cfg.trainer.loss_chunk_size, grad_accum_dtype=cfg.optim.grad_accum_dtype)
    settings = dict(param_dtype=cfg.model.param_dtype, compute_dtype=cfg.model.compute_dtype,
                    scan_layers=cfg.model.scan_layers, attn_implementation=cfg.model.attn_implementation)
    try:
        choice = plan.plan_run(target, model_config=model_config, settings_kwargs=settings,
                               remat_policy=cfg.model.remat_policy, micro_batch=cfg.data.micro_batch_size_per_gpu,
                               samples_per_rank=per_rank, rows_per_rank=rows, dp=dp, sp=sp,
                               seq_len=cfg.data.max_length, tx=tx, lr_schedule=lr_schedule, step_cfg=step_cfg)
    except ValueError as e:  # a setting ModelSettings refuses, naming its key
        raise config.ConfigError(str(e)) from None
    if "auto" in (cfg.model.remat_policy, cfg.data.micro_batch_size_per_gpu):
        say(choice.reason)
    with cfg.ignore_type():  # "auto" (str) becomes an int
        cfg.model.remat_policy, cfg.data.micro_batch_size_per_gpu = choice.remat_policy, choice.micro_batch_size
    return choice


def _report_plan(choice, say) -> None:
    """--dry_run: print the plan, write --dry_run_json, exit 2 (one line) if it does not fit."""
    import json

    from jaxsft import plan

    for line in choice.plan.describe():
        say(line)
    if _DRY_RUN_JSON.value:
        out = dict(choice.plan.to_json(), auto={"reason": choice.reason, "tried": [
            {"remat_policy": p, "micro_batch_size_per_gpu": b, "per_device_peak_bytes": peak}
            for p, b, peak in choice.tried]})
        Path(_DRY_RUN_JSON.value).write_text(json.dumps(out, indent=1) + "\n")
        say(f"[plan] written to {_DRY_RUN_JSON.value}")
    p = choice.plan
    if not p.fits:
        raise plan.PlanError(f"the plan for {p.target} does not fit: {p.per_device_peak_bytes / plan.GiB:.2f} GiB per "
                             f"device planned, {(1 - plan.FIT_MARGIN) * p.device_memory_bytes / plan.GiB:.2f} GiB "
                             f"allowed ({1 - plan.FIT_MARGIN:.0%} of {p.device_memory_bytes / plan.GiB:.2f} GiB usable)")


def _test_hook(step: int, ckpt, preempted, say) -> None:
    """Deterministic kill points for tests/test_resume.py, off unless JAXSFT_TEST_HOOK is set:
    `kill_mid_save:N` SIGKILLs this process once step N's save has put its temporary directory
    on disk (Orbax still writing, tracker not yet moved); `pause:N` completes step N's save, prints
    a line and waits for a signal (then goes on to the next step), so a test can kill or preempt it
    at a known step."""
    hook = os.environ.get("JAXSFT_TEST_HOOK", "")
    if not hook or hook.rsplit(":", 1)[1] != str(step):
        return
    if hook.startswith("kill_mid_save:"):
        # Orbax may create the directory in its background thread: wait for it (or for the commit).
        while not (list(ckpt.root.glob(f"{ckpt.step_dir(step).name}.orbax-checkpoint-tmp*"))
                   or ckpt.step_dir(step).exists()):
            time.sleep(0.001)
        os.kill(os.getpid(), signal.SIGKILL)
    if hook.startswith("pause:"):
        ckpt.wait()
        say(f"[jaxsft] test hook: paused after step {step}", flush=True)
        while not preempted.is_set():
            time.sleep(0.02)


def _main_or_exit(argv) -> None:
    """`main`; a user-input error prints one line and exits 2. In a multi-process job any error
    ends this process at once with its cause in one line: otherwise jax's exit hook would wait at
    a shutdown barrier for processes that may be gone, then abort with a C++ trace."""
    try:
        main(argv)
    except UserError as e:
        print(f"jaxsft: error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(2)
    except Exception as e:
        from jaxsft import distributed

        if not distributed.is_multiprocess():
            raise
        import jax

        traceback.print_exc()
        cause = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"[jaxsft] process {jax.process_index()} of {jax.process_count()} stopped: {type(e).__name__}: {cause}\n"
              f"[jaxsft] a failed collective usually means another process died (its log has the cause); "
              f"relaunch every process to resume from the last checkpoint", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)


def run() -> None:
    """Console entry point: verl-style settings translated, the smoke recipe when no --config."""
    from jaxsft import plan

    sys.argv[1:] = cli.verl_style_overrides(sys.argv[1:])
    plan.prepare_environment(plan.target_from_argv(sys.argv[1:]))
    cli.check_override_keys(sys.argv[1:])
    sys.argv[1:] = cli.take_template_kwargs(sys.argv[1:])
    if not any(a == "--config" or a.startswith("--config=") for a in sys.argv[1:]):
        sys.argv[1:1] = [f"--config={_DEFAULT_RECIPE}"]
    absl_logging.set_verbosity(absl_logging.WARNING)
    app.run(_main_or_exit)


if __name__ == "__main__":
    run()
