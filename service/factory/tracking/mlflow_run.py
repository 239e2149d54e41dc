"""MLflow: a job's run on a tracking server, with the model's files as the run's artifacts.

The client is `mlflow.MlflowClient` (the `mlflow-skinny` package is enough). A server that needs
a token gets the job's `api_key` as MLflow's `MLFLOW_TRACKING_TOKEN`, set in the trainer's own
environment only. MLflow's HTTP client retries for minutes by default (7 retries, exponential
backoff); a training should not wait that long on a tracker, so unless the factory's environment
says otherwise a request is tried 3 times and waits 20 s at most: a server that is down costs a
job about a minute, once (the tracker is then left out).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from service.factory.tracking.base import EVENT, Param, RunContext

PACKAGE = "mlflow"
INSTALL = "pip install 'classifier-gateway[tracking]' (or pip install mlflow-skinny)"
DEFAULT_EXPERIMENT = "classifier-factory"
#: MLflow keeps a parameter's value to 6000 characters.
MAX_PARAM_CHARS = 6000


class MlflowRun:
    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def start(self, params: Mapping[str, Param]) -> None:
        from mlflow.entities import Param as MlflowParam

        self.client.log_batch(self.run_id, params=[
            MlflowParam(key, str(value)[:MAX_PARAM_CHARS]) for key, value in params.items()])

    def _metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[
            Metric(key, value, stamp, step) for key, value in metrics.items()])

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self._metrics(step, metrics)

    def finish(self, summary: Mapping[str, float], model_dir: Path | None, ok: bool) -> None:
        try:
            if summary:
                self._metrics(int(summary.get("steps", 0)), summary)
            if model_dir is not None:
                self.client.log_artifacts(self.run_id, str(model_dir), artifact_path="model")
        finally:
            self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


def open_run(config: Mapping[str, Any], api_key: str | None, context: RunContext) -> MlflowRun:
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    if api_key:
        os.environ["MLFLOW_TRACKING_TOKEN"] = api_key
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = str(config["tracking_uri"]).rstrip("/")
    client = MlflowClient(tracking_uri=uri)
    name = str(config.get("experiment_name") or DEFAULT_EXPERIMENT)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        experiment_id = str(experiment.experiment_id)
    else:
        try:
            experiment_id = str(client.create_experiment(name))
        except MlflowException:  # another job created it meanwhile
            created = client.get_experiment_by_name(name)
            if created is None:
                raise
            experiment_id = str(created.experiment_id)
    run = client.create_run(experiment_id, run_name=config.get("run_name") or
                            f"job-{context.job_id}", tags={"factory.job_id": context.job_id})
    run_id = str(run.info.run_id)
    context.event(EVENT, {"type": "mlflow", "status": "logging", "tracking_uri": uri,
                          "experiment_id": experiment_id, "run_id": run_id,
                          "url": f"{uri}/#/experiments/{experiment_id}/runs/{run_id}"})
    return MlflowRun(client, run_id)
