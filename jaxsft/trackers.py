"""The remote trackers of `trainer.logger`: wandb and mlflow, one tracker run per training run.

A tracker run's id is kept in RUN_DIR/trackers.json. A launch that resumes from a checkpoint
(initial step > 0) continues that run; a launch from step 0 starts a new one. A killed launch may
have logged steps after the checkpoint the next launch resumes from: those steps are computed
again (the same samples and state, so the same losses; other timings) but not sent again, so the
tracker holds one row per step, the first launch's. (metrics.jsonl is trimmed and written again
instead: jaxsft.metrics.trim_metrics_file.)

- wandb: `wandb.init(project, name, config, id, resume="allow")`; steps below the resumed run's
  step are not sent (wandb would drop them with a warning).
- mlflow (verl's `mlflow` entry): the tracking URI from MLFLOW_TRACKING_URI, else verl's default
  sqlite:////tmp/mlruns.db; experiment = trainer.project_name, run name = trainer.experiment_name
  (MLFLOW_RUN_ID, as in verl, names a run to continue). A new run gets the resolved configuration
  as params (flattened keys, `data.max_length`) and every launch uploads RUN_DIR/config.yaml as
  an artifact (into the experiment's artifact location: with a sqlite store mlflow's default is
  ./mlruns of the working directory where the experiment was created). Metric names keep letters, digits and `_ - . / :` and space (mlflow's rule); any
  other character becomes `_` (`train/time(s)` → `train/time_s_`), as verl does. A metric is not
  sent for a step at or below the last step the run holds for it.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from pathlib import Path

TRACKERS_FILE = "trackers.json"
MLFLOW_DEFAULT_URI = "sqlite:////tmp/mlruns.db"  # verl's default
_MLFLOW_BAD = re.compile(r"[^A-Za-z0-9_\-./ :]")
_PARAM_VALUE_MAX = 6000  # mlflow's limit on a param's value


def _ids(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / TRACKERS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _record(run_dir: Path, **ids) -> None:
    path = run_dir / TRACKERS_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**_ids(run_dir), **ids}) + "\n")
    os.replace(tmp, path)


def _continued(run_dir: Path, name: str, initial_step: int) -> str | None:
    """The recorded run id of tracker `name` when this launch resumes, else None (a new run)."""
    return _ids(run_dir).get(name) if initial_step > 0 else None


class Wandb:
    def __init__(self, run_dir: Path, project: str, name: str, config: dict, initial_step: int):
        import wandb

        run_id = _continued(run_dir, "wandb", initial_step) or uuid.uuid4().hex[:16]
        self.run = wandb.init(project=project, name=name, config=config, id=run_id, resume="allow")
        _record(run_dir, wandb=run_id)
        self.first_step = int(getattr(self.run, "step", 0) or 0)  # steps below it the run holds already

    def log(self, step: int, row: dict) -> None:
        if step >= self.first_step:
            self.run.log(row, step=step)

    def close(self) -> None:
        self.run.finish()


def mlflow_name(key: str) -> str:
    return _MLFLOW_BAD.sub("_", key)


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """The nested configuration as mlflow params: dotted keys, values as text (cut to mlflow's limit)."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict) and v:
            out.update(flat_params(v, f"{prefix}{k}."))
        else:
            out[mlflow_name(f"{prefix}{k}")] = str(v)[:_PARAM_VALUE_MAX]
    return out


class Mlflow:
    def __init__(self, run_dir: Path, project: str, name: str, config: dict, initial_step: int):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or MLFLOW_DEFAULT_URI)
        run_id = os.environ.get("MLFLOW_RUN_ID") or _continued(run_dir, "mlflow", initial_step)
        self.done: dict[str, int] = {}  # metric → the last step the run holds
        if run_id:
            run = self.client.get_run(run_id)
            for key in run.data.metrics:
                self.done[key] = max(m.step for m in self.client.get_metric_history(run_id, key))
        else:
            experiment = self.client.get_experiment_by_name(project)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(project)
            run = self.client.create_run(experiment_id, run_name=name)
            run_id = run.info.run_id
            params = [Param(k, v) for k, v in flat_params(config).items()]
            for i in range(0, len(params), 100):  # mlflow takes at most 100 params per call
                self.client.log_batch(run_id, params=params[i:i + 100])
        self.run_id = run_id
        _record(run_dir, mlflow=run_id)
        if (run_dir / "config.yaml").is_file():
            self.client.log_artifact(run_id, str(run_dir / "config.yaml"))

    def log(self, step: int, row: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_name(k), float(v), now, step) for k, v in row.items()
                   if isinstance(v, (int, float)) and step > self.done.get(mlflow_name(k), -1)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)
