"""Bad input through the command line: one line naming the key or file, exit code 2, nothing run."""

import pytest

from e2e import ROOT, env_for, train_args
import subprocess


@pytest.mark.parametrize("devices, override, expect", [
    (1, "--config.data.truncation=middle", "data.truncation='middle' is not one of error, left, right"),
    (8, "--config.data.train_batch_size=12", "data.train_batch_size=12 is not divisible by the data-parallel size 8"),
    (1, "--config.data.train_files=/nonexistent/train.parquet", "/nonexistent/train.parquet: file not found"),
    (1, "--config.model.remat_policy=sometimes", "model.remat_policy"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, devices, override, expect):
    proc = subprocess.run(train_args(tmp_path / "run", tmp_path / "base", override), cwd=ROOT, env=env_for(devices),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("jaxsft: error:")]
    assert len(errors) == 1 and expect in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
