"""`python -m jaxsft.train [--config RECIPE] [KEY=VALUE ...]` — the whole SFT job, top to bottom.

Settings resolved once (jaxsft.cli, jaxsft.config) → devices and mesh → run directory (locked, config.yaml) →
base model, tokenizer (+ added tokens), data → what trains, train state → resume → compiled steps → the loop:
train step, metrics one step late, validation, checkpoints, preemption."""

from __future__ import annotations

import sys
import time

import jax

from jaxsft import (checkpoint, cli, compile_cache, data, distributed, hf, metrics, optim, parallel, plan, reporting,
                    run_dir, step, trainable)


class Trainer:
    """`Trainer(settings).fit()`; each of `hooks` is called as hook(trainer, step) after every step."""

    def __init__(self, settings, hooks=()):
        s, self.settings, self.hooks = settings, settings, list(hooks)
        distributed.start(s.trainer)  # first: nothing may touch a JAX backend before it
        self.say = print if jax.process_index() == 0 else lambda *a, **k: None
        self.mesh = parallel.mesh_for(s)
        self.run = run_dir.RunDirectory(s.trainer.default_local_dir, primary=jax.process_index() == 0)
        self.run.announce(s, self.mesh, self.say)
        compile_cache.enable(s.trainer.compile_cache_dir, self.say)  # before anything compiles
        self.model_dir = hf.model_directory(s.model)
        self.model_config = hf.read_config(self.model_dir)
        hf.check_weights(self.model_dir, self.model_config)  # from the files' headers: before the data work
        parallel.check_heads(self.model_config, self.mesh)
        tokenizer = hf.load_tokenizer(self.model_dir, trust_remote_code=s.model.trust_remote_code)
        added, self.model_config = hf.extend_vocabulary(s.model.added_tokens, tokenizer, self.model_config, say=self.say)
        train, val = data.build_datasets(s.data, tokenizer, vocab_size=self.model_config.vocab_size)
        s = self.settings = plan.settle_auto(s, train, self.model_config, self.mesh, added, say=self.say)  # `auto` settings
        self.data = data.RunData.build(s, train, val, pad_token_id=tokenizer.pad_token_id, dp=self.mesh.shape["dp"],
                                       process_index=jax.process_index(), process_count=jax.process_count(), say=self.say)
        model = hf.load_model(self.model_dir, self.mesh, s.model.compute_settings(), seed=s.trainer.seed, config=self.model_config)
        partition = trainable.for_model(model, s.model, added, say=self.say)  # LoRA adapters, new rows, or all
        tx, lr_schedule = optim.make_optimizer(s.optim, self.data.total_steps, s.model.trained_dtype)
        with jax.set_mesh(self.mesh):
            graphdef, rest, state, shardings = step.init_train_state(
                model, tx, self.mesh, partition, optimizer_offload=s.model.optimizer_offload, say=self.say)
        self.ckpt = checkpoint.Checkpointer.for_run(s, self.model_dir, export=hf.Export(self.model_config, s.model.lora, added))
        self.state = self.ckpt.resume(s.checkpoint, state, shardings, say=self.say, restore_data=lambda saved: (
            self.data.loader.set_state(saved, accept_changed_data=s.checkpoint.resume_accept_changed_data, say=self.say)))
        self.step = int(self.state["step"])
        self.train_step, self.eval_step = step.compile_steps(graphdef, rest, tx, lr_schedule, step.StepConfig.of(s, self.mesh),
                                                             shardings, self.mesh, partition)
        self.preempted = checkpoint.PreemptionFlag()

    def fit(self) -> None:
        s, last_step = self.settings, self.data.last_step
        logger = metrics.MetricsLogger.for_run(s, self.run.path, initial_step=self.step, last_step=last_step, say=self.say)
        reporter = reporting.StepReporter.for_run(logger, s, self.model_config, last_step=last_step)
        with jax.set_mesh(self.mesh):
            while self.step < last_step:
                epoch, batch = next(self.data.loader)
                t0 = time.perf_counter()
                self.state, m = self.train_step(self.state, distributed.global_batch(batch, parallel.batch_sharding(self.mesh)))
                self.step += 1
                reporter.dispatched(self.step, m, epoch, self.data.step_lengths(), t0)
                stop = self.preempted.check(self.step)  # every process agrees on the step to stop at
                test_due, save_due = self.data.due(self.step, stop)
                if test_due or save_due:
                    reporter.flush()  # the step's time ends here: validating and saving are not training
                    if test_due:  # token-weighted over every validation sample
                        reporter.validated(self.step, *step.evaluate(self.eval_step, self.state["params"],
                                                                     self.data.val_batches(self.mesh)))
                    if save_due:
                        self.ckpt.save(self.step, self.state, data_state=self.data.loader.get_state(), meta={"epoch": epoch})
                    reporter.restart_clock()
                for hook in self.hooks:
                    hook(self, self.step)
                self.ckpt.poll()  # finish a completed background save (tracker, retention) without blocking
                if stop:
                    self.ckpt.wait()
                    self.say(f"[jaxsft] preempted: saved step {self.step} to {self.ckpt.step_dir(self.step)}; exiting")
                    break
            reporter.flush()
        for close in (self.ckpt.close, logger.close, self.preempted.restore, self.run.close):
            close()
        self.say(f"[jaxsft] done at step {self.step}; run directory {self.run.path}")


def main(argv: list[str], hooks=()) -> int:
    return cli.run(argv, lambda settings: Trainer(settings, hooks).fit())


if __name__ == "__main__":
    cli.exit(main(sys.argv[1:]))
