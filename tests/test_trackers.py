"""The remote trackers (jaxsft.trackers): mlflow against a real local store read back with mlflow's
own client, and wandb (a stand-in module) continuing its run after a resume, one row per step."""

from __future__ import annotations

import json
import sys
import types

import pytest
import yaml

from jaxsft import metrics, trackers

CONFIG = {"data": {"max_length": 256, "train_files": ["a.parquet", "b.parquet"]}, "optim": {"lr": 1e-5},
          "trainer": {"logger": ["console", "mlflow"], "project_name": "proj"}}


def rows_of(step: int, launch: int) -> dict:
    """A step's metrics: the same loss whichever launch computes it (the trainer's resume is exact),
    another time."""
    return {"train/loss": 1.0 / step, "train/lr": 1e-5 * step, "train/loss_tokens": 100 + step,
            "train/time(s)": 0.5 + launch + step / 10, "train/epoch": step // 4}


def launch(run_dir, names, initial_step: int, steps, n: int):
    logger = metrics.MetricsLogger(names, run_dir, "proj", "exp", CONFIG, total_steps=6, initial_step=initial_step)
    for step in steps:
        logger.log(step, rows_of(step, n))
    return logger


def history(client, run_id) -> dict[str, dict[int, list[float]]]:
    """metric → step → every value the store holds for it."""
    out: dict[str, dict[int, list[float]]] = {}
    for key in client.get_run(run_id).data.metrics:
        for m in client.get_metric_history(run_id, key):
            out.setdefault(key, {}).setdefault(m.step, []).append(m.value)
    return out


@pytest.mark.slow  # mlflow's client and sqlite store (conftest.py mlflow_store: its schema migrations once a session)
def test_mlflow_run_resumed_after_a_kill_has_one_row_per_step(tmp_path, monkeypatch, mlflow_store):
    """Launch 1 logs steps 1-5 and is killed (no close); launch 2 resumes from the step-3 checkpoint
    and logs steps 4-6 again. The same mlflow run holds every metric once per step, equal to
    metrics.jsonl step by step (mlflow names: `train/time(s)` → `train/time_s_`); steps 4-5 keep
    launch 1's values (their timings are launch 1's, the rest is the same); the resolved
    configuration is the run's params and RUN_DIR/config.yaml its artifact."""
    import mlflow

    monkeypatch.chdir(tmp_path)  # mlflow's default artifact root is ./mlruns
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    names = ("file", "mlflow")
    launch(run_dir, names, 0, range(1, 6), 1)  # killed after step 5: nothing closed
    run_id = json.loads((run_dir / trackers.TRACKERS_FILE).read_text())["mlflow"]
    launch(run_dir, names, 3, range(4, 7), 2).close()

    client = mlflow.tracking.MlflowClient(tracking_uri=mlflow_store)
    run = client.get_run(run_id)
    assert run.info.run_name == "exp" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "proj"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    held = history(client, run_id)
    jsonl = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in jsonl] == [1, 2, 3, 4, 5, 6]
    assert set(held) == {trackers.mlflow_name(k) for k in rows_of(1, 1)} and "train/time_s_" in held
    for key, by_step in held.items():
        assert sorted(by_step) == [1, 2, 3, 4, 5, 6] and all(len(v) == 1 for v in by_step.values()), (key, by_step)
    for r in jsonl:
        for k, v in r["data"].items():
            want = rows_of(r["step"], 1)[k] if r["step"] in (4, 5) else v  # steps 4-5: launch 1's (timing)
            assert held[trackers.mlflow_name(k)][r["step"]] == [pytest.approx(want, rel=1e-15)], (r["step"], k)
    params = run.data.params
    assert params["data.max_length"] == "256" and params["optim.lr"] == "1e-05"
    assert params["data.train_files"] == "['a.parquet', 'b.parquet']"
    assert [a.path for a in client.list_artifacts(run_id)] == ["config.yaml"]

    # a fresh start (step 0) in the same run directory is a new mlflow run
    launch(run_dir, names, 0, [1], 3).close()
    assert json.loads((run_dir / trackers.TRACKERS_FILE).read_text())["mlflow"] != run_id


def test_wandb_continues_its_run_after_a_resume(tmp_path, monkeypatch):
    """The resumed launch names the first launch's wandb run (id, resume="allow") and sends no step
    the run already holds; a fresh start gets a new id."""
    calls, logged = [], []

    class Run:
        def __init__(self, step):
            self.step = step

        def log(self, row, step=None):
            logged.append(step)

        def finish(self):
            pass

    def init(**kwargs):
        calls.append(kwargs)
        return Run(6 if len(calls) == 2 else 0)  # wandb's step after launch 1 logged steps 1-5

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    launch(tmp_path, ("wandb",), 0, range(1, 6), 1)
    launch(tmp_path, ("wandb",), 3, range(4, 8), 2).close()
    assert calls[0]["id"] == calls[1]["id"] and calls[1]["resume"] == "allow"
    assert calls[0]["project"] == "proj" and calls[0]["name"] == "exp" and calls[0]["config"] == CONFIG
    assert logged == [1, 2, 3, 4, 5, 6, 7]
    launch(tmp_path, ("wandb",), 0, [1], 3)
    assert calls[2]["id"] != calls[0]["id"]


def test_missing_mlflow_is_named_before_anything_runs(monkeypatch):
    from cfg import settings

    from jaxsft.config import ConfigError

    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    with pytest.raises(ConfigError, match="trainer.logger includes mlflow but the mlflow package is not installed") as e:
        settings({"trainer.logger": ["console", "mlflow"]})
    assert "\n" not in str(e.value)
