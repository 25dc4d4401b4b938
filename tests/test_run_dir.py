"""The run directory: refused in one line when it cannot be one (before anything is loaded), one
run at a time, the lock gone with its process, config.yaml written."""

import subprocess
import sys

import pytest
import yaml
from unprivileged import run_python

from jaxsft.config import ConfigError
from jaxsft.run_dir import CONFIG_FILE, RunDirectory


def test_a_file_or_a_file_as_parent_is_refused(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ConfigError, match=r"trainer\.default_local_dir='.*afile' is a file, not a directory"):
        RunDirectory(afile)
    with pytest.raises(ConfigError, match=r"trainer\.default_local_dir='.*afile/run' cannot be created \(Not a directory\)"):
        RunDirectory(afile / "run")


def test_one_holder_at_a_time_and_the_lock_dies_with_its_process(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from jaxsft.run_dir import RunDirectory; "
                               f"RunDirectory({str(tmp_path)!r}); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ConfigError, match=rf"is in use by another run \(pid {holder.pid} on .*, started "):
        RunDirectory(tmp_path)
    holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the flock
    holder.wait()
    run = RunDirectory(tmp_path)
    run.write_config({"optim": {"lr": 2e-5}, "data": {"train_files": ["/a"]}})
    assert yaml.safe_load((tmp_path / CONFIG_FILE).read_text()) == {"optim": {"lr": 2e-5}, "data": {"train_files": ["/a"]}}
    run.close()
    RunDirectory(tmp_path).close()  # released by close() too
    RunDirectory(tmp_path, primary=False)  # other processes of a job take no lock


REFUSAL = """
from jaxsft.config import ConfigError
from jaxsft.run_dir import RunDirectory
try:
    RunDirectory({path!r})
    print("accepted")
except ConfigError as e:
    print(e)
"""


@pytest.mark.slow  # over ~5 s on 2 cores: CI's full run, not the ≤ 3-minute inner loop
def test_read_only_directory_and_unwritable_parent(tmp_path):
    """As a user whom permissions bind (root with its file overrides dropped): a read-only run
    directory, and a missing one under a read-only parent, are each one sentence."""
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    parent = tmp_path / "parent"
    parent.mkdir()
    read_only.chmod(0o555)
    parent.chmod(0o555)
    try:
        refused = run_python(REFUSAL.format(path=str(read_only))).stdout.strip()
        assert refused == f"trainer.default_local_dir={str(read_only)!r} is not writable (Permission denied)"
        refused = run_python(REFUSAL.format(path=str(parent / "run"))).stdout.strip()
        assert refused == f"trainer.default_local_dir={str(parent / 'run')!r} cannot be created (Permission denied)"
    finally:
        read_only.chmod(0o755)
        parent.chmod(0o755)
    assert run_python(REFUSAL.format(path=str(parent / "run"))).stdout.strip() == "accepted"
    assert not list(read_only.iterdir())
