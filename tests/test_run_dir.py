"""The run directory: refused in one line when it cannot be one (before anything is loaded), one
run at a time, the lock gone with its process, config.yaml written."""

import subprocess
import sys

import pytest
import yaml

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
