"""Helpers for end-to-end tests: run `python -m jaxsft.train` in a subprocess and read its metrics."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from jaxsft.xla_flags import with_jaxsft_flags  # imports nothing of jax

ROOT = Path(__file__).resolve().parent.parent
SMOKE = str(ROOT / "configs" / "smoke.py")
COMPILE_CACHE = "JAXSFT_TEST_COMPILE_CACHE"  # the environment variable naming the session's compilation cache
# XLA:CPU's older (elemental IR) kernel emitters instead of its MLIR fusion emitters: the tests' tiny
# train steps compile in a third of the CPU time (7.5 s -> 2.4 s for tests/test_train_step.py's, same
# loss to the last printed digit; the run time is the same). Every process of the suite gets them;
# tests/test_smoke.py runs with XLA's defaults, as users do.
CPU_TEST_FLAGS = "--xla_cpu_use_fusion_emitters=false"


def env_for(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COORDINATOR")}
    flags = with_jaxsft_flags(f"--xla_force_host_platform_device_count={devices} {CPU_TEST_FLAGS}")
    env.update({"XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu",
                "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": str(ROOT)})  # this checkout's jaxsft, also for scripts run from tests/
    env.update({k: str(v) for k, v in extra.items()})
    return env


_RERUNS: dict[str, str] = {}  # test function's node id -> the report of its rerun (all its parameters)


def under_xla_defaults(request) -> bool:
    """For a test whose claim is bit-identity between two differently compiled programs (a property
    of XLA's code generation, which CPU_TEST_FLAGS changes): when this process runs with
    CPU_TEST_FLAGS, run the test again in a pytest process with XLA's default emitters, as users
    compile, assert it passed, and return True (the caller then returns); False where it may run here.
    One process reruns every parameter of the test function (one interpreter start, not one each);
    each parameter then asserts its own result."""
    if CPU_TEST_FLAGS not in os.environ.get("XLA_FLAGS", ""):
        return False
    nodeid = request.node.nodeid
    function = nodeid.split("[", 1)[0]
    if function not in _RERUNS:
        env = env_for(8)
        env["XLA_FLAGS"] = env["XLA_FLAGS"].replace(CPU_TEST_FLAGS, "").strip()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", function],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        _RERUNS[function] = proc.stdout
    report = _RERUNS[function]
    assert f"PASSED {nodeid}\n" in report, f"{nodeid} under XLA's default emitters:\n{report[-6000:]}"
    return True


def train_args(run_dir: Path, base_model: Path, *overrides: str) -> list[str]:
    """The smoke recipe on `base_model` in `run_dir`; unless `overrides` name trainer.compile_cache*
    themselves, compiled steps go to the session's shared cache (conftest.py), so that no launch
    compiles what an earlier one did."""
    shared = os.environ.get(COMPILE_CACHE)
    cache = () if not shared or any("trainer.compile_cache" in o for o in overrides) else \
        (f"--config.trainer.compile_cache_dir={shared}",)
    return [sys.executable, "-m", "jaxsft.train", f"--config={SMOKE}",
            f"--config.trainer.default_local_dir={run_dir}", f"--config.model.partial_pretrain={base_model}",
            *cache, *overrides]


def run_train(run_dir: Path, base_model: Path, *overrides: str, devices: int = 8, timeout: float = 600,
              **env) -> subprocess.CompletedProcess:
    proc = subprocess.run(train_args(run_dir, base_model, *overrides), cwd=ROOT, env=env_for(devices, **env),
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"train exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                             f"--- stderr\n{proc.stderr[-6000:]}")
    return proc


def start_train(run_dir: Path, base_model: Path, *overrides: str, devices: int = 8, hook: str | None = None,
                **env) -> subprocess.Popen:
    """The trainer in the background; `hook` installs a kill point of tests/hooked_train.py."""
    args = train_args(run_dir, base_model, *overrides)
    if hook is not None:
        args[1:3] = [str(ROOT / "tests" / "hooked_train.py"), hook]
    return subprocess.Popen(args, cwd=ROOT, env=env_for(devices, **env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(run_dir: Path) -> dict[int, float]:
    """step → train/loss; a resumed run that repeats a step keeps the later value."""
    return {m["step"]: m["data"]["train/loss"] for m in metrics(run_dir) if "train/loss" in m["data"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
