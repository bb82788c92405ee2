"""`run.report_to mlflow`: an MLflow run; by default a file store in run.dir/mlruns, nothing needs a server.

MLflow's own environment decides where and what: MLFLOW_TRACKING_URI (a server, a database; default
`file:<run.dir>/mlruns`), MLFLOW_EXPERIMENT_NAME (default `distrib`), MLFLOW_RUN_NAME (default the
run directory's name), MLFLOW_TAGS (a JSON object of tags). The run carries the tag `distrib.run_id`:
a resumed or requeued job finds its run by it and goes on logging into it: it adds the points of
metrics.jsonl the interrupted attempt had not sent yet, and does not log again those it had sent past
its checkpoint (the resumed run computes the same numbers).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from records import finite_numbers, flat_config, kept_records, scalars

RUN_TAG = "distrib.run_id"
_STATUS = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}


class MlflowTracker:
    def start(self, run: Any) -> None:
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # MLflow 3 keeps its file store in maintenance mode and refuses it unless told it is wanted: it is,
            # a local store in the run directory (and in this process only; the user's environment is theirs).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            store = Path(run.dir) / "mlruns"
            if store.is_symlink():
                raise RuntimeError(f"{store} is a link distrib did not create; it writes no MLflow store there")
            uri = store.as_uri()
        from mlflow import MlflowClient

        self.client = client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "distrib"
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment is not None else client.create_experiment(name)
        found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{run.id}'", max_results=1)
        self._logged: dict[str, int] = {}  # metric -> the last step an earlier attempt logged it at
        if found:
            self.run_id = found[0].info.run_id
            client.update_run(self.run_id, status="RUNNING")
            for key in found[0].data.metrics:
                history = client.get_metric_history(self.run_id, key)
                self._logged[key] = max((m.step for m in history), default=-1)
        else:
            tags = {RUN_TAG: run.id, **_env_tags()}
            if os.environ.get("SLURM_JOB_ID"):
                tags["slurm.job_id"] = os.environ["SLURM_JOB_ID"]
            run_name = os.environ.get("MLFLOW_RUN_NAME") or Path(run.dir).name
            self.run_id = client.create_run(experiment_id, tags=tags, run_name=run_name).info.run_id
            self._params(run.config)
        # On a resume: what metrics.jsonl kept that this run lacks (the killed attempt had not sent it, or mlflow is new to the run).
        for record in kept_records(run):
            self.log(record)
        print(f"mlflow: run {self.run_id} in experiment {name!r} at {uri}", flush=True)

    def _params(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        # MLflow keeps a value of up to 6000 characters and takes 100 params a call.
        params = [Param(k, (json.dumps(v) if not isinstance(v, str) else v)[:6000]) for k, v in flat_config(config).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        step, values = scalars(record)
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items() if step > self._logged.get(k, -1)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, summary: Any, outcome: str) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        numbers = finite_numbers(summary)
        if numbers:
            step = int(numbers.get("optimizer_steps", 0))
            self.client.log_batch(self.run_id, metrics=[Metric(f"summary/{k}", v, now, step) for k, v in numbers.items()])
        self.client.set_terminated(self.run_id, status=_STATUS.get(outcome, "FINISHED"))


def _env_tags() -> dict[str, str]:
    raw = os.environ.get("MLFLOW_TAGS")
    if not raw:
        return {}
    tags = json.loads(raw)
    if not isinstance(tags, dict):
        raise ValueError(f"MLFLOW_TAGS must be a JSON object, got {raw[:100]!r}")
    return {str(k): str(v) for k, v in tags.items()}
