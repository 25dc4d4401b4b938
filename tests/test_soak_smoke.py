"""A short run of the fault soak (tests/hostile/soak.py, issue 27): the soak's --plain command (the
suite's reference command, logging to tensorboard too) from a fresh directory, launched with one
injected fault (seed 3: SIGKILL during the first save) and again until it ends; its end compared
with the session's reference run (losses and grad norms bit for bit, once each in metrics.jsonl and
tensorboard, final weights and optimizer state, the HF export, no leftovers). The soak's launches
are processes of their own (what a kill needs) sharing the session's compilation cache. The full
soak (hundreds of faults, every mode) is run by hand: docs/HOSTILE.md."""

from __future__ import annotations

import json
import os
import sys

import pytest
from e2e import COMPILE_CACHE, ROOT

pytestmark = pytest.mark.slow

sys.path.insert(0, str(ROOT / "tests" / "hostile"))


def test_a_short_fault_soak_keeps_every_promise(base_model, reference, tmp_path):
    """The session's `reference` run is the soak's reference: --plain is its command (with
    tensorboard, which changes no number), so no launch here compiles (the session's cache holds
    its step) and only two launches run: the faulted one and the last."""
    import soak

    args = ["--faults", "1", "--per-campaign", "1", "--seed", "3", "--mode", "full", "--procs", "1", "--plain",
            "--base-model", str(base_model), "--reference", str(reference), "--keep", str(tmp_path / "soak"),
            "--json", str(tmp_path / "soak.json")]
    if os.environ.get(COMPILE_CACHE):
        args += ["--compile-cache", os.environ[COMPILE_CACHE]]
    code = soak.main(args)
    report = json.loads((tmp_path / "soak.json").read_text())
    assert code == 0, report["failure"]
    assert report["faults"] == 1 and report["passed"], report
