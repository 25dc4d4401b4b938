"""Test set-up: 8 emulated CPU devices, set before anything imports jax."""
import os

from e2e import CPU_TEST_FLAGS, with_jaxsft_flags  # noqa: E402  (imports nothing of jax)

os.environ.setdefault("XLA_FLAGS", with_jaxsft_flags(f"--xla_force_host_platform_device_count=8 {CPU_TEST_FLAGS}"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# XLA:CPU compiles without LLVM's expensive optimisation passes (as JAX's own test suite does): the
# tests' tiny programs spend most of their time compiling, not running. The HLO (fusion, layouts,
# buffer assignment, so the XLA:GPU plans) is the same; the CPU code is slower and may round
# differently in the last bit, which no test depends on (exact comparisons are between runs of the
# same build; parity with torch is held to bounds derived from float32). Processes the tests start
# inherit it (and XLA_FLAGS' CPU_TEST_FLAGS, tests/e2e.py); tests/test_smoke.py runs the smoke recipe
# with the optimisations and emitters users get.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def base_model(tmp_path_factory):
    """A tiny random Qwen2 HF directory built from the bundled tokenizer, shared by the end-to-end
    tests (made once here, so the processes of a multi-process job never race to create it)."""
    from jaxsft import bundled, tiny

    return tiny.ensure_tiny_model(tmp_path_factory.mktemp("base") / "model", bundled.path("tokenizer"))


@pytest.fixture(scope="session", autouse=True)
def compile_cache(tmp_path_factory):
    """One JAX compilation cache for every training launch of the session, in this process or not
    (tests/e2e.py's train_args names it): a launch reads the steps an earlier one compiled. A cache
    hit gives the same executable, so the same numbers (tests/test_resume.py resumes on hits)."""
    from e2e import COMPILE_CACHE

    from jaxsft import compile_cache as cc

    # One directory for the session, also across pytest-xdist's workers (the session's base
    # directory is the parent of theirs); entries are written whole or not at all (jaxsft.compile_cache).
    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "compile_cache"
    shared.mkdir(exist_ok=True)
    os.environ[COMPILE_CACHE] = str(shared)
    # This process too: a test that compiles a program an earlier test compiled (the same tiny model,
    # settings and mesh through another jit) reads the executable instead of compiling it again.
    cc.enable(os.environ[COMPILE_CACHE], say=lambda *a: None)
    yield os.environ[COMPILE_CACHE]
    cc.enable(None, say=lambda *a: None)
    os.environ.pop(COMPILE_CACHE, None)


@pytest.fixture(scope="session")
def reference(base_model, tmp_path_factory):
    """The unbroken run of tests/runs.py's REFERENCE settings (6 steps, saved at 3 and 6 with the HF
    export), as a subprocess on 8 devices: its run directory, shared by the end-to-end files.
    Tests copy it before they change anything in it."""
    from e2e import metrics, run_train
    from runs import REFERENCE, REFERENCE_STEPS

    run_dir = tmp_path_factory.mktemp("reference")
    run_train(run_dir, base_model, *REFERENCE)
    assert sorted(m["step"] for m in metrics(run_dir) if "train/loss" in m["data"]) == list(range(1, REFERENCE_STEPS + 1))
    return run_dir


@pytest.fixture
def mlflow_store(tmp_path_factory, tmp_path) -> str:
    """The sqlite URI of a new, empty local mlflow store in tmp_path/mlflow/runs.db. A new store runs
    mlflow's ~100 schema migrations (10-30 s here): they run once per session (also across xdist
    workers, under a lock), and each test gets a copy of that migrated, empty database."""
    import fcntl
    import shutil

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    template = shared / "mlflow_template.db"
    with open(shared / "mlflow_template.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not template.exists():
            from mlflow.tracking import MlflowClient

            partial = shared / "mlflow_template.partial.db"
            partial.unlink(missing_ok=True)
            MlflowClient(tracking_uri=f"sqlite:///{partial}").search_experiments()  # creates and migrates it
            partial.rename(template)
    db = tmp_path / "mlflow" / "runs.db"
    db.parent.mkdir(exist_ok=True)
    shutil.copyfile(template, db)
    return f"sqlite:///{db}"
