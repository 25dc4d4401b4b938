"""`python tests/hooked_train.py HOOK TRAIN_ARGS...`: `python -m jaxsft.train TRAIN_ARGS` with one
deterministic kill point installed as a Trainer hook (tests/test_resume.py):

- `kill_mid_save:N` SIGKILLs the process once step N's save has put its temporary directory on
  disk (Orbax still writing, tracker not yet moved);
- `pause:N` completes step N's save, prints a line and waits for a signal (then goes on), so a
  test can kill or preempt the run at a known step.
"""

import os
import signal
import sys
import time


def hook_for(spec: str):
    kind, step = spec.rsplit(":", 1)
    step = int(step)

    def hook(trainer, at: int) -> None:
        if at != step:
            return
        ckpt = trainer.ckpt
        if kind == "kill_mid_save":
            # Orbax may create the directory in its background thread: wait for it (or for the commit).
            while not (list(ckpt.root.glob(f"{ckpt.step_dir(at).name}.orbax-checkpoint-tmp*")) or ckpt.step_dir(at).exists()):
                time.sleep(0.001)
            os.kill(os.getpid(), signal.SIGKILL)
        elif kind == "pause":
            ckpt.wait()
            print(f"[jaxsft] test hook: paused after step {at}", flush=True)
            while not trainer.preempted.is_set():
                time.sleep(0.02)
        else:
            raise ValueError(f"unknown test hook {spec!r}")

    return hook


if __name__ == "__main__":
    from jaxsft import train

    code = train.main(sys.argv[2:], hooks=[hook_for(sys.argv[1])])
    sys.stdout.flush()
    os._exit(code)
