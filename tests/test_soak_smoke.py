"""A short run of the fault soak (tests/hostile/soak.py, issue 27): a reference run of the soak's
--plain command (the suite's reference command, logging to tensorboard too), then a fresh run
launched with one injected fault (seed 3: SIGKILL during the first save) until it ends, and its end
compared with the reference (losses and grad norms bit for bit, once each in metrics.jsonl and
tensorboard, final weights and optimizer state, the HF export, no leftovers). The soak's launches
are processes of their own (what a kill needs) sharing the session's compilation cache. About 45 s
on an idle 2-core machine; the full soak (hundreds of faults, every mode) is run by hand:
docs/HOSTILE.md."""

from __future__ import annotations

import json
import os
import sys

import pytest
from e2e import COMPILE_CACHE, ROOT

pytestmark = pytest.mark.slow

sys.path.insert(0, str(ROOT / "tests" / "hostile"))


def test_a_short_fault_soak_keeps_every_promise(base_model, reference, tmp_path):
    """`reference` is requested for its compiled train step: the soak's --plain command is its
    program, so no launch here compiles (the session's cache holds it)."""
    import soak

    args = ["--faults", "1", "--per-campaign", "1", "--seed", "3", "--mode", "full", "--procs", "1", "--plain",
            "--base-model", str(base_model), "--keep", str(tmp_path / "soak"), "--json", str(tmp_path / "soak.json")]
    if os.environ.get(COMPILE_CACHE):
        args += ["--compile-cache", os.environ[COMPILE_CACHE]]
    code = soak.main(args)
    report = json.loads((tmp_path / "soak.json").read_text())
    assert code == 0, report["failure"]
    assert report["faults"] == 1 and report["passed"], report
