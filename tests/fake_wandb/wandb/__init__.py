"""A stand-in for the wandb package in tests (no network, no account): records what the trainer
sends, one JSON line per call, to the file named by FAKE_WANDB_LOG."""

import json
import os


def _record(kind, **fields):
    with open(os.environ["FAKE_WANDB_LOG"], "a") as f:
        f.write(json.dumps({"call": kind, **fields}, default=str) + "\n")


class _Run:
    def log(self, row, step=None):
        _record("log", row=row, step=step)

    def finish(self):
        _record("finish")


def init(project=None, name=None, config=None, **kwargs):
    _record("init", project=project, name=name, config=config)
    return _Run()
