"""`python -m jaxsft.train [--config RECIPE] [KEY=VALUE ...]` — the whole SFT job, top to bottom.

Settings resolved once (jaxsft.cli, jaxsft.config) → the setup phases of jaxsft.setup: devices and
mesh, run directory (locked), base model and tokenizer (+ added tokens), data, `auto` settings
(config.yaml records the chosen ones), model and what trains, train state (fresh or resumed),
compiled steps → the loop: train step, metrics one step late, validation, checkpoints, preemption."""

from __future__ import annotations

import sys
import time

import jax

from jaxsft import cli, compile_cache, distributed, metrics, parallel, reporting, run_dir, setup, step
from jaxsft.data.mixture import source_names
from jaxsft.preemption import PreemptionFlag


class Trainer:
    """`Trainer(settings).fit()`; each of `hooks` is called as hook(trainer, step) after every step."""

    def __init__(self, settings, hooks=()):
        s, self.hooks = settings, list(hooks)
        self.mesh = setup.start_runtime(s)  # first: nothing may touch a JAX backend before it
        self.say = print if distributed.is_primary() else lambda *a, **k: None
        self.run = run_dir.RunDirectory(s.checkpoint.default_local_dir, primary=distributed.is_primary())
        self.run.announce(s, self.mesh, self.say)
        compile_cache.enable(s.trainer.compile_cache_dir, self.say)  # before anything compiles
        base = setup.find_model(s, self.mesh, say=self.say)
        self.model_dir, self.model_config = base.dir, base.config
        train, val = setup.build_data(s, base)
        s, max_rows = setup.settle_auto(s, base, train, self.mesh, say=self.say)
        self.settings = s
        self.run.record_config(s.config)  # what runs: `auto` replaced by the planned choice
        self.data = setup.build_run_data(s, base, train, val, self.mesh, max_rows_per_rank=max_rows, say=self.say)
        model, partition = setup.build_model(s, base, self.mesh, say=self.say)
        self.ckpt = setup.make_checkpointer(s, base)
        graphdef, rest, self.state, shardings, tx, lr_schedule = setup.build_state(
            s, model, partition, self.data, self.mesh, self.ckpt, say=self.say)
        self.step = int(self.state["step"])
        self.train_step, self.eval_step = setup.compile_steps(s, graphdef, rest, tx, lr_schedule, shardings, self.mesh,
                                                              partition)
        self.preempted = PreemptionFlag()

    def fit(self) -> None:
        s, last_step = self.settings, self.data.last_step
        logger = metrics.MetricsLogger.for_run(s, self.run.path, initial_step=self.step, last_step=last_step, say=self.say)
        sources = source_names(s.data.train_files) if step.source_count(s.data) else ()
        reporter = reporting.StepReporter.for_run(logger, s, self.model_config, last_step=last_step, sources=sources)
        if self.step < last_step:
            self.say(compile_cache.compile_line(s.trainer.compile_cache_dir))
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
                        logger.sync()  # the logged steps on disk before the checkpoint that follows them
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
    """The command line: `--dry_run` plans (jaxsft.setup.dry_run), otherwise the job trains."""
    return cli.run(argv, lambda settings: Trainer(settings, hooks).fit(), dry_run=setup.dry_run)


def entry_point() -> None:
    """The `jaxsft-train` console script."""
    cli.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    entry_point()
